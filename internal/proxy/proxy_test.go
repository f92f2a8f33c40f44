package proxy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	driver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ngc-mirror/ngc-mirror/internal/access"
	"github.com/ngc-mirror/ngc-mirror/internal/auth"
	"github.com/ngc-mirror/ngc-mirror/internal/evict"
	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/proxy"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

type env struct {
	up *ngctest.Upstream
	fx *ngctest.Fixture
	// up2 and fx2 are the second upstream (envOpts.second) and its
	// fixture; nil without one.
	up2 *ngctest.Upstream
	fx2 *ngctest.Fixture
	// def is the default upstream with envOpts.via (nil otherwise), via
	// the registry name up is served as.
	def    *ngctest.Upstream
	via    string
	mirror *httptest.Server
	store  *storage.Store
	fills  *fill.Group
	// evictor is nil unless envOpts.budget is set.
	evictor *evict.Evictor
}

type envOpts struct {
	key          string
	upstream     ngctest.Options
	tagFreshness time.Duration
	layerSize    int64
	fill         fill.Options // SpoolDir and IdleTimeout get test defaults
	// wrap, if set, wraps the cache's storage driver (fault injection),
	// on S3 too. On the filesystem the store then has no local root
	// unless keepLocal (for wrappers that keep paths and bytes as they are).
	wrap      func(driver.StorageDriver) driver.StorageDriver
	keepLocal bool
	metrics   *metrics.Metrics
	access    *access.Policy
	pulls     proxy.PullRecorder
	// s3 puts the cache on a real S3 server (versitygw); redirect turns on
	// presigned redirects for cache hits.
	s3, redirect bool
	// budget, if set, puts the cache under an evict.Evictor with these
	// options (the fill asks it for room, the proxy leases and touches).
	budget func(fx *ngctest.Fixture) evict.Options
	// cache, if set, is the pull service's CacheTracker (instead of the
	// evictor).
	cache pull.CacheTracker
	// verifyBefore is proxy.Options.VerifyBeforeHeaders (0: its default);
	// -1 puts every blob on the streaming path of a large one.
	verifyBefore int64
	// tagListMaxPages is pull.Options.TagListMaxPages (0: its default).
	tagListMaxPages int
	// log and accessLog go to proxy.Options.
	log       *slog.Logger
	accessLog bool
	// second, when set, is the registry name of a second upstream (another
	// ngctest instance with a fixture of its own, env.up2) beside the
	// default; second2 configures it (its allow-list, freshness).
	second  string
	second2 upstream.Registry
	// via, when set, serves the env's upstream (env.up, env.fx) as the
	// further upstream of that registry name, with another fake as the
	// default (env.def); env.do and env.url then address it by its prefix,
	// so that a suite written for the default runs against it unchanged.
	via string
}

func newEnv(t *testing.T, o envOpts) *env {
	t.Helper()
	up := ngctest.New(o.upstream)
	t.Cleanup(up.Close)
	if o.layerSize == 0 {
		o.layerSize = 64 << 10
	}
	fx, err := up.Populate(o.layerSize)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var d driver.StorageDriver = filesystem.New(filesystem.DriverParameters{RootDirectory: dir, MaxThreads: 50})
	var sopts []storage.Option
	if o.wrap == nil || o.keepLocal {
		sopts = append(sopts, storage.WithLocalRoot(dir)) // as cmd/mirror runs it
	}
	if o.wrap != nil {
		d = o.wrap(d)
	}
	store := storage.New(d, sopts...)
	if o.s3 {
		var err error
		if store, err = storage.OpenS3(t.Context(), testsupport.StartS3(t)); err != nil {
			t.Fatal(err)
		}
		if o.wrap != nil {
			store = storage.New(o.wrap(store.Driver()))
		}
	}
	name := metrics.DefaultUpstream
	if o.via != "" {
		name = o.via
	}
	client := newClient(up, o.key, o.metrics, name)
	if o.fill.SpoolDir == "" {
		o.fill.SpoolDir = t.TempDir()
	}
	if o.fill.IdleTimeout == 0 {
		o.fill.IdleTimeout = 5 * time.Second
	}
	var ev *evict.Evictor
	if o.budget != nil {
		bo := o.budget(fx)
		bo.Registry = pull.RegistryName(client) // of pins
		if o.via != "" {
			for i := range bo.Pins { // the qualified names of the further upstream
				bo.Pins[i].Repository = o.via + "/" + bo.Pins[i].Repository
			}
		}
		ev = evict.New(store, bo)
		o.fill.Budget = ev
		if o.cache == nil {
			o.cache = ev
		}
	}
	fills := fill.NewGroup(store, o.fill)
	ups := upstream.Single(client)
	var up2, def *ngctest.Upstream
	var fx2 *ngctest.Fixture
	if o.via != "" {
		// The env's upstream is the further upstream o.via; the default is
		// another fake, which the tests expect to see no request.
		def = ngctest.New(o.upstream)
		t.Cleanup(def.Close)
		t.Cleanup(func() { // before Close
			if n := len(def.Requests()); n != 0 {
				t.Errorf("the default upstream saw %d requests for a suite of the further upstream %s: %v", n, o.via, def.Requests())
			}
		})
		if _, err := def.Populate(o.layerSize); err != nil {
			t.Fatal(err)
		}
		if ups, err = upstream.NewSet(&upstream.Registry{Name: strings.ToLower(def.Host()), Client: newClient(def, o.key, o.metrics, metrics.DefaultUpstream)}, nil,
			&upstream.Registry{Name: o.via, Client: client}); err != nil {
			t.Fatal(err)
		}
	}
	if o.second != "" {
		up2 = ngctest.New(o.upstream)
		t.Cleanup(up2.Close)
		if fx2, err = up2.Populate(o.layerSize); err != nil {
			t.Fatal(err)
		}
		r2 := o.second2
		r2.Name, r2.Client = o.second, newClient(up2, o.key, o.metrics, o.second)
		if ups, err = upstream.NewSet(ups.Default(), nil, &r2); err != nil {
			t.Fatal(err)
		}
	}
	svc := pull.NewSet(ups, store, fills, pull.Options{TagFreshness: o.tagFreshness, CheckLinks: o.access != nil, Redirect: o.redirect, Cache: o.cache, TagListMaxPages: o.tagListMaxPages})
	h := proxy.New(svc, proxy.Options{NSAliases: []string{"nvcr.io"}, Metrics: o.metrics, Access: o.access, Pulls: o.pulls, VerifyBeforeHeaders: o.verifyBefore,
		Log: o.log, AccessLog: o.accessLog})
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	// Fills outlive their clients: let a commit finish before the cache
	// directory is removed (cleanups run last-registered first).
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = fills.Wait(ctx)
	})
	return &env{up: up, fx: fx, up2: up2, fx2: fx2, def: def, via: o.via, mirror: srv, store: store, fills: fills, evictor: ev}
}

// newClient is a client of u through an auth transport with key, whose
// traffic m records under upstream=name.
func newClient(u *ngctest.Upstream, key string, m *metrics.Metrics, name string) *upstream.Client {
	origin, _ := url.Parse(u.URL())
	rt := auth.NewTransport(nil, origin, auth.Credentials{Secret: key}, nil)
	c := upstream.New(origin, rt)
	if m != nil {
		um := m.For(name)
		rt.OnTokenExchange = um.TokenExchange
		c.OnRequest = func(kind string, status int, d time.Duration) { um.Request(kind, status, d.Seconds()) }
		c.OnBytes = um.Received
		c.OnBackoffRefusal = um.BackoffRefusal
	}
	return c
}

// vias are the ways a suite reaches the env's upstream: as the default
// upstream at the root, and as a further upstream by its registry prefix.
var vias = []string{"", second}

// viaName names a suite's subtest.
func viaName(via string) string {
	if via == "" {
		return "default"
	}
	return via
}

// path is a registry API path as the tests write it (/v2/nvidia/cuda/...),
// addressed to the env's upstream: with envOpts.via, by its registry
// prefix.
func (e *env) path(p string) string {
	if e.via != "" && strings.HasPrefix(p, "/v2/") && p != "/v2/" {
		return "/v2/" + e.via + "/" + strings.TrimPrefix(p, "/v2/")
	}
	return p
}

// url is the mirror's URL of path p (env.path).
func (e *env) url(p string) string { return e.mirror.URL + e.path(p) }

// q is the qualified name of repository (or pattern) name of the env's
// upstream: what access rules, pins and the pull history name.
func (e *env) q(name string) string {
	if e.via != "" {
		return e.via + "/" + name
	}
	return name
}

type result struct {
	status int
	header http.Header
	body   []byte
	err    error
}

func (e *env) do(t *testing.T, method, path string, hdr ...string) result {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, e.url(path), nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return result{err: err}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return result{status: resp.StatusCode, header: resp.Header, body: body, err: err}
}

func mustOK(t *testing.T, r result, want int) {
	t.Helper()
	if r.err != nil {
		t.Fatalf("request failed: %v", r.err)
	}
	if r.status != want {
		t.Fatalf("status %d, want %d; body %s", r.status, want, r.body)
	}
}

// mustServe GETs path and fails unless it answers 200 with want.
func mustServe(t *testing.T, e *env, path string, want []byte) {
	t.Helper()
	r := e.do(t, http.MethodGet, path)
	mustOK(t, r, 200)
	if !bytes.Equal(r.body, want) {
		t.Fatalf("%s: %d bytes differ from the %d expected", path, len(r.body), len(want))
	}
}

func errorCode(t *testing.T, r result) string {
	t.Helper()
	var env struct {
		Errors []struct{ Code, Message string }
	}
	if err := json.Unmarshal(r.body, &env); err != nil || len(env.Errors) == 0 {
		t.Fatalf("body is not an OCI error envelope: %q", r.body)
	}
	return env.Errors[0].Code
}

func TestBaseEndpoint(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	r := e.do(t, http.MethodGet, "/v2/")
	mustOK(t, r, 200)
	if string(r.body) != "{}" || r.header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
		t.Fatalf("got %q %v", r.body, r.header)
	}
}

// TestPullThroughIndexByteIdentical pulls a manifest list, its children and
// every blob, and checks bytes, digests and headers against the upstream's.
func TestPullThroughIndexByteIdentical(t *testing.T) {
	t.Parallel()
	forEachVia(t, testPullThroughIndexByteIdentical)
}

func testPullThroughIndexByteIdentical(t *testing.T, via string) {
	e := newEnv(t, envOpts{via: via})
	for _, tc := range []struct {
		repo, tag string
		im        *ngctest.Image
	}{
		{ngctest.PytorchRepo, ngctest.PytorchTag, e.fx.Pytorch},
		{ngctest.DCGMRepo, ngctest.DCGMTag, e.fx.DCGM},
		{ngctest.CUDARepo, ngctest.CUDATag, e.fx.CUDA},
	} {
		// HEAD on a cold cache carries the GET's headers.
		head := e.do(t, http.MethodHead, "/v2/"+tc.repo+"/manifests/"+tc.tag)
		mustOK(t, head, 200)
		get := e.do(t, http.MethodGet, "/v2/"+tc.repo+"/manifests/"+tc.tag)
		mustOK(t, get, 200)
		if !bytes.Equal(get.body, tc.im.Manifest.Body) {
			t.Fatalf("%s: manifest bytes differ from upstream", tc.repo)
		}
		for _, k := range []string{"Content-Type", "Content-Length", "Docker-Content-Digest"} {
			if head.header.Get(k) != get.header.Get(k) || get.header.Get(k) == "" {
				t.Errorf("%s: HEAD %s=%q, GET %q", tc.repo, k, head.header.Get(k), get.header.Get(k))
			}
		}
		if get.header.Get("Content-Type") != tc.im.Manifest.MediaType || get.header.Get("Docker-Content-Digest") != tc.im.Manifest.Digest.String() {
			t.Errorf("%s: headers %v", tc.repo, get.header)
		}
		if len(head.body) != 0 {
			t.Errorf("HEAD had a body")
		}
		for _, c := range tc.im.Children {
			r := e.do(t, http.MethodGet, "/v2/"+tc.repo+"/manifests/"+c.Manifest.Digest.String())
			mustOK(t, r, 200)
			if !bytes.Equal(r.body, c.Manifest.Body) || r.header.Get("Content-Type") != c.Manifest.MediaType {
				t.Fatalf("child manifest differs")
			}
		}
		for _, b := range tc.im.Blobs() {
			path := "/v2/" + tc.repo + "/blobs/" + b.Digest.String()
			head := e.do(t, http.MethodHead, path)
			mustOK(t, head, 200)
			r := e.do(t, http.MethodGet, path)
			mustOK(t, r, 200)
			if !bytes.Equal(r.body, b.Body) {
				t.Fatalf("blob %s differs", b.Digest)
			}
			for _, k := range []string{"Content-Type", "Content-Length", "Docker-Content-Digest", "Accept-Ranges"} {
				if head.header.Get(k) != r.header.Get(k) {
					t.Errorf("blob HEAD %s=%q, GET %q", k, head.header.Get(k), r.header.Get(k))
				}
			}
		}
	}
	for _, req := range e.up.CDNRequests() {
		if req.Auth != "" {
			t.Fatalf("the CDN received an Authorization header (%s)", req.Auth)
		}
	}
	if e.up.Count("registry", http.MethodGet, "/authn/token") != 0 {
		t.Fatal("the mirror asked the post-expiry realm for a token")
	}
}

// TestCachedServedWithUpstreamDown checks that a warm cache serves tags
// (stale) and digests when the upstream is gone.
func TestCachedServedWithUpstreamDown(t *testing.T) {
	t.Parallel()
	forEachVia(t, testCachedServedWithUpstreamDown)
}

func testCachedServedWithUpstreamDown(t *testing.T, via string) {
	e := newEnv(t, envOpts{via: via, tagFreshness: time.Nanosecond})
	child := e.fx.Pytorch.Child("linux/amd64")
	paths := []string{
		"/v2/nvidia/pytorch/manifests/17.12",
		"/v2/nvidia/pytorch/manifests/" + e.fx.Pytorch.Manifest.Digest.String(),
		"/v2/nvidia/pytorch/manifests/" + child.Manifest.Digest.String(),
		"/v2/nvidia/pytorch/blobs/" + child.Layers[0].Digest.String(),
	}
	want := map[string][]byte{}
	for _, p := range paths {
		r := e.do(t, http.MethodGet, p)
		mustOK(t, r, 200)
		want[p] = r.body
	}
	e.up.Close()
	for _, p := range paths {
		for _, m := range []string{http.MethodHead, http.MethodGet} {
			r := e.do(t, m, p)
			mustOK(t, r, 200)
			if m == http.MethodGet && !bytes.Equal(r.body, want[p]) {
				t.Fatalf("%s: served different bytes with upstream down", p)
			}
		}
	}
	// Something never cached is a clear upstream error, not a 404.
	r := e.do(t, http.MethodGet, "/v2/nvidia/pytorch/manifests/18.01-py3")
	if r.status != http.StatusBadGateway || errorCode(t, r) != "UNAVAILABLE" {
		t.Fatalf("uncached with upstream down: %d %s", r.status, r.body)
	}
}

func TestPrivateRepositoryNeedsKey(t *testing.T) {
	t.Parallel()
	anon := newEnv(t, envOpts{})
	r := anon.do(t, http.MethodGet, "/v2/"+ngctest.PrivateRepo+"/manifests/"+ngctest.PrivateTag)
	if r.status != http.StatusForbidden || errorCode(t, r) != "DENIED" {
		t.Fatalf("anonymous private pull: %d %s", r.status, r.body)
	}
	keyed := newEnv(t, envOpts{key: ngctest.APIKey})
	r = keyed.do(t, http.MethodGet, "/v2/"+ngctest.PrivateRepo+"/manifests/"+ngctest.PrivateTag)
	mustOK(t, r, 200)
	if !bytes.Equal(r.body, keyed.fx.Private.Manifest.Body) {
		t.Fatal("private manifest differs")
	}
	r = keyed.do(t, http.MethodGet, "/v2/"+ngctest.PrivateRepo+"/blobs/"+keyed.fx.Private.Layers[0].Digest.String())
	mustOK(t, r, 200)
	wrong := newEnv(t, envOpts{key: "nvapi-wrong"})
	r = wrong.do(t, http.MethodGet, "/v2/"+ngctest.PrivateRepo+"/manifests/"+ngctest.PrivateTag)
	if r.status != http.StatusForbidden || strings.Contains(string(r.body), "nvapi-wrong") {
		t.Fatalf("wrong key: %d %s", r.status, r.body)
	}
}

// TestTokenExpiryRealmSwitch: after tokens expire the upstream challenges
// with another realm; the mirror must re-exchange at the original one.
func TestTokenExpiryRealmSwitch(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{key: ngctest.APIKey, tagFreshness: time.Nanosecond})
	mustOK(t, e.do(t, http.MethodGet, "/v2/nvidia/pytorch/manifests/17.12"), 200)
	e.up.ExpireTokens()
	mustOK(t, e.do(t, http.MethodGet, "/v2/nvidia/pytorch/manifests/18.01-py3"), 200)
	if n := e.up.Count("registry", http.MethodGet, "/authn/token"); n != 0 {
		t.Fatalf("asked the post-expiry realm %d times", n)
	}
	if n := e.up.Count("registry", http.MethodGet, "/proxy_auth"); n < 2 {
		t.Fatalf("token exchanges at the original realm: %d, want a fresh one after expiry", n)
	}
}

func TestLenientTokenResponses(t *testing.T) {
	t.Parallel()
	for name, o := range map[string]ngctest.Options{
		"access_token":    {AccessTokenField: true},
		"no expires_in":   {OmitExpiresIn: true},
		"html type":       {TokenContentType: "text/html"},
		"realm has query": {RealmQuery: "service=ngc"},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, envOpts{upstream: o})
			mustOK(t, e.do(t, http.MethodGet, "/v2/nvidia/cuda/manifests/"+ngctest.CUDATag), 200)
		})
	}
}

// TestConcurrentColdBlobOneFetch: many clients, one upstream fetch.
func TestConcurrentColdBlobOneFetch(t *testing.T) {
	t.Parallel()
	forEachVia(t, testConcurrentColdBlobOneFetch)
}

func testConcurrentColdBlobOneFetch(t *testing.T, via string) {
	e := newEnv(t, envOpts{via: via, layerSize: 1 << 20})
	layer := e.fx.Pytorch.Child("linux/amd64").Layers[1]
	// Hold the CDN until every client has asked, so all of them join the
	// same fill rather than finding the blob cached.
	release := make(chan struct{})
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if e.up.IsCDN(r) {
			<-release
		}
		return false
	})
	const clients = 16
	var wg sync.WaitGroup
	bodies := make([][]byte, clients)
	errs := make([]error, clients)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := e.do(t, http.MethodGet, "/v2/nvidia/pytorch/blobs/"+layer.Digest.String())
			bodies[i], errs[i] = r.body, r.err
			if r.err == nil && r.status != 200 {
				errs[i] = errors.New(string(r.body))
			}
		}()
	}
	testsupport.Until(10*time.Second, 5*time.Millisecond, func() bool {
		return e.up.Count("registry", http.MethodGet, "/v2/nvidia/pytorch/blobs/"+layer.Digest.String()) > 0
	})
	time.Sleep(100 * time.Millisecond) // let the other clients join the fill
	close(release)
	wg.Wait()
	for i := range clients {
		if errs[i] != nil || !bytes.Equal(bodies[i], layer.Body) {
			t.Fatalf("client %d: err %v, %d bytes", i, errs[i], len(bodies[i]))
		}
	}
	if n := e.up.BlobFetches(layer.Digest); n != 1 {
		t.Fatalf("upstream blob fetches = %d, want 1", n)
	}
	// A shared layer reached through another repository is a cache hit.
	shared := e.fx.CUDA.Layers[0]
	mustOK(t, e.do(t, http.MethodGet, "/v2/nvidia/pytorch/blobs/"+shared.Digest.String()), 200)
	mustOK(t, e.do(t, http.MethodGet, "/v2/nvidia/cuda/blobs/"+shared.Digest.String()), 200)
	if n := e.up.BlobFetches(shared.Digest); n != 1 {
		t.Fatalf("shared layer fetched %d times", n)
	}
}

// TestClientDisconnectFillCompletes: the first client leaves mid-blob; the
// fill still completes and caches the blob.
func TestClientDisconnectFillCompletes(t *testing.T) {
	t.Parallel()
	forEachVia(t, testClientDisconnectFillCompletes)
}

func testClientDisconnectFillCompletes(t *testing.T, via string) {
	e := newEnv(t, envOpts{via: via, layerSize: 1 << 20})
	layer := e.fx.DCGM.Child("linux/amd64").Layers[0]
	ctx, cancel := context.WithCancel(t.Context())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.url("/v2/"+ngctest.DCGMRepo+"/blobs/"+layer.Digest.String()), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.ReadFull(resp.Body, make([]byte, 1024))
	cancel()
	resp.Body.Close()
	var size int64
	if !testsupport.Until(20*time.Second, 20*time.Millisecond, func() bool {
		var err error
		size, err = e.store.StatBlob(t.Context(), layer.Digest)
		return err == nil
	}) {
		t.Fatal("blob never committed after the client left")
	}
	if size != int64(len(layer.Body)) {
		t.Fatalf("cached size %d, want %d", size, len(layer.Body))
	}
	e.up.Close()
	mustServe(t, e, "/v2/"+ngctest.DCGMRepo+"/blobs/"+layer.Digest.String(), layer.Body)
}

// TestCorruptBlobNeverCached: a flipped byte from the CDN aborts the client
// and caches nothing; the next request refetches and succeeds.
func TestCorruptBlobNeverCached(t *testing.T) {
	t.Parallel()
	forEachVia(t, testCorruptBlobNeverCached)
}

func testCorruptBlobNeverCached(t *testing.T, via string) {
	e := newEnv(t, envOpts{via: via})
	layer := e.fx.CUDA.Layers[1]
	var mu sync.Mutex
	corrupt := true
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		mu.Lock()
		defer mu.Unlock()
		if !e.up.IsCDN(r) || !corrupt {
			return false
		}
		corrupt = false
		bad := bytes.Clone(layer.Body)
		bad[len(bad)/2] ^= 0xff
		w.Header().Set("Content-Length", itoa(len(bad)))
		_, _ = w.Write(bad)
		return true
	})
	path := "/v2/nvidia/cuda/blobs/" + layer.Digest.String()
	r := e.do(t, http.MethodGet, path)
	if r.err == nil && r.status == 200 && bytes.Equal(r.body, layer.Body) {
		t.Fatal("corrupt upstream content was served as a complete blob")
	}
	if r.err == nil && r.status == 200 {
		t.Fatalf("corrupt transfer ended cleanly with %d bytes", len(r.body))
	}
	if _, err := e.store.StatBlob(t.Context(), layer.Digest); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("corrupt blob is visible in the cache: %v", err)
	}
	mustServe(t, e, path, layer.Body) // the next request refetches cleanly
}

func TestRange(t *testing.T) {
	t.Parallel()
	forEachVia(t, testRange)
}

func testRange(t *testing.T, via string) {
	e := newEnv(t, envOpts{via: via})
	layer := e.fx.Pytorch.Child("linux/arm64").Layers[0]
	path := "/v2/nvidia/pytorch/blobs/" + layer.Digest.String()
	size := len(layer.Body)
	check := func(label string) {
		r := e.do(t, http.MethodGet, path, "Range", "bytes=10-99")
		mustOK(t, r, http.StatusPartialContent)
		if !bytes.Equal(r.body, layer.Body[10:100]) || r.header.Get("Content-Range") != "bytes 10-99/"+itoa(size) {
			t.Fatalf("%s: bad partial content %q", label, r.header.Get("Content-Range"))
		}
		r = e.do(t, http.MethodGet, path, "Range", "bytes=-5")
		mustOK(t, r, http.StatusPartialContent)
		if !bytes.Equal(r.body, layer.Body[size-5:]) {
			t.Fatalf("%s: bad suffix range", label)
		}
		r = e.do(t, http.MethodGet, path, "Range", "bytes="+itoa(size-1)+"-")
		mustOK(t, r, http.StatusPartialContent)
		if len(r.body) != 1 {
			t.Fatalf("%s: last byte range gave %d bytes", label, len(r.body))
		}
		r = e.do(t, http.MethodGet, path, "Range", "bytes="+itoa(size)+"-")
		if r.status != http.StatusRequestedRangeNotSatisfiable || r.header.Get("Content-Range") != "bytes */"+itoa(size) {
			t.Fatalf("%s: past the end: %d %q", label, r.status, r.header.Get("Content-Range"))
		}
	}
	check("miss")
	assertCached(t, e, layer.Digest, "the range miss")
	check("hit")
}

func TestTagsList(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	r := e.do(t, http.MethodGet, "/v2/nvidia/pytorch/tags/list?n=1")
	mustOK(t, r, 200)
	var body struct {
		Name string
		Tags []string
	}
	_ = json.Unmarshal(r.body, &body)
	if body.Name != "nvidia/pytorch" || len(body.Tags) != 1 || body.Tags[0] != "17.12" {
		t.Fatalf("page 1: %s", r.body)
	}
	link := r.header.Get("Link")
	if link != `</v2/nvidia/pytorch/tags/list?last=17.12&n=1>; rel="next"` {
		t.Fatalf("Link %q must point at the mirror", link)
	}
	r = e.do(t, http.MethodGet, "/v2/nvidia/pytorch/tags/list?last=17.12&n=1")
	mustOK(t, r, 200)
	_ = json.Unmarshal(r.body, &body)
	if len(body.Tags) != 1 || body.Tags[0] != "18.01-py3" || r.header.Get("Link") != "" {
		t.Fatalf("page 2: %s link %q", r.body, r.header.Get("Link"))
	}
	r = e.do(t, http.MethodGet, "/v2/nvidia/nope/tags/list")
	if r.status != 404 || errorCode(t, r) != "NAME_UNKNOWN" {
		t.Fatalf("unknown repo: %d %s", r.status, r.body)
	}
}

// TestCatalog: /v2/_catalog says the mirror has no catalog (UNSUPPORTED,
// and why) instead of a route error, without asking the upstream.
func TestCatalog(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	before := len(e.up.Requests())
	for _, path := range []string{"/v2/_catalog", "/v2/_catalog?n=10"} {
		r := e.do(t, http.MethodGet, path)
		if r.status != http.StatusNotFound || errorCode(t, r) != "UNSUPPORTED" || !strings.Contains(string(r.body), "no catalog") ||
			!strings.HasPrefix(r.header.Get("Content-Type"), "application/json") {
			t.Errorf("GET %s: %d %q %s", path, r.status, r.header.Get("Content-Type"), r.body)
		}
	}
	if after := len(e.up.Requests()); after != before {
		t.Error("/v2/_catalog reached the upstream")
	}
}

// TestBadInput: each request gets the spec's code and status, and none
// reaches the upstream.
func TestBadInput(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	good := e.fx.CUDA.Layers[0].Digest.String()
	for _, tc := range []struct {
		method, path string
		status       int
		code         string
	}{
		{"GET", "/v2/Nvidia/pytorch/manifests/17.12", 400, "NAME_INVALID"},
		{"GET", "/v2/nvidia/../pytorch/manifests/17.12", 400, "NAME_INVALID"},
		{"GET", "/v2/nvidia//pytorch/manifests/17.12", 400, "NAME_INVALID"},
		{"GET", "/v2/nvidia%2Fpytorch/manifests/17.12", 400, "NAME_INVALID"},
		{"GET", "/v2/" + strings.Repeat("a", 254) + "/x/manifests/1", 400, "NAME_INVALID"},
		{"GET", "/v2/nvidia/pytorch/manifests/-bad", 400, "TAG_INVALID"},
		{"GET", "/v2/nvidia/pytorch/manifests/" + strings.Repeat("t", 129), 400, "TAG_INVALID"},
		{"GET", "/v2/nvidia/pytorch/manifests/sha256:abc", 400, "DIGEST_INVALID"},
		{"GET", "/v2/nvidia/pytorch/blobs/sha256:abc", 400, "DIGEST_INVALID"},
		{"GET", "/v2/nvidia/pytorch/blobs/latest", 400, "DIGEST_INVALID"},
		{"PUT", "/v2/nvidia/pytorch/manifests/17.12", 405, "UNSUPPORTED"},
		{"DELETE", "/v2/nvidia/pytorch/blobs/" + good, 405, "UNSUPPORTED"},
		{"POST", "/v2/nvidia/pytorch/blobs/uploads/", 405, "UNSUPPORTED"},
		{"PATCH", "/v2/nvidia/pytorch/blobs/uploads/x", 405, "UNSUPPORTED"},
		{"GET", "/v2/nvidia/pytorch/manifests/17.12?ns=docker.io", 404, "NAME_UNKNOWN"},
		{"GET", "/v2/nvidia/pytorch/tags/list?n=abc", 400, "PAGINATION_NUMBER_INVALID"},
		{"GET", "/v2/nvidia/pytorch/tags/list?n=99999999999", 400, "PAGINATION_NUMBER_INVALID"},
		{"GET", "/v2/nvidia/pytorch/tags/list?n=-1", 400, "PAGINATION_NUMBER_INVALID"},
		{"GET", "/v2/nvidia/pytorch/manifests/17.12/", 404, "UNSUPPORTED"},
		{"GET", "/v2/nvidia/pytorch/", 404, "UNSUPPORTED"},
		{"GET", "/v2/nvidia/pytorch/manifests/bad$tag", 400, "TAG_INVALID"},
		{"GET", "/v2/nvidia/pytorch/manifests/a%20b", 400, "TAG_INVALID"},
		{"GET", "/v2/nvidia/py_-torch/manifests/1", 400, "NAME_INVALID"},
		{"GET", "/v2/nvidia/pytorch/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", 400, "DIGEST_INVALID"},
		{"GET", "/v2/nvidia/pytorch/blobs/sha256:" + strings.Repeat("z", 64), 400, "DIGEST_INVALID"},
		{"GET", "/v2/nvidia/pytorch/blobs/sha256:" + strings.Repeat("a", 63), 400, "DIGEST_INVALID"},
		{"GET", "/v2/nvidia/pytorch/manifests/sha512:" + strings.Repeat("a", 64), 400, "DIGEST_INVALID"},
		{"FOO", "/v2/nvidia/pytorch/manifests/17.12", 405, "UNSUPPORTED"},
		{"OPTIONS", "/v2/nvidia/pytorch/manifests/17.12", 405, "UNSUPPORTED"},
		// Outside the registry API: JSON too (U1 F8).
		{"GET", "/foo", 404, "NOT_FOUND"},
		{"GET", "/admin/v2/", 404, "NOT_FOUND"},
	} {
		before := len(e.up.Requests())
		req, _ := http.NewRequestWithContext(t.Context(), tc.method, e.url(tc.path), nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var envl struct{ Errors []struct{ Code string } }
		_ = json.Unmarshal(body, &envl)
		code := ""
		if len(envl.Errors) > 0 {
			code = envl.Errors[0].Code
		}
		if resp.StatusCode != tc.status || code != tc.code {
			t.Errorf("%s %s: %d %s, want %d %s", tc.method, tc.path, resp.StatusCode, body, tc.status, tc.code)
		}
		if after := len(e.up.Requests()); after != before {
			t.Errorf("%s %s reached the upstream", tc.method, tc.path)
		}
	}
	// ns naming the upstream (or an alias) is accepted and not a cache key.
	mustOK(t, e.do(t, http.MethodGet, "/v2/nvidia/cuda/manifests/"+ngctest.CUDATag+"?ns=nvcr.io"), 200)
	before := len(e.up.Requests())
	mustOK(t, e.do(t, http.MethodGet, "/v2/nvidia/cuda/manifests/"+ngctest.CUDATag+"?ns="+e.up.Host()), 200)
	mustOK(t, e.do(t, http.MethodGet, "/v2/nvidia/cuda/manifests/"+ngctest.CUDATag), 200)
	if after := len(e.up.Requests()); after != before {
		t.Fatalf("ns changed the cache key: %d more upstream requests", after-before)
	}
}

func TestUnknownContent(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	r := e.do(t, http.MethodGet, "/v2/nvidia/pytorch/manifests/99.99")
	if r.status != 404 || errorCode(t, r) != "MANIFEST_UNKNOWN" {
		t.Fatalf("unknown tag: %d %s", r.status, r.body)
	}
	r = e.do(t, http.MethodGet, "/v2/nvidia/pytorch/blobs/"+digest.FromString("nothing").String())
	if r.status != 404 || errorCode(t, r) != "BLOB_UNKNOWN" {
		t.Fatalf("unknown blob: %d %s", r.status, r.body)
	}
	r = e.do(t, http.MethodHead, "/v2/nvidia/pytorch/blobs/"+digest.FromString("nothing").String())
	if r.status != 404 {
		t.Fatalf("unknown blob HEAD: %d", r.status)
	}
}

// TestUpstreamErrors: 5xx becomes 502, never 404.
func TestUpstreamErrors(t *testing.T) {
	t.Parallel()
	forEachVia(t, testUpstreamErrors)
}

func testUpstreamErrors(t *testing.T, via string) {
	e := newEnv(t, envOpts{via: via})
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/manifests/18.01-py3") {
			w.WriteHeader(http.StatusInternalServerError)
			return true
		}
		if e.up.IsCDN(r) {
			w.WriteHeader(http.StatusServiceUnavailable)
			return true
		}
		return false
	})
	r := e.do(t, http.MethodGet, "/v2/nvidia/pytorch/manifests/18.01-py3")
	if r.status != 502 || errorCode(t, r) != "UNAVAILABLE" {
		t.Fatalf("500: %d %s", r.status, r.body)
	}
	r = e.do(t, http.MethodGet, "/v2/nvidia/cuda/blobs/"+e.fx.CUDA.Layers[0].Digest.String())
	if r.status != 503 || errorCode(t, r) != "UNAVAILABLE" {
		t.Fatalf("CDN 503: %d %s", r.status, r.body)
	}
}

// TestTooManyRequestsBackoff: a 429 is passed on with its Retry-After, the
// mirror then asks the upstream nothing until that time has passed, and
// cached content is served throughout.
func TestTooManyRequestsBackoff(t *testing.T) {
	t.Parallel()
	forEachVia(t, testTooManyRequestsBackoff)
}

func testTooManyRequestsBackoff(t *testing.T, via string) {
	e := newEnv(t, envOpts{via: via})
	cached := "/v2/nvidia/cuda/manifests/" + ngctest.CUDATag
	mustOK(t, e.do(t, http.MethodGet, cached), 200)
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("Retry-After", "30")
		writeUpstream429(w)
		return true
	})
	r := e.do(t, http.MethodGet, "/v2/nvidia/pytorch/manifests/17.12")
	if r.status != 429 || r.header.Get("Retry-After") != "30" || errorCode(t, r) != "TOOMANYREQUESTS" {
		t.Fatalf("429: %d %v %s", r.status, r.header, r.body)
	}
	before := len(e.up.Requests())
	r = e.do(t, http.MethodGet, "/v2/nvidia/pytorch/blobs/"+e.fx.Pytorch.Child("linux/arm64").Layers[0].Digest.String())
	ra, _ := strconv.Atoi(r.header.Get("Retry-After"))
	if r.status != 429 || ra < 1 || ra > 30 {
		t.Fatalf("during backoff: %d Retry-After %q", r.status, r.header.Get("Retry-After"))
	}
	if after := len(e.up.Requests()); after != before {
		t.Fatalf("the mirror asked the upstream %d times during the backoff", after-before)
	}
	mustOK(t, e.do(t, http.MethodGet, cached), 200)
}

func writeUpstream429(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusTooManyRequests)
	_, _ = w.Write([]byte(`{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}`))
}

func itoa(n int) string { return strconv.Itoa(n) }

// TestMetricsColdThenHot: a cold pull of a multi-layer image counts misses
// and the blob bytes as upstream bytes; the same pull again counts hits and
// the same bytes from the cache; all under the upstream label of the
// image's upstream, the default's or a further one's, and nothing under
// the other's.
func TestMetricsColdThenHot(t *testing.T) {
	t.Parallel()
	for _, via := range vias {
		t.Run(viaName(via), func(t *testing.T) {
			t.Parallel()
			testMetricsColdThenHot(t, via)
		})
	}
}

func testMetricsColdThenHot(t *testing.T, via string) {
	reg := prometheus.NewRegistry()
	m := metrics.New(reg)
	e := newEnv(t, envOpts{metrics: m, via: via})
	// The default upstream is "nvcr.io" whatever its URL's host.
	label, other := metrics.DefaultUpstream, ""
	if via != "" {
		label, other = via, metrics.DefaultUpstream
	}
	im := e.fx.Pytorch.Child("linux/amd64")
	var blobBytes int64
	for _, b := range im.Blobs() {
		blobBytes += int64(len(b.Body))
	}
	pull := func() {
		mustOK(t, e.do(t, http.MethodGet, "/v2/nvidia/pytorch/manifests/"+im.Manifest.Digest.String()), 200)
		for _, b := range im.Blobs() {
			mustOK(t, e.do(t, http.MethodGet, "/v2/nvidia/pytorch/blobs/"+b.Digest.String()), 200)
		}
	}
	val := func(c prometheus.Collector) float64 { return testutil.ToFloat64(c) }
	n := float64(len(im.Blobs()))
	// A client has its body before the handler records its metrics; the
	// request counter is recorded last (by the middleware), so wait for it.
	settled := func(rounds float64) {
		t.Helper()
		if !testsupport.Until(5*time.Second, 5*time.Millisecond, func() bool {
			return val(m.Requests.WithLabelValues(metrics.RouteBlob, "GET", "2xx")) >= rounds*n &&
				val(m.Requests.WithLabelValues(metrics.RouteManifest, "GET", "2xx")) >= rounds
		}) {
			t.Fatal("request metrics never settled")
		}
	}
	pull()
	settled(1)
	waitFills(t, e) // commits finish after clients got their (verified) bytes
	if got := val(m.CacheRequests.WithLabelValues(label, "blob", metrics.Miss)); got != n {
		t.Fatalf("cold blob misses %v, want %v", got, n)
	}
	if got := val(m.CacheBytes.WithLabelValues(label, "blob", metrics.Miss)); got != float64(blobBytes) {
		t.Fatalf("cold blob miss bytes %v, want %d", got, blobBytes)
	}
	if got := val(m.CacheRequests.WithLabelValues(label, "manifest", metrics.Miss)); got != 1 {
		t.Fatalf("cold manifest misses %v", got)
	}
	if got := val(m.UpstreamBytes.WithLabelValues(label)); got < float64(blobBytes) {
		t.Fatalf("upstream bytes %v < blob bytes %d", got, blobBytes)
	}
	if got := val(m.TokenExchanges.WithLabelValues(label, "success")); got < 1 {
		t.Fatalf("token exchanges %v", got)
	}
	if got := val(m.UpstreamReqs.WithLabelValues(label, "blob", "2xx")); got < n {
		t.Fatalf("upstream blob requests %v, want at least %v", got, n)
	}
	pull()
	settled(2)
	if got := val(m.CacheRequests.WithLabelValues(label, "blob", metrics.Hit)); got != n {
		t.Fatalf("hot blob hits %v, want %v", got, n)
	}
	if got := val(m.CacheBytes.WithLabelValues(label, "blob", metrics.Hit)); got != float64(blobBytes) {
		t.Fatalf("hot blob hit bytes %v, want %d", got, blobBytes)
	}
	if got := val(m.CacheRequests.WithLabelValues(label, "manifest", metrics.Hit)); got != 1 {
		t.Fatalf("hot manifest hits %v", got)
	}
	if got := val(m.Requests.WithLabelValues(metrics.RouteBlob, "GET", "2xx")); got != 2*n {
		t.Fatalf("blob requests %v", got)
	}
	if other != "" {
		if got := val(m.UpstreamBytes.WithLabelValues(other)) + val(m.CacheRequests.WithLabelValues(other, "blob", metrics.Miss)) +
			val(m.CacheRequests.WithLabelValues(other, "blob", metrics.Hit)); got != 0 {
			t.Fatalf("the other upstream's series count %v", got)
		}
		if n := len(e.def.Requests()); n != 0 {
			t.Fatalf("the default upstream saw %d requests", n)
		}
	}
	// The label's values are the configured registry names only.
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, mm := range mf.GetMetric() {
			for _, l := range mm.GetLabel() {
				if l.GetName() == "upstream" && l.GetValue() != label && l.GetValue() != other {
					t.Fatalf("%s has upstream=%q", mf.GetName(), l.GetValue())
				}
			}
		}
	}
}

// repo is the cache's key of repository name of the env's upstream.
func (e *env) repo(name string) storage.Repo {
	if e.via != "" {
		return storage.Repo{Registry: e.via, Name: name}
	}
	return storage.Repo{Registry: strings.ToLower(e.up.Host()), Name: name}
}

// TestConditionalRequests (U1 F8): If-None-Match with the ETag the mirror
// sends (the digest, quoted; weak or in a list too) answers 304 with no
// body for manifests and blobs, GET and HEAD (RFC 9110 13.1.2); another
// ETag gets the content.
func TestConditionalRequests(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	m := e.fx.CUDA
	layer := m.Layers[0]
	for _, c := range []struct{ path, etag string }{
		{"/v2/nvidia/cuda/manifests/" + ngctest.CUDATag, `"` + m.Manifest.Digest.String() + `"`},
		{"/v2/nvidia/cuda/blobs/" + layer.Digest.String(), `"` + layer.Digest.String() + `"`},
	} {
		mustOK(t, e.do(t, http.MethodGet, c.path), 200) // cached now
		for _, method := range []string{http.MethodGet, http.MethodHead} {
			for _, inm := range []string{c.etag, "W/" + c.etag, `"other", ` + c.etag, "*"} {
				r := e.do(t, method, c.path, "If-None-Match", inm)
				if r.err != nil || r.status != http.StatusNotModified || len(r.body) != 0 || r.header.Get("Etag") != c.etag {
					t.Errorf("%s %s If-None-Match %s: %d, %d bytes, ETag %q (%v)", method, c.path, inm, r.status, len(r.body), r.header.Get("Etag"), r.err)
				}
			}
			if r := e.do(t, method, c.path, "If-None-Match", `"sha256:other"`); r.status != http.StatusOK {
				t.Errorf("%s %s with another ETag: %d", method, c.path, r.status)
			}
		}
	}
}

// TestUnknownNSNamesWhatItAccepts (U1 F8): an ns the mirror does not pull
// from is named in the error, with the registry names it accepts.
func TestUnknownNSNamesWhatItAccepts(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	r := e.do(t, http.MethodGet, "/v2/nvidia/pytorch/manifests/17.12?ns=quay.io")
	if r.status != http.StatusNotFound || errorCode(t, r) != "NAME_UNKNOWN" ||
		!strings.Contains(string(r.body), `ns=\"quay.io\"`) || !strings.Contains(string(r.body), e.up.Host()) {
		t.Errorf("ns=quay.io: %d %s", r.status, r.body)
	}
}
