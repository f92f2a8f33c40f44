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
		os, arch, _ := strings.Cut(p, "/")
		var layers []v1.Layer
		for range 2 {
			l, err := NewLayer(layerSize, false)
			if err != nil {
				return nil, err
			}
			layers = append(layers, l)
		}
		im, err := BuildImage(v1.Platform{OS: os, Architecture: arch}, false, layers...)
		if err != nil {
			return nil, fmt.Errorf("ngctest: %s: %w", p, err)
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
