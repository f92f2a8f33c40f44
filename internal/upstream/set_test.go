package upstream

import (
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/names"
)

func testSet(t *testing.T) *Set {
	t.Helper()
	c := func(host string) *Client { return New(&url.URL{Scheme: "https", Host: host}, nil) }
	s, err := NewSet(&Registry{Name: "nvcr.io", Client: c("nvcr.io")}, []string{"nvcr.lab"},
		&Registry{Name: "docker.io", Client: c("registry-1.docker.io"), RootHosts: []string{"hub.mirror.lab"}},
		&Registry{Name: "GHCR.io", Client: c("ghcr.io"), Repositories: []string{"org/*", "tools/**"}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestSetRoute: the routing rules of the registry API, in order: ?ns=, a
// registry prefix, a root host, the default; docker.io's library/ prefix;
// an unknown registry, a path that begins with a host and a path outside an
// allow-list are ErrNameUnknown.
func TestSetRoute(t *testing.T) {
	t.Parallel()
	s := testSet(t)
	for _, c := range []struct {
		ns, host, name string
		want           string // "" : ErrNameUnknown
	}{
		{"", "mirror.lab:5000", "nvidia/pytorch", "nvidia/pytorch"},
		{"", "mirror.lab", "nvidia/k8s/dcgm-exporter", "nvidia/k8s/dcgm-exporter"},
		{"nvcr.io", "mirror.lab", "nvidia/pytorch", "nvidia/pytorch"},
		{"NVCR.IO", "mirror.lab", "nvidia/pytorch", "nvidia/pytorch"},
		{"nvcr.lab", "mirror.lab", "nvidia/pytorch", "nvidia/pytorch"}, // an ns alias of the default
		{"docker.io", "mirror.lab", "library/ubuntu", "docker.io/library/ubuntu"},
		{"docker.io", "mirror.lab", "ubuntu", "docker.io/library/ubuntu"},
		{"ghcr.io", "mirror.lab", "org/img", "ghcr.io/org/img"},
		{"ghcr.io", "mirror.lab", "tools/a/b", "ghcr.io/tools/a/b"},
		{"ghcr.io", "mirror.lab", "other/img", ""}, // outside the allow-list
		{"quay.io", "mirror.lab", "org/img", ""},   // not configured
		{"docker.io", "mirror.lab", "ghcr.io/org/img", ""},
		{"nvcr.io", "mirror.lab", "docker.io/library/ubuntu", ""},
		{"", "mirror.lab", "docker.io/library/ubuntu", "docker.io/library/ubuntu"},
		{"", "mirror.lab", "docker.io/ubuntu", "docker.io/library/ubuntu"},
		{"", "mirror.lab", "ghcr.io/org/img", "ghcr.io/org/img"},
		{"", "mirror.lab", "nvcr.io/nvidia/pytorch", "nvidia/pytorch"}, // the default's name as a prefix
		{"", "mirror.lab", "quay.io/org/img", ""},
		{"", "mirror.lab", "localhost/org/img", ""},
		{"", "mirror.lab", "docker.io/docker.io/library/x", ""},
		{"", "mirror.lab", "docker.io/nvcr.io/nvidia/pytorch", ""},
		{"", "hub.mirror.lab:5000", "library/ubuntu", "docker.io/library/ubuntu"}, // registry-mirrors
		{"", "HUB.mirror.lab", "ubuntu", "docker.io/library/ubuntu"},
		{"", "hub.mirror.lab", "ghcr.io/org/img", "ghcr.io/org/img"}, // a prefix wins over the root host
		{"", "hub.mirror.lab", "nvcr.io/nvidia/pytorch", "nvidia/pytorch"},
		{"", "[::1]:5000", "nvidia/pytorch", "nvidia/pytorch"},
		// A registry's name alone is no repository of the default (nor of
		// another upstream): it is refused, not asked of nvcr.io.
		{"", "mirror.lab", "ghcr.io", ""},
		{"", "mirror.lab", "docker.io", ""},
		{"", "mirror.lab", "nvcr.io", ""},
		{"", "mirror.lab", "quay.io", ""},
		{"", "mirror.lab", "localhost", ""},
		{"nvcr.io", "mirror.lab", "docker.io", ""},
		{"", "mirror.lab", "nvcr.io/ghcr.io", ""},
		// On a further upstream a dotted component alone is a path (its
		// qualified name keeps the registry).
		{"", "hub.mirror.lab", "ghcr.io", "docker.io/library/ghcr.io"},
		{"docker.io", "mirror.lab", "my.app", "docker.io/library/my.app"},
		{"", "mirror.lab", "docker.io/my.app", "docker.io/library/my.app"},
	} {
		r, got, err := s.Route(c.ns, c.host, c.name)
		if err == nil {
			if reg, _ := names.SplitQualified(got); (reg == "") != (r == s.Default()) || (reg != "" && reg != r.Name) {
				t.Errorf("Route(%q, %q, %q) = %s, %q", c.ns, c.host, c.name, r.Name, got)
			}
		}
		switch {
		case c.want == "" && !errors.Is(err, ErrNameUnknown):
			t.Errorf("Route(%q, %q, %q) = %q, %v; want ErrNameUnknown", c.ns, c.host, c.name, got, err)
		case c.want != "" && (err != nil || got != c.want):
			t.Errorf("Route(%q, %q, %q) = %q, %v; want %q", c.ns, c.host, c.name, got, err, c.want)
		}
	}
}

// TestSetSplit: a qualified name resolves to its upstream and path; the
// default's names are not written in qualified names.
func TestSetSplit(t *testing.T) {
	t.Parallel()
	s := testSet(t)
	for _, c := range []struct{ name, reg, path string }{
		{"nvidia/pytorch", "nvcr.io", "nvidia/pytorch"},
		{"docker.io/library/ubuntu", "docker.io", "library/ubuntu"},
		{"ghcr.io/org/img", "ghcr.io", "org/img"},
		{"ghcr.io/nope/img", "", ""},
		{"nvcr.io/nvidia/pytorch", "", ""},
		{"quay.io/a/b", "", ""},
	} {
		r, p, err := s.Split(c.name)
		if c.reg == "" {
			if !errors.Is(err, ErrNameUnknown) {
				t.Errorf("Split(%q) = %v, %q, %v; want ErrNameUnknown", c.name, r, p, err)
			}
			continue
		}
		if err != nil || r.Name != c.reg || p != c.path {
			t.Errorf("Split(%q) = %v, %q, %v; want %s %s", c.name, r, p, err, c.reg, c.path)
		}
	}
	if got := s.Qualify(s.Get("docker.io"), "python"); got != "docker.io/library/python" {
		t.Errorf("Qualify = %q", got)
	}
	if len(s.All()) != 3 || s.All()[0] != s.Default() {
		t.Errorf("All = %v", s.All())
	}
}

// TestNewSetRefuses: a further upstream named like the default, twice, or
// not like a registry.
func TestNewSetRefuses(t *testing.T) {
	t.Parallel()
	c := New(&url.URL{Scheme: "https", Host: "x.io"}, nil)
	def := func() *Registry { return &Registry{Name: "nvcr.io", Client: c} }
	for _, others := range [][]*Registry{
		{{Name: "nvcr.io", Client: c}},
		{{Name: "nvcr.lab", Client: c}},
		{{Name: "a.io", Client: c}, {Name: "A.io", Client: c}},
		{{Name: "noregistry", Client: c}},
		{{Name: "a.io:5000", Client: c}},
	} {
		if _, err := NewSet(def(), []string{"nvcr.lab"}, others...); err == nil {
			t.Errorf("NewSet(%v) succeeded", others[0].Name)
		}
	}
}

// TestRateLimitReset: a 429 without Retry-After backs off for the
// RateLimit-Reset seconds some registries send instead; Retry-After wins.
func TestRateLimitReset(t *testing.T) {
	t.Parallel()
	now := time.Now()
	for _, c := range []struct {
		hdr  http.Header
		want time.Duration
	}{
		{http.Header{"Ratelimit-Reset": {"30"}}, 30 * time.Second},
		{http.Header{"Ratelimit-Reset": {"30"}, "Retry-After": {"5"}}, 5 * time.Second},
		{http.Header{"Ratelimit-Remaining": {"0;w=21600"}}, 0},
	} {
		resp := &http.Response{StatusCode: http.StatusTooManyRequests, Header: c.hdr, Body: io.NopCloser(strings.NewReader("")),
			Request: &http.Request{Method: http.MethodGet, URL: &url.URL{Path: "/v2/library/ubuntu/manifests/24.04"}}}
		var ue *Error
		if err := checkResponse(resp, now); !errors.As(err, &ue) || ue.RetryAfter != c.want {
			t.Errorf("%v: %v, want RetryAfter %v", c.hdr, err, c.want)
		}
	}
}
