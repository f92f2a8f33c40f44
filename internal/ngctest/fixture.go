package ngctest

import (
	"fmt"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Fixture is the standard content of the fake: the images the tests pull.
type Fixture struct {
	// Pytorch is nvidia/pytorch:17.12, a Docker manifest list of schema2
	// images for linux/amd64 and linux/arm64.
	Pytorch *Image
	// DCGM is nvidia/k8s/dcgm-exporter:3.3.5-3.4.0-ubuntu22.04, a three-level
	// name with an OCI image index of OCI manifests (amd64, arm64).
	DCGM *Image
	// CUDA is nvidia/cuda:12.4.1-base-ubuntu22.04, a single schema2 image
	// whose base layer is shared with Pytorch's amd64 image.
	CUDA *Image
	// Private is myorg/team/private-image:1.0, which needs the API key.
	Private *Image
}

// Repository names and tags of the fixture.
const (
	PytorchRepo = "nvidia/pytorch"
	PytorchTag  = "17.12"
	DCGMRepo    = "nvidia/k8s/dcgm-exporter"
	DCGMTag     = "3.3.5-3.4.0-ubuntu22.04"
	CUDARepo    = "nvidia/cuda"
	CUDATag     = "12.4.1-base-ubuntu22.04"
	PrivateRepo = "myorg/team/private-image"
	PrivateTag  = "1.0"
)

// Populate builds the standard fixture images (layers of about layerSize
// bytes each, uncompressed) and publishes them.
func (u *Upstream) Populate(layerSize int64) (*Fixture, error) {
	amd64 := v1.Platform{OS: "linux", Architecture: "amd64"}
	arm64 := v1.Platform{OS: "linux", Architecture: "arm64"}
	layer := func(oci bool) v1.Layer {
		l, err := u.newLayer(layerSize, oci)
		if err != nil {
			panic(fmt.Sprintf("ngctest: building layer: %v", err))
		}
		return l
	}
	shared := layer(false)
	var f Fixture
	var err error
	build := func(p v1.Platform, oci bool, ls ...v1.Layer) *Image {
		if err != nil {
			return nil
		}
		var im *Image
		im, err = BuildImage(p, oci, ls...)
		return im
	}
	ptAMD := build(amd64, false, shared, layer(false), layer(false))
	ptARM := build(arm64, false, layer(false), layer(false))
	dcAMD := build(amd64, true, layer(true), layer(true))
	dcARM := build(arm64, true, layer(true))
	f.CUDA = build(amd64, false, shared, layer(false))
	f.Private = build(amd64, false, layer(false))
	if err != nil {
		return nil, err
	}
	if f.Pytorch, err = BuildIndex(false, ptAMD, ptARM); err != nil {
		return nil, err
	}
	if f.DCGM, err = BuildIndex(true, dcAMD, dcARM); err != nil {
		return nil, err
	}
	u.AddImage(PytorchRepo, false, f.Pytorch, PytorchTag, "18.01-py3")
	u.AddImage(DCGMRepo, false, f.DCGM, DCGMTag)
	u.AddImage(CUDARepo, false, f.CUDA, CUDATag)
	u.AddImage(PrivateRepo, true, f.Private, PrivateTag)
	return &f, nil
}
