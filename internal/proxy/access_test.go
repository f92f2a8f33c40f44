package proxy_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/access"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/tracking"
)

func policy(t *testing.T, cfg access.Config, check access.UpstreamChecker) *access.Policy {
	t.Helper()
	p, err := access.New(cfg, check)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (e *env) doAs(t *testing.T, user, pass, method, path string) result {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), method, e.url(path), nil)
	if user != "" {
		req.SetBasicAuth(user, pass)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return result{err: err}
	}
	defer resp.Body.Close()
	var buf strings.Builder
	_, _ = ioCopy(&buf, resp)
	return result{status: resp.StatusCode, header: resp.Header, body: []byte(buf.String())}
}

// TestAccessHtpasswd: the private org is refused to anonymous clients on a
// cold and a warm cache, served to an allowed user, refused to a known but
// disallowed one; public namespaces stay open to anyone.
func TestAccessHtpasswd(t *testing.T) {
	t.Parallel()
	forEachVia(t, testAccessHtpasswd)
}

func testAccessHtpasswd(t *testing.T, via string) {
	pol := policy(t, access.Config{
		Mode:             access.ModeHtpasswd,
		HtpasswdFile:     ngctest.WriteHtpasswd(t, "alice", "alice-pw", "bob", "bob-pw"),
		PublicNamespaces: []string{qual(via, "nvidia")},
		Groups:           map[string][]string{"ml": {"alice"}},
		Rules:            []access.Rule{{Repositories: []string{qual(via, "myorg/**")}, Users: []string{"@ml"}}},
	}, nil)
	e := newEnv(t, envOpts{via: via, key: ngctest.APIKey, access: pol})
	priv := "/v2/" + ngctest.PrivateRepo + "/manifests/" + ngctest.PrivateTag

	r := e.doAs(t, "", "", http.MethodGet, priv)
	// Bearer, not Basic: an anonymous Docker daemon can meet only that
	// (with an anonymous token from the realm).
	if r.status != 401 || errorCode(t, r) != "UNAUTHORIZED" || !strings.HasPrefix(r.header.Get("Www-Authenticate"), `Bearer realm="`+e.mirror.URL+`/auth/token"`) {
		t.Fatalf("anonymous, cold: %d %v %s", r.status, r.header, r.body)
	}
	before := len(e.up.Requests())
	r = e.doAs(t, "alice", "wrong", http.MethodGet, priv)
	if r.status != 401 {
		t.Fatalf("wrong password: %d", r.status)
	}
	if len(e.up.Requests()) != before {
		t.Fatal("refused requests reached the upstream")
	}
	r = e.doAs(t, "alice", "alice-pw", http.MethodGet, priv)
	mustOK(t, r, 200)
	layer := "/v2/" + ngctest.PrivateRepo + "/blobs/" + e.fx.Private.Layers[0].Digest.String()
	mustOK(t, e.doAs(t, "alice", "alice-pw", http.MethodGet, layer), 200)

	// Warm cache: still refused, with the same answers as cold.
	r = e.doAs(t, "", "", http.MethodGet, priv)
	if r.status != 401 || errorCode(t, r) != "UNAUTHORIZED" {
		t.Fatalf("anonymous, warm: %d %s", r.status, r.body)
	}
	r = e.doAs(t, "bob", "bob-pw", http.MethodGet, layer)
	if r.status != 403 || errorCode(t, r) != "DENIED" || !strings.Contains(string(r.body), "no rule in access.rules lets bob pull "+e.q(ngctest.PrivateRepo)) {
		t.Fatalf("disallowed user, warm: %d %s", r.status, r.body)
	}
	// The private blob, cached, is not served through a public repository.
	r = e.doAs(t, "", "", http.MethodGet, "/v2/nvidia/pytorch/blobs/"+e.fx.Private.Layers[0].Digest.String())
	if r.status != 404 || errorCode(t, r) != "BLOB_UNKNOWN" {
		t.Fatalf("private blob through a public repository: %d %s", r.status, r.body)
	}
	r = e.doAs(t, "", "", http.MethodGet, "/v2/nvidia/pytorch/manifests/"+e.fx.Private.Manifest.Digest.String())
	if r.status != 404 || errorCode(t, r) != "MANIFEST_UNKNOWN" {
		t.Fatalf("private manifest through a public repository: %d %s", r.status, r.body)
	}
	// Public content: open to anonymous clients; /v2/ challenges them.
	mustOK(t, e.doAs(t, "", "", http.MethodGet, "/v2/nvidia/pytorch/manifests/17.12"), 200)
	r = e.doAs(t, "", "", http.MethodGet, "/v2/")
	if r.status != 401 || !strings.HasPrefix(r.header.Get("Www-Authenticate"), "Bearer ") {
		t.Fatalf("/v2/ without credentials: %d %v", r.status, r.header)
	}
	mustOK(t, e.doAs(t, "bob", "bob-pw", http.MethodGet, "/v2/"), 200)
	// A shared layer reached through a repository that holds it is served.
	shared := e.fx.CUDA.Layers[0].Digest.String()
	mustOK(t, e.doAs(t, "", "", http.MethodGet, "/v2/nvidia/cuda/blobs/"+shared), 200)
	mustOK(t, e.doAs(t, "", "", http.MethodGet, "/v2/nvidia/pytorch/blobs/"+shared), 200)
}

// TestAccessPassthrough: the client's own key is checked against the
// upstream (once for a burst), a bad key is refused.
func TestAccessPassthrough(t *testing.T) {
	t.Parallel()
	var e *env
	calls := 0
	pol := policy(t, access.Config{Mode: access.ModePassthrough, PublicNamespaces: []string{"nvidia"}},
		func(ctx context.Context, key, repo string) (bool, error) {
			calls++
			return key == ngctest.APIKey, nil
		})
	e = newEnv(t, envOpts{key: ngctest.APIKey, access: pol})
	priv := "/v2/" + ngctest.PrivateRepo + "/manifests/" + ngctest.PrivateTag
	r := e.doAs(t, "$oauthtoken", "nvapi-bad", http.MethodGet, priv)
	if r.status != 403 || errorCode(t, r) != "DENIED" {
		t.Fatalf("bad key: %d %s", r.status, r.body)
	}
	for range 5 {
		mustOK(t, e.doAs(t, "$oauthtoken", ngctest.APIKey, http.MethodGet, priv), 200)
	}
	if calls != 2 {
		t.Fatalf("upstream checks: %d, want 2 (one per key)", calls)
	}
	if strings.Contains(string(r.body), "nvapi") {
		t.Fatal("the error body echoes the key")
	}
}

func ioCopy(b *strings.Builder, resp *http.Response) (int64, error) {
	buf := make([]byte, 32<<10)
	var n int64
	for {
		m, err := resp.Body.Read(buf)
		b.Write(buf[:m])
		n += int64(m)
		if err != nil {
			return n, nil
		}
	}
}

// TestAccessDefaultsAndUnavailableCheck: with client authentication off,
// a non-public repository is 403 (no challenge no credentials could meet);
// a pass-through check the upstream cannot answer is 503, not DENIED.
func TestAccessDefaultsAndUnavailableCheck(t *testing.T) {
	t.Parallel()
	forEachVia(t, testAccessDefaultsAndUnavailableCheck)
}

func testAccessDefaultsAndUnavailableCheck(t *testing.T, via string) {
	none := newEnv(t, envOpts{via: via, key: ngctest.APIKey, access: policy(t, access.Config{PublicNamespaces: []string{qual(via, "nvidia")}}, nil)})
	r := none.doAs(t, "", "", http.MethodGet, "/v2/"+ngctest.PrivateRepo+"/manifests/"+ngctest.PrivateTag)
	if r.status != 403 || errorCode(t, r) != "DENIED" || r.header.Get("Www-Authenticate") != "" ||
		!strings.Contains(string(r.body), "not in a public namespace") || !strings.Contains(string(r.body), "client authentication is off") {
		t.Fatalf("mode none, private: %d %v %s", r.status, r.header, r.body)
	}
	mustOK(t, none.doAs(t, "", "", http.MethodGet, "/v2/nvidia/cuda/manifests/"+ngctest.CUDATag), 200)

	down := newEnv(t, envOpts{via: via, key: ngctest.APIKey, access: policy(t, access.Config{Mode: access.ModePassthrough},
		func(ctx context.Context, key, repo string) (bool, error) {
			return false, errors.New("dial tcp: connection refused")
		})})
	r = down.doAs(t, "$oauthtoken", ngctest.APIKey, http.MethodGet, "/v2/"+ngctest.PrivateRepo+"/manifests/"+ngctest.PrivateTag)
	if r.status != 503 || errorCode(t, r) != "UNAVAILABLE" {
		t.Fatalf("pass-through check without an upstream: %d %s", r.status, r.body)
	}
}

// TestColdHeadHonoursRange: a cold HEAD with Range answers as the GET
// would: 206 with Content-Range, or 416.
func TestColdHeadHonoursRange(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	layer := e.fx.CUDA.Layers[1]
	path := "/v2/nvidia/cuda/blobs/" + layer.Digest.String()
	r := e.do(t, http.MethodHead, path, "Range", "bytes=0-9")
	if r.status != 206 || r.header.Get("Content-Range") != "bytes 0-9/"+itoa(len(layer.Body)) || r.header.Get("Content-Length") != "10" {
		t.Fatalf("cold HEAD with Range: %d %v", r.status, r.header)
	}
	r = e.do(t, http.MethodHead, path, "Range", "bytes="+itoa(len(layer.Body))+"-")
	if r.status != 416 {
		t.Fatalf("cold HEAD past the end: %d", r.status)
	}
}

// pullLog records what the handler reports for the pull history.
type pullLog struct {
	mu  sync.Mutex
	evs []tracking.ManifestServed
}

func (p *pullLog) Served(ev tracking.ManifestServed) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.evs = append(p.evs, ev)
}

// The pull history names an authenticated client by user, an anonymous
// one by IP address, and gets the manifest body for GET only.
func TestPullHistoryClient(t *testing.T) {
	t.Parallel()
	forEachVia(t, testPullHistoryClient)
}

func testPullHistoryClient(t *testing.T, via string) {
	pol := policy(t, access.Config{
		Mode:             access.ModeHtpasswd,
		HtpasswdFile:     ngctest.WriteHtpasswd(t, "alice", "alice-pw"),
		PublicNamespaces: []string{qual(via, "nvidia")},
	}, nil)
	log := &pullLog{}
	e := newEnv(t, envOpts{via: via, access: pol, pulls: log})
	path := "/v2/" + ngctest.PytorchRepo + "/manifests/" + ngctest.PytorchTag
	if r := e.doAs(t, "alice", "alice-pw", http.MethodGet, path); r.status != 200 {
		t.Fatal(r.status)
	}
	if r := e.doAs(t, "", "", http.MethodHead, path); r.status != 200 {
		t.Fatal(r.status)
	}
	if r := e.doAs(t, "", "", http.MethodGet, "/v2/"+ngctest.PytorchRepo+"/manifests/nope"); r.status != 404 {
		t.Fatal(r.status)
	}
	log.mu.Lock()
	defer log.mu.Unlock()
	if len(log.evs) != 2 {
		t.Fatalf("events = %+v (want the two served manifests only)", log.evs)
	}
	a, b := log.evs[0], log.evs[1]
	if a.Client != "alice" || a.Body == nil || a.Reference != ngctest.PytorchTag || a.Digest != e.fx.Pytorch.Manifest.Digest {
		t.Errorf("GET as alice: %+v", a)
	}
	if b.Client != "127.0.0.1" || b.Body != nil {
		t.Errorf("anonymous HEAD: client %q, body %v", b.Client, b.Body != nil)
	}
}

// A verified Basic login is remembered (no bcrypt per request), keyed by
// the password too: a wrong password after a good one is still refused.
func TestBasicLoginMemoryKeepsPasswordsApart(t *testing.T) {
	t.Parallel()
	forEachVia(t, testBasicLoginMemoryKeepsPasswordsApart)
}

func testBasicLoginMemoryKeepsPasswordsApart(t *testing.T, via string) {
	pol := policy(t, access.Config{
		Mode:             access.ModeHtpasswd,
		HtpasswdFile:     ngctest.WriteHtpasswd(t, "alice", "alice-pw"),
		PublicNamespaces: []string{qual(via, "nvidia")},
		Rules:            []access.Rule{{Repositories: []string{qual(via, "myorg/**")}, Users: []string{"alice"}}},
	}, nil)
	e := newEnv(t, envOpts{via: via, key: ngctest.APIKey, access: pol})
	priv := "/v2/" + ngctest.PrivateRepo + "/manifests/" + ngctest.PrivateTag
	for i, c := range []struct {
		pass string
		want int
	}{{"alice-pw", 200}, {"alice-pw", 200}, {"wrong", 401}, {"", 401}, {"alice-pw", 200}} {
		if r := e.doAs(t, "alice", c.pass, http.MethodGet, priv); r.status != c.want {
			t.Errorf("request %d with password %q: %d, want %d", i, c.pass, r.status, c.want)
		}
	}
}

// A manifest cached under one repository and asked for by digest under
// another that holds it too is served, although the upstream refuses
// manifest HEADs (nvcr.io has answered 403); its layers then need no
// upstream HEAD each.
func TestManifestLinkedAcrossRepositoriesWithoutHead(t *testing.T) {
	t.Parallel()
	forEachVia(t, testManifestLinkedAcrossRepositoriesWithoutHead)
}

func testManifestLinkedAcrossRepositoriesWithoutHead(t *testing.T, via string) {
	pol := policy(t, access.Config{Mode: access.ModeNone, PublicNamespaces: []string{qual(via, "nvidia")}}, nil)
	e := newEnv(t, envOpts{via: via, access: pol})
	const copyRepo = "nvidia/pytorch-copy"
	e.up.AddImage(copyRepo, false, e.fx.Pytorch, ngctest.PytorchTag)
	amd := e.fx.Pytorch.Child("linux/amd64")
	mustOK(t, e.do(t, http.MethodGet, "/v2/"+ngctest.PytorchRepo+"/manifests/"+amd.Manifest.Digest.String()), 200) // cached under pytorch
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodHead && strings.Contains(r.URL.Path, "/manifests/") {
			w.WriteHeader(http.StatusForbidden)
			return true
		}
		return false
	})
	mustOK(t, e.do(t, http.MethodGet, "/v2/"+copyRepo+"/manifests/"+amd.Manifest.Digest.String()), 200)
	before := len(e.up.Requests())
	mustServe(t, e, "/v2/"+copyRepo+"/blobs/"+amd.Config.Digest.String(), amd.Config.Body)
	for _, r := range e.up.Requests()[before:] {
		if r.Method == http.MethodHead {
			t.Errorf("the upstream was asked %s %s for a blob the linked manifest refers to", r.Method, r.Path)
		}
	}
}

// qual is the qualified name of repository pattern p of the further
// upstream via ("" : the default upstream's, p itself).
func qual(via, p string) string {
	if via == "" {
		return p
	}
	return via + "/" + p
}
