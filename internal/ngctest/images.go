package ngctest

import (
	"io"
	mrand "math/rand"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
)

// Content is one manifest or blob the upstream serves.
type Content struct {
	MediaType string
	Digest    digest.Digest
	Body      []byte
}

// Image is a fixture image: its manifest, config and layers, and (for an
// index) its children.
type Image struct {
	Manifest Content
	Config   Content   // zero for an index
	Layers   []Content // compressed layer blobs
	Children []*Image  // per platform, for an index
	Platform string    // "linux/amd64" for a child of an index
}

// Blobs returns every blob of the image and its children.
func (im *Image) Blobs() []Content {
	var out []Content
	if im.Config.Digest != "" {
		out = append(out, im.Config)
	}
	out = append(out, im.Layers...)
	for _, c := range im.Children {
		out = append(out, c.Blobs()...)
	}
	return out
}

// Child returns the child manifest for platform ("linux/amd64"), or nil.
func (im *Image) Child(platform string) *Image {
	for _, c := range im.Children {
		if c.Platform == platform {
			return c
		}
	}
	return nil
}

// NewLayer returns a random, valid tar+gzip layer of about size bytes
// (uncompressed), with a Docker or OCI layer media type.
func NewLayer(size int64, oci bool) (v1.Layer, error) {
	mt := types.DockerLayer
	if oci {
		mt = types.OCILayer
	}
	return random.Layer(size, mt)
}

// SeedContent makes the layers Populate and AddRelease build from now on
// come from seed: the same seed and layer sizes, in the same order, give
// the same images (digests) in every run, so that a mirror's cache from
// an earlier run matches. Without it every fake makes fresh content.
// Tokens and signatures stay random.
func (u *Upstream) SeedContent(seed int64) {
	u.layerMu.Lock()
	u.layerSrc = mrand.NewSource(seed)
	u.layerMu.Unlock()
}

// newLayer is NewLayer, from the seeded source when SeedContent set one.
func (u *Upstream) newLayer(size int64, oci bool) (v1.Layer, error) {
	u.layerMu.Lock()
	defer u.layerMu.Unlock()
	if u.layerSrc == nil {
		return NewLayer(size, oci)
	}
	mt := types.DockerLayer
	if oci {
		mt = types.OCILayer
	}
	return random.Layer(size, mt, random.WithSource(u.layerSrc))
}

// BuildImage builds a real single-platform image whose config diff_ids match
// its layers, so that Docker and containerd accept it. oci selects OCI media
// types, otherwise Docker schema2.
func BuildImage(platform v1.Platform, oci bool, layers ...v1.Layer) (*Image, error) {
	base := empty.Image
	if oci {
		base = mutate.MediaType(base, types.OCIManifestSchema1)
		base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	}
	cf, err := base.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant = platform.OS, platform.Architecture, platform.Variant
	cf.Config.Cmd = []string{"/bin/sh"}
	img, err := mutate.ConfigFile(base, cf)
	if err != nil {
		return nil, err
	}
	img, err = mutate.AppendLayers(img, layers...)
	if err != nil {
		return nil, err
	}
	return fromV1Image(img, platform)
}

func fromV1Image(img v1.Image, p v1.Platform) (*Image, error) {
	raw, err := img.RawManifest()
	if err != nil {
		return nil, err
	}
	mt, err := img.MediaType()
	if err != nil {
		return nil, err
	}
	cfgRaw, err := img.RawConfigFile()
	if err != nil {
		return nil, err
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	out := &Image{
		Manifest: Content{MediaType: string(mt), Digest: digest.FromBytes(raw), Body: raw},
		Config:   Content{MediaType: string(m.Config.MediaType), Digest: digest.FromBytes(cfgRaw), Body: cfgRaw},
		Platform: p.OS + "/" + p.Architecture,
	}
	ls, err := img.Layers()
	if err != nil {
		return nil, err
	}
	for _, l := range ls {
		rc, err := l.Compressed()
		if err != nil {
			return nil, err
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			return nil, err
		}
		lmt, _ := l.MediaType()
		out.Layers = append(out.Layers, Content{MediaType: string(lmt), Digest: digest.FromBytes(b), Body: b})
	}
	return out, nil
}

// BuildIndex builds a multi-platform index of children: a Docker manifest
// list, or an OCI image index when oci is set.
func BuildIndex(oci bool, children ...*Image) (*Image, error) {
	idx := v1.ImageIndex(empty.Index)
	if oci {
		idx = mutate.IndexMediaType(idx, types.OCIImageIndex)
	} else {
		idx = mutate.IndexMediaType(idx, types.DockerManifestList)
	}
	for _, c := range children {
		os, arch, _ := strings.Cut(c.Platform, "/")
		h, err := v1.NewHash(c.Manifest.Digest.String())
		if err != nil {
			return nil, err
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
			Add: rawImage{c},
			Descriptor: v1.Descriptor{
				MediaType: types.MediaType(c.Manifest.MediaType),
				Size:      int64(len(c.Manifest.Body)),
				Digest:    h,
				Platform:  &v1.Platform{OS: os, Architecture: arch},
			},
		})
	}
	raw, err := idx.RawManifest()
	if err != nil {
		return nil, err
	}
	mt, _ := idx.MediaType()
	return &Image{
		Manifest: Content{MediaType: string(mt), Digest: digest.FromBytes(raw), Body: raw},
		Children: children,
	}, nil
}

// rawImage presents a built child to mutate.AppendManifests, which only
// needs its descriptor-level facts.
type rawImage struct{ im *Image }

func (r rawImage) MediaType() (types.MediaType, error) {
	return types.MediaType(r.im.Manifest.MediaType), nil
}
func (r rawImage) Size() (int64, error) { return int64(len(r.im.Manifest.Body)), nil }
func (r rawImage) Digest() (v1.Hash, error) {
	return v1.NewHash(r.im.Manifest.Digest.String())
}
func (r rawImage) RawManifest() ([]byte, error) { return r.im.Manifest.Body, nil }
