package ngctest

import (
	"fmt"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// AddRelease publishes a new multi-platform image (a Docker manifest list
// with fresh, random layers: two per platform) as repository:tag, the way
// NGC publishes a new monthly release. platforms default to linux/amd64 and
// linux/arm64.
func (u *Upstream) AddRelease(repository, tag string, layerSize int64, platforms ...string) (*Image, error) {
	if len(platforms) == 0 {
		platforms = []string{"linux/amd64", "linux/arm64"}
	}
	var children []*Image
	for _, p := range platforms {
		im, err := u.buildRandom(p, false, layerSize, 2)
		if err != nil {
			return nil, err
		}
		children = append(children, im)
	}
	idx, err := BuildIndex(false, children...)
	if err != nil {
		return nil, err
	}
	u.AddImage(repository, false, idx, tag)
	return idx, nil
}

// buildRandom builds an image for platform ("linux/amd64") with n fresh,
// random layers of about layerSize bytes (uncompressed; from the seed of
// SeedContent when set); oci selects OCI media types, otherwise Docker
// schema2.
func (u *Upstream) buildRandom(platform string, oci bool, layerSize int64, n int) (*Image, error) {
	os, arch, _ := strings.Cut(platform, "/")
	var layers []v1.Layer
	for range n {
		l, err := u.newLayer(layerSize, oci)
		if err != nil {
			return nil, err
		}
		layers = append(layers, l)
	}
	im, err := BuildImage(v1.Platform{OS: os, Architecture: arch}, oci, layers...)
	if err != nil {
		return nil, fmt.Errorf("ngctest: %s: %w", platform, err)
	}
	return im, nil
}
