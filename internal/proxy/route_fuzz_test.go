package proxy

import (
	"strings"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/names"
)

// FuzzParseRoute: route and name parsing never panics; a route it accepts
// splits the path exactly, and a name validateName accepts is lower-case
// path components of at most 255 characters in all.
func FuzzParseRoute(f *testing.F) {
	for _, seed := range []string{
		"nvidia/pytorch/manifests/24.05-py3",
		"nvidia/k8s/dcgm-exporter/blobs/sha256:0123",
		"org/team/image/tags/list",
		"a/manifests/b/manifests/c",
		"manifests/x",
		"Nvidia/pytorch/manifests/x",
		"nvidia//pytorch/blobs/x",
		"../x/manifests/y",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, rest string) {
		rt, ok := parseRoute(rest)
		if !ok {
			return
		}
		switch rt.kind {
		case kindTags:
			if rt.name+"/tags/list" != rest {
				t.Fatalf("tags route %+v from %q", rt, rest)
			}
		case kindManifest:
			if rt.name+"/manifests/"+rt.ref != rest {
				t.Fatalf("manifest route %+v from %q", rt, rest)
			}
		case kindBlob:
			if rt.name+"/blobs/"+rt.ref != rest {
				t.Fatalf("blob route %+v from %q", rt, rest)
			}
		}
		if validateName(rt.name) == nil {
			if len(rt.name) > 255 || rt.name != strings.ToLower(rt.name) || strings.Contains(rt.name, "//") ||
				strings.HasPrefix(rt.name, "/") || strings.HasSuffix(rt.name, "/") || strings.Contains(rt.name, "..") {
				t.Fatalf("accepted name %q", rt.name)
			}
		}
		if rt.kind == kindManifest && names.ValidTag(rt.ref) {
			if len(rt.ref) > 128 || strings.ContainsAny(rt.ref, "/:") {
				t.Fatalf("accepted tag %q", rt.ref)
			}
		}
	})
}
