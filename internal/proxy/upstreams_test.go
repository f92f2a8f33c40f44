package proxy_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// second is the registry name of the tests' second upstream.
const second = "ghcr.example"

// requests returns how many requests each upstream of e received.
func (e *env) requests() (int, int) {
	return len(e.up.Requests()), len(e.up2.Requests())
}

// TestTwoUpstreamsRouting: one mirror pulls through two upstreams: the
// default at the root, the second by path prefix and by containerd's ns;
// each image comes from its own upstream only, and the cache keeps each
// one's tag records under its registry name.
func TestTwoUpstreamsRouting(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{second: second})
	pullImage(t, e, ngctest.PytorchRepo, ngctest.PytorchTag, e.fx.Pytorch)
	n1, n2 := e.requests()
	if n1 == 0 || n2 != 0 {
		t.Fatalf("a default pull made %d, %d requests to the upstreams, want some, 0", n1, n2)
	}
	pullImage(t, e, second+"/"+ngctest.PytorchRepo, ngctest.PytorchTag, e.fx2.Pytorch)
	if m1, m2 := e.requests(); m1 != n1 || m2 == 0 {
		t.Fatalf("a prefixed pull made %d, %d requests to the upstreams, want 0, some", m1-n1, m2)
	}
	// containerd's hosts.toml: the plain path with ?ns=.
	r := e.do(t, http.MethodGet, "/v2/"+ngctest.DCGMRepo+"/manifests/"+ngctest.DCGMTag+"?ns="+second)
	mustOK(t, r, http.StatusOK)
	if got := r.header.Get("Docker-Content-Digest"); got != e.fx2.DCGM.Manifest.Digest.String() {
		t.Fatalf("ns=%s served %s, want the second upstream's %s", second, got, e.fx2.DCGM.Manifest.Digest)
	}
	if c := e.up.Count("registry", http.MethodGet, "/v2/"+ngctest.DCGMRepo+"/manifests/"+ngctest.DCGMTag); c != 0 {
		t.Fatalf("the default upstream was asked for the ns=%s manifest %d times", second, c)
	}

	// Tag records per upstream: same repository and tag, two digests.
	for _, c := range []struct {
		repo storage.Repo
		want string
	}{
		{e.repo(ngctest.PytorchRepo), e.fx.Pytorch.Manifest.Digest.String()},
		{storage.Repo{Registry: second, Name: ngctest.PytorchRepo}, e.fx2.Pytorch.Manifest.Digest.String()},
		{storage.Repo{Registry: second, Name: ngctest.DCGMRepo}, e.fx2.DCGM.Manifest.Digest.String()},
	} {
		rec, err := e.store.GetTag(t.Context(), c.repo, map[string]string{ngctest.PytorchRepo: ngctest.PytorchTag, ngctest.DCGMRepo: ngctest.DCGMTag}[c.repo.Name])
		if err != nil || rec.Digest.String() != c.want {
			t.Errorf("tag record of %+v = %v, %v; want %s", c.repo, rec.Digest, err, c.want)
		}
	}
	if _, err := e.store.GetTag(t.Context(), e.repo(ngctest.DCGMRepo), ngctest.DCGMTag); err == nil {
		t.Error("the default upstream has a tag record of an image pulled from the second")
	}

	// Warm: both from the cache, no upstream request.
	n1, n2 = e.requests()
	mustServe(t, e, "/v2/"+ngctest.PytorchRepo+"/manifests/"+ngctest.PytorchTag, e.fx.Pytorch.Manifest.Body)
	mustServe(t, e, "/v2/"+second+"/"+ngctest.PytorchRepo+"/manifests/"+ngctest.PytorchTag, e.fx2.Pytorch.Manifest.Body)
	if m1, m2 := e.requests(); m1 != n1 || m2 != n2 {
		t.Fatalf("warm pulls asked the upstreams %d, %d times", m1-n1, m2-n2)
	}

	// A tag list by prefix names the repository as the client did.
	r = e.do(t, http.MethodGet, "/v2/"+second+"/"+ngctest.PytorchRepo+"/tags/list")
	mustOK(t, r, http.StatusOK)
	var tl struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}
	if err := json.Unmarshal(r.body, &tl); err != nil || tl.Name != second+"/"+ngctest.PytorchRepo || len(tl.Tags) != 2 {
		t.Fatalf("tag list %s (%v)", r.body, err)
	}
}

// TestDockerHubNames: docker.io's official images are library/NAME, and
// "NAME" by prefix means the same repository.
func TestDockerHubNames(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{second: "docker.io"})
	e.up2.AddImage("library/ubuntu", false, e.fx2.CUDA, "24.04")
	want := e.fx2.CUDA.Manifest.Body
	for _, p := range []string{
		"/v2/docker.io/ubuntu/manifests/24.04",
		"/v2/docker.io/library/ubuntu/manifests/24.04",
		"/v2/library/ubuntu/manifests/24.04?ns=docker.io",
		"/v2/ubuntu/manifests/24.04?ns=docker.io",
	} {
		mustServe(t, e, p, want)
	}
	c := 0
	for _, r := range e.up2.Requests() {
		if r.Path == "/v2/library/ubuntu/manifests/24.04" && r.Auth == "Bearer" {
			c++
		}
	}
	if c != 1 {
		t.Fatalf("the upstream served library/ubuntu:24.04 %d times, want 1 (one tag record for all four names): %v", c, e.up2.Requests())
	}
	if _, err := e.store.GetTag(t.Context(), storage.Repo{Registry: "docker.io", Name: "library/ubuntu"}, "24.04"); err != nil {
		t.Fatalf("tag record: %v", err)
	}
}

// TestUnknownRegistryReachesNoUpstream: a name under a registry that is not
// configured, or a path-prefix trick, gets a 4xx and no upstream sees a
// request.
func TestUnknownRegistryReachesNoUpstream(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{second: second})
	d := e.fx.CUDA.Layers[0].Digest.String()
	for _, c := range []struct {
		path   string
		status int
		code   string
	}{
		{"/v2/quay.io/org/img/manifests/1.0", 404, "NAME_UNKNOWN"},
		{"/v2/quay.io/org/img/blobs/" + d, 404, "NAME_UNKNOWN"},
		{"/v2/quay.io/org/img/tags/list", 404, "NAME_UNKNOWN"},
		{"/v2/localhost/img/manifests/1.0", 404, "NAME_UNKNOWN"},
		{"/v2/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag + "?ns=quay.io", 404, "NAME_UNKNOWN"},
		{"/v2/" + ngctest.CUDARepo + "/blobs/" + d + "?ns=quay.io", 404, "NAME_UNKNOWN"},
		{"/v2/" + second + "/nvcr.io/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag, 404, "NAME_UNKNOWN"},
		{"/v2/" + second + "/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag + "?ns=nvcr.io", 404, "NAME_UNKNOWN"},
		{"/v2/" + second + ":443/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag, 400, "NAME_INVALID"},
		{"/v2/" + e.up2.Host() + "/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag, 400, "NAME_INVALID"},
		{"/v2/user:pw@" + second + "/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag, 400, "NAME_INVALID"},
		{"/v2/user@" + second + "/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag, 400, "NAME_INVALID"},
		{"/v2/" + second + "/../" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag, 400, "NAME_INVALID"},
		{"/v2/" + second + "%2F" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag, 400, "NAME_INVALID"},
		{"/v2/GHCR.EXAMPLE/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag, 400, "NAME_INVALID"},
		// A registry's name alone: no repository of the default upstream
		// (whose credentials the mirror would use), nor a public upstream's.
		{"/v2/" + second + "/tags/list", 404, "NAME_UNKNOWN"},
		{"/v2/" + second + "/manifests/1.0", 404, "NAME_UNKNOWN"},
		{"/v2/" + second + "/blobs/" + d, 404, "NAME_UNKNOWN"},
		{"/v2/quay.io/tags/list", 404, "NAME_UNKNOWN"},
		{"/v2/nvcr.io/manifests/1.0", 404, "NAME_UNKNOWN"},
	} {
		r := e.do(t, http.MethodGet, c.path)
		if r.err != nil || r.status != c.status || !strings.Contains(string(r.body), `"`+c.code+`"`) {
			t.Errorf("GET %s = %d %s (%v), want %d %s", c.path, r.status, r.body, r.err, c.status, c.code)
		}
	}
	if n1, n2 := e.requests(); n1 != 0 || n2 != 0 {
		t.Fatalf("the upstreams saw %d and %d requests, want none: %v %v", n1, n2, e.up.Requests(), e.up2.Requests())
	}
}

// TestAllowList: a repository outside the second upstream's allow-list is
// 404 NAME_UNKNOWN without an upstream request, before and after its
// content is cached through an allowed one.
func TestAllowList(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{second: second, second2: upstream.Registry{Repositories: []string{"nvidia/cu*"}}})
	pullImage(t, e, second+"/"+ngctest.CUDARepo, ngctest.CUDATag, e.fx2.CUDA)
	_, n2 := e.requests()
	for _, p := range []string{
		"/v2/" + second + "/" + ngctest.PytorchRepo + "/manifests/" + ngctest.PytorchTag,
		"/v2/" + ngctest.PytorchRepo + "/manifests/" + ngctest.PytorchTag + "?ns=" + second,
		"/v2/" + second + "/" + ngctest.PytorchRepo + "/blobs/" + e.fx2.CUDA.Layers[0].Digest.String(),
		"/v2/" + second + "/" + ngctest.PytorchRepo + "/tags/list",
	} {
		r := e.do(t, http.MethodGet, p)
		if r.status != http.StatusNotFound || !strings.Contains(string(r.body), "NAME_UNKNOWN") {
			t.Errorf("GET %s = %d %s, want 404 NAME_UNKNOWN", p, r.status, r.body)
		}
	}
	if _, m2 := e.requests(); m2 != n2 {
		t.Fatalf("refused names made %d upstream requests", m2-n2)
	}
}

// TestRootHost: under a root host of the second upstream, names at the root
// are that upstream's (Docker's registry-mirrors), and a prefix still
// selects an upstream.
func TestRootHost(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{second: second, second2: upstream.Registry{RootHosts: []string{"hub.mirror.test"}}})
	get := func(host, path string) *http.Response {
		t.Helper()
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, e.mirror.URL+path, nil)
		req.Host = host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	_, port, _ := strings.Cut(strings.TrimPrefix(e.mirror.URL, "http://"), ":")
	resp := get("hub.mirror.test:"+port, "/v2/"+ngctest.PytorchRepo+"/manifests/"+ngctest.PytorchTag)
	if got := resp.Header.Get("Docker-Content-Digest"); got != e.fx2.Pytorch.Manifest.Digest.String() {
		t.Fatalf("root host served %d %s, want the second upstream's %s", resp.StatusCode, got, e.fx2.Pytorch.Manifest.Digest)
	}
	resp = get("hub.mirror.test", "/v2/nvcr.io/"+ngctest.PytorchRepo+"/manifests/"+ngctest.PytorchTag)
	if resp.StatusCode != http.StatusNotFound { // nvcr.io is not a name of this test's default upstream
		t.Fatalf("nvcr.io prefix on a fake default: %d", resp.StatusCode)
	}
	resp = get("mirror.test", "/v2/"+ngctest.PytorchRepo+"/manifests/"+ngctest.PytorchTag)
	if got := resp.Header.Get("Docker-Content-Digest"); got != e.fx.Pytorch.Manifest.Digest.String() {
		t.Fatalf("another host served %s, want the default upstream's", got)
	}
}

// TestOneUpstreamDownOthersServe: with upstream A offline or rate limiting
// (429 and a Retry-After, which backs A's client off), A's cached images
// still pull (stale tags served), A's uncached ones fail with A's error, and
// B serves cold and warm pulls as before, asked once for each.
func TestOneUpstreamDownOthersServe(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		down     func(e *env, u *ngctest.Upstream)
		coldCode int
	}{
		{"offline", func(e *env, u *ngctest.Upstream) { u.Close() }, http.StatusBadGateway},
		{"429", func(e *env, u *ngctest.Upstream) {
			u.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
				w.Header().Set("Retry-After", "600")
				w.Header().Set("RateLimit-Remaining", "0;w=21600")
				w.WriteHeader(http.StatusTooManyRequests)
				return true
			})
		}, http.StatusTooManyRequests},
	} {
		for _, aIsDefault := range []bool{true, false} {
			name := tc.name + "/default-down"
			if !aIsDefault {
				name = tc.name + "/second-down"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				e := newEnv(t, envOpts{second: second, tagFreshness: time.Nanosecond}) // every tag pull asks its upstream
				type side struct {
					up     *ngctest.Upstream
					fx     *ngctest.Fixture
					prefix string
				}
				a, b := side{e.up, e.fx, ""}, side{e.up2, e.fx2, second + "/"}
				if !aIsDefault {
					a, b = b, a
				}
				// Warm A's pytorch and B's pytorch.
				pullImage(t, e, a.prefix+ngctest.PytorchRepo, ngctest.PytorchTag, a.fx.Pytorch)
				pullImage(t, e, b.prefix+ngctest.PytorchRepo, ngctest.PytorchTag, b.fx.Pytorch)
				tc.down(e, a.up)
				aBefore := len(a.up.Requests())

				// A: cached images still pull, more than once (after a 429
				// the back-off answers without asking A).
				for range 2 {
					pullImage(t, e, a.prefix+ngctest.PytorchRepo, ngctest.PytorchTag, a.fx.Pytorch)
				}
				// A: an uncached image fails with A's error.
				r := e.do(t, http.MethodGet, "/v2/"+a.prefix+ngctest.CUDARepo+"/manifests/"+ngctest.CUDATag)
				if r.status != tc.coldCode {
					t.Fatalf("cold pull from the down upstream: %d %s, want %d", r.status, r.body, tc.coldCode)
				}
				if tc.name == "429" {
					if got := len(a.up.Requests()) - aBefore; got > 1 {
						t.Fatalf("the rate-limited upstream was asked %d times after its 429, want at most 1 (back-off)", got)
					}
				}

				// B: warm and cold pulls as before.
				bBefore := len(b.up.Requests())
				pullImage(t, e, b.prefix+ngctest.PytorchRepo, ngctest.PytorchTag, b.fx.Pytorch)
				pullImage(t, e, b.prefix+ngctest.CUDARepo, ngctest.CUDATag, b.fx.CUDA)
				pullImage(t, e, b.prefix+ngctest.DCGMRepo, ngctest.DCGMTag, b.fx.DCGM)
				for _, bl := range b.fx.DCGM.Child("linux/amd64").Blobs() {
					if n := b.up.BlobFetches(bl.Digest); n != 1 {
						t.Fatalf("blob %s of B fetched %d times, want 1", bl.Digest, n)
					}
				}
				if len(b.up.Requests()) == bBefore {
					t.Fatal("B's pulls made no upstream request (tags are revalidated)")
				}
				// B's cold pull again, warm now: no blob fetched again.
				pullImage(t, e, b.prefix+ngctest.CUDARepo, ngctest.CUDATag, b.fx.CUDA)
				for _, bl := range b.fx.CUDA.Blobs() {
					if n := b.up.BlobFetches(bl.Digest); n > 1 {
						t.Fatalf("blob %s of B fetched %d times", bl.Digest, n)
					}
				}
			})
		}
	}
}

// forEachVia runs a suite written for the default upstream once as it is
// and once against a further upstream addressed by its registry prefix
// (envOpts.via), each a parallel subtest.
func forEachVia(t *testing.T, suite func(t *testing.T, via string)) {
	t.Helper()
	for _, via := range vias {
		t.Run(viaName(via), func(t *testing.T) {
			t.Parallel()
			suite(t, via)
		})
	}
}
