package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	driver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// breakAfter answers a CDN request that has no Range with the blob's full
// Content-Length, sends n bytes and then breaks the connection.
func breakAfter(w http.ResponseWriter, body []byte, n int) {
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body[:n])
	w.(http.Flusher).Flush()
	panic(http.ErrAbortHandler)
}

// waitFills waits (bounded) until no fill runs: a client has its last
// byte once the content is verified, and the commit follows.
func waitFills(t *testing.T, e *env) {
	t.Helper()
	if !testsupport.Until(5*time.Second, 5*time.Millisecond, func() bool { return e.fills.InFlight() == 0 }) {
		t.Fatal("fills still running after 5 s")
	}
}

// assertCached waits for running fills, then fails unless blob d is
// cached; what says what should have cached it.
func assertCached(t *testing.T, e *env, d digest.Digest, what string) {
	t.Helper()
	waitFills(t, e)
	if _, err := e.store.StatBlob(t.Context(), d); err != nil {
		t.Fatalf("%s: blob %s not cached: %v", what, d, err)
	}
}

func assertNotCached(t *testing.T, e *env, c ngctest.Content) {
	t.Helper()
	waitFills(t, e)
	if _, err := e.store.StatBlob(t.Context(), c.Digest); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("blob %s is in the cache (%v), it must not be", c.Digest, err)
	}
}

// TestResumeAfterBrokenConnection: the CDN connection breaks mid-blob and
// the tokens expire meanwhile; the fill resumes with Range from where it
// was, through a fresh token and a fresh redirect, and the client gets the
// whole, correct blob.
func TestResumeAfterBrokenConnection(t *testing.T) {
	t.Parallel()
	forEachVia(t, testResumeAfterBrokenConnection)
}

func testResumeAfterBrokenConnection(t *testing.T, via string) {
	e := newEnv(t, envOpts{via: via, layerSize: 512 << 10})
	layer := e.fx.Pytorch.Child("linux/amd64").Layers[1]
	var broke atomic.Bool
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if e.up.IsCDN(r) && r.Header.Get("Range") == "" && !broke.Swap(true) {
			e.up.ExpireTokens()
			breakAfter(w, layer.Body, len(layer.Body)/3)
		}
		return false
	})
	path := "/v2/nvidia/pytorch/blobs/" + layer.Digest.String()
	r := e.do(t, http.MethodGet, path)
	mustOK(t, r, 200)
	if !bytes.Equal(r.body, layer.Body) {
		t.Fatalf("resumed blob differs (%d bytes)", len(r.body))
	}
	ranges := e.up.CDNRanges()
	if len(ranges) != 2 || ranges[0] != "" || ranges[1] != "bytes="+strconv.Itoa(len(layer.Body)/3)+"-" {
		t.Fatalf("CDN requests' Range headers: %q", ranges)
	}
	if n := e.up.Count("registry", http.MethodGet, "/authn/token"); n != 0 {
		t.Fatal("resume went to the post-expiry realm")
	}
	assertCached(t, e, layer.Digest, "the resumed fill")
}

// TestResumeGivesUp: a CDN that always breaks makes the fill give up after
// a bounded number of tries; the client sees an aborted transfer, nothing
// is cached, and the next request starts over cleanly.
func TestResumeGivesUp(t *testing.T) {
	t.Parallel()
	// verifyBefore -1: the streaming path of a large blob (headers first).
	e := newEnv(t, envOpts{layerSize: 512 << 10, fill: fill.Options{MaxResumes: 2}, verifyBefore: -1})
	layer := e.fx.CUDA.Layers[1]
	var failing atomic.Bool
	failing.Store(true)
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if e.up.IsCDN(r) && failing.Load() {
			if r.Header.Get("Range") != "" {
				// A resumed request breaks at once too.
				w.Header().Set("Content-Range", "bytes 0-0/1")
				w.Header().Set("Content-Length", "10")
				w.WriteHeader(http.StatusPartialContent)
				w.(http.Flusher).Flush()
				panic(http.ErrAbortHandler)
			}
			breakAfter(w, layer.Body, 1000)
		}
		return false
	})
	path := "/v2/nvidia/cuda/blobs/" + layer.Digest.String()
	r := e.do(t, http.MethodGet, path)
	if r.err == nil {
		t.Fatalf("the client got a clean end (%d, %d bytes) from a failed fill", r.status, len(r.body))
	}
	if n := len(e.up.CDNRanges()); n < 2 || n > 3 {
		t.Fatalf("CDN was asked %d times; want 1 + at most 2 resumes", n)
	}
	assertNotCached(t, e, layer)
	failing.Store(false)
	mustServe(t, e, path, layer.Body) // the next request refetches cleanly
}

// TestHTMLInsteadOfBlob: a proxy's HTML error page with status 200 where a
// blob should be is never served as the blob nor cached: it is refused by
// its Content-Type, answered 502 in the OCI error envelope and counted as
// not_registry.
func TestHTMLInsteadOfBlob(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	m := metrics.New(reg)
	e := newEnv(t, envOpts{fill: fill.Options{Metrics: m}})
	layer := e.fx.CUDA.Layers[0]
	var once atomic.Bool
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if e.up.IsCDN(r) && !once.Swap(true) {
			w.Header().Set("Content-Type", "text/html")
			_, _ = w.Write([]byte("<html><body>Gateway login required</body></html>"))
			return true
		}
		return false
	})
	path := "/v2/nvidia/cuda/blobs/" + layer.Digest.String()
	r := e.do(t, http.MethodGet, path)
	if r.err == nil && r.status == 200 {
		t.Fatalf("HTML page served as a complete blob: %q", r.body)
	}
	if r.status != http.StatusBadGateway || errorCode(t, r) != "UNAVAILABLE" {
		t.Fatalf("HTML page: %d %s, want 502 UNAVAILABLE", r.status, r.body)
	}
	assertNotCached(t, e, layer)
	if got := testutil.ToFloat64(m.FillFailures.WithLabelValues(metrics.ReasonNotRegistry)); got != 1 {
		t.Fatalf("not_registry failures counted: %v", got)
	}
	mustServe(t, e, path, layer.Body) // the next request refetches cleanly
}

// TestChunkedUpstreamStillGetsContentLength: the CDN streams without a
// Content-Length; the mirror takes the size from a HEAD and answers with
// Content-Length.
func TestChunkedUpstreamStillGetsContentLength(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	layer := e.fx.DCGM.Child("linux/arm64").Layers[0]
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if e.up.IsCDN(r) {
			w.Header().Set("Content-Type", "application/octet-stream")
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush() // forces chunked encoding
			_, _ = w.Write(layer.Body)
			return true
		}
		return false
	})
	r := e.do(t, http.MethodGet, "/v2/"+ngctest.DCGMRepo+"/blobs/"+layer.Digest.String())
	mustOK(t, r, 200)
	if r.header.Get("Content-Length") != strconv.Itoa(len(layer.Body)) || !bytes.Equal(r.body, layer.Body) {
		t.Fatalf("Content-Length %q for %d bytes", r.header.Get("Content-Length"), len(layer.Body))
	}
}

// TestRangeAndLateJoinersDuringFill: while a fill is stalled halfway, a late
// client gets headers at once and the bytes so far, a Range inside the
// written part is answered at once, a Range past it waits; all finish with
// the right bytes and the upstream is fetched once.
func TestRangeAndLateJoinersDuringFill(t *testing.T) {
	t.Parallel()
	forEachVia(t, testRangeAndLateJoinersDuringFill)
}

func testRangeAndLateJoinersDuringFill(t *testing.T, via string) {
	// verifyBefore -1: the streaming path of a large blob (headers first).
	e := newEnv(t, envOpts{via: via, layerSize: 1 << 20, verifyBefore: -1})
	layer := e.fx.Pytorch.Child("linux/arm64").Layers[1]
	half := len(layer.Body) / 2
	release := make(chan struct{})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) }) // unblock the CDN if the test fails
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !e.up.IsCDN(r) {
			return false
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(layer.Body)))
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(layer.Body[:half])
		w.(http.Flusher).Flush()
		<-release
		_, _ = w.Write(layer.Body[half:])
		return true
	})
	path := "/v2/nvidia/pytorch/blobs/" + layer.Digest.String()
	type res struct {
		resp *http.Response
		err  error
	}
	get := func(hdr ...string) *http.Response {
		t.Helper()
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, e.url(path), nil)
		if len(hdr) == 2 {
			req.Header.Set(hdr[0], hdr[1])
		}
		ch := make(chan res, 1)
		go func() {
			resp, err := http.DefaultClient.Do(req)
			ch <- res{resp, err}
		}()
		select {
		case r := <-ch:
			if r.err != nil {
				t.Fatal(r.err)
			}
			return r.resp
		case <-time.After(5 * time.Second):
			t.Fatal("response headers did not arrive while the fill was stalled")
		}
		return nil
	}
	first := get()
	defer first.Body.Close()
	// The first client reads the half that exists.
	if _, err := io.ReadFull(first.Body, make([]byte, half-1)); err != nil {
		t.Fatal(err)
	}
	late := get()
	defer late.Body.Close()
	if late.ContentLength != int64(len(layer.Body)) {
		t.Fatalf("late joiner Content-Length %d", late.ContentLength)
	}
	early := get("Range", "bytes=100-199")
	got, err := io.ReadAll(early.Body)
	early.Body.Close()
	if err != nil || early.StatusCode != http.StatusPartialContent || !bytes.Equal(got, layer.Body[100:200]) {
		t.Fatalf("range within the written part: %d %v", early.StatusCode, err)
	}
	tail := get("Range", "bytes="+strconv.Itoa(half+10)+"-")
	if tail.StatusCode != http.StatusPartialContent ||
		tail.Header.Get("Content-Range") != "bytes "+strconv.Itoa(half+10)+"-"+strconv.Itoa(len(layer.Body)-1)+"/"+strconv.Itoa(len(layer.Body)) {
		t.Fatalf("tail range: %d %q", tail.StatusCode, tail.Header.Get("Content-Range"))
	}
	releaseOnce.Do(func() { close(release) })
	var wg sync.WaitGroup
	check := func(name string, body io.ReadCloser, prefix int, want []byte) {
		defer wg.Done()
		defer body.Close()
		rest, err := io.ReadAll(body)
		if err != nil || !bytes.Equal(rest, want[prefix:]) {
			t.Errorf("%s: %v, %d bytes", name, err, len(rest))
		}
	}
	wg.Add(3)
	go check("first", first.Body, half-1, layer.Body)
	go check("late", late.Body, 0, layer.Body)
	go check("tail", tail.Body, 0, layer.Body[half+10:])
	wg.Wait()
	if n := e.up.BlobFetches(layer.Digest); n != 1 {
		t.Fatalf("upstream fetches %d, want 1", n)
	}
}

// enospcDriver fails every upload write with ENOSPC.
type enospcDriver struct{ driver.StorageDriver }

func (d enospcDriver) Writer(ctx context.Context, path string, append bool) (driver.FileWriter, error) {
	fw, err := d.StorageDriver.Writer(ctx, path, append)
	if err != nil {
		return nil, err
	}
	return enospcWriter{fw}, nil
}

type enospcWriter struct{ driver.FileWriter }

func (enospcWriter) Write([]byte) (int, error) { return 0, syscall.ENOSPC }

// TestDiskFullServesFromUpstream: when the cache cannot be written, clients
// still get the verified blob, nothing partial is left, and it is counted.
// When the spool cannot be created either, the blob is served straight from
// the upstream.
func TestDiskFullServesFromUpstream(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	m := metrics.New(reg)
	e := newEnv(t, envOpts{wrap: func(d driver.StorageDriver) driver.StorageDriver { return enospcDriver{d} }, fill: fill.Options{Metrics: m}})
	layer := e.fx.CUDA.Layers[1]
	r := e.do(t, http.MethodGet, "/v2/nvidia/cuda/blobs/"+layer.Digest.String())
	mustOK(t, r, 200)
	if !bytes.Equal(r.body, layer.Body) {
		t.Fatal("blob differs")
	}
	assertNotCached(t, e, layer)
	if got := testutil.ToFloat64(m.FillNotCached); got != 1 {
		t.Fatalf("uncached fills counted: %v", got)
	}
	if entries, err := e.store.Driver().List(t.Context(), mustPath(t, storage.UploadsPath{})); err == nil && len(entries) > 0 {
		t.Fatalf("partial uploads left behind: %v", entries)
	}

	// A local cache that cannot take an upload (here: "_uploads" is a file,
	// not a directory) streams the blob straight from the upstream.
	local := newEnv(t, envOpts{})
	if err := local.store.Driver().PutContent(t.Context(), mustPath(t, storage.UploadsPath{}), []byte("in the way")); err != nil {
		t.Fatal(err)
	}
	layer = local.fx.CUDA.Layers[1]
	r = local.do(t, http.MethodGet, "/v2/nvidia/cuda/blobs/"+layer.Digest.String())
	mustOK(t, r, 200)
	if !bytes.Equal(r.body, layer.Body) {
		t.Fatal("blob served around a broken local cache differs")
	}
	assertNotCached(t, local, layer)

	noSpool := newEnv(t, envOpts{wrap: func(d driver.StorageDriver) driver.StorageDriver { return d }, fill: fill.Options{SpoolDir: "/nonexistent/spool"}})
	layer = noSpool.fx.CUDA.Layers[0]
	r = noSpool.do(t, http.MethodGet, "/v2/nvidia/cuda/blobs/"+layer.Digest.String())
	mustOK(t, r, 200)
	if !bytes.Equal(r.body, layer.Body) || r.header.Get("Content-Length") != strconv.Itoa(len(layer.Body)) {
		t.Fatal("direct blob differs")
	}
	r = noSpool.do(t, http.MethodGet, "/v2/nvidia/cuda/blobs/"+layer.Digest.String(), "Range", "bytes=5-9")
	mustOK(t, r, http.StatusPartialContent)
	if !bytes.Equal(r.body, layer.Body[5:10]) {
		t.Fatal("direct range differs")
	}
}

// TestIdleUpstreamAborts: an upstream that stalls mid-blob is cut off by the
// idle timeout; the client is aborted and nothing is cached.
func TestIdleUpstreamAborts(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	m := metrics.New(reg)
	// verifyBefore -1: the streaming path of a large blob (headers first).
	e := newEnv(t, envOpts{fill: fill.Options{IdleTimeout: 300 * time.Millisecond, MaxResumes: -1, Metrics: m}, verifyBefore: -1})
	layer := e.fx.CUDA.Layers[1]
	stop := make(chan struct{})
	defer close(stop)
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !e.up.IsCDN(r) {
			return false
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(layer.Body)))
		_, _ = w.Write(layer.Body[:100])
		w.(http.Flusher).Flush()
		select {
		case <-stop:
		case <-r.Context().Done():
		}
		return true
	})
	r := e.do(t, http.MethodGet, "/v2/nvidia/cuda/blobs/"+layer.Digest.String())
	if r.err == nil {
		t.Fatalf("stalled fill ended cleanly: %d, %d bytes", r.status, len(r.body))
	}
	assertNotCached(t, e, layer)
	if got := testutil.ToFloat64(m.FillFailures.WithLabelValues(metrics.ReasonIdle)); got != 1 {
		t.Fatalf("idle failures counted: %v", got)
	}
}

// TestStopWithoutClients: with detached fills off, a fill stops when its
// only client leaves, and nothing is cached.
func TestStopWithoutClients(t *testing.T) {
	t.Parallel()
	// verifyBefore -1: the streaming path of a large blob (headers first).
	e := newEnv(t, envOpts{fill: fill.Options{StopWithoutClients: true}, verifyBefore: -1})
	layer := e.fx.CUDA.Layers[1]
	release := make(chan struct{})
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !e.up.IsCDN(r) {
			return false
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(layer.Body)))
		_, _ = w.Write(layer.Body[:100])
		w.(http.Flusher).Flush()
		select {
		case <-release:
			_, _ = w.Write(layer.Body[100:])
		case <-r.Context().Done():
		}
		return true
	})
	ctx, cancel := context.WithCancel(t.Context())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.url("/v2/nvidia/cuda/blobs/"+layer.Digest.String()), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.ReadFull(resp.Body, make([]byte, 50))
	cancel()
	resp.Body.Close()
	waitFills(t, e) // stopped with its only client, before the upstream resumes
	close(release)
	assertNotCached(t, e, layer)
}

// vanishingDriver removes a blob when it is opened and reports it not
// found, as if gc removed it between the cache lookup and the open.
type vanishingDriver struct{ driver.StorageDriver }

func (d vanishingDriver) Reader(ctx context.Context, path string, offset int64) (io.ReadCloser, error) {
	if root, _ := storage.Path(storage.ContentRoot{Kind: storage.KindBlob}); strings.HasPrefix(path, root+"/") {
		_ = d.StorageDriver.Delete(ctx, path)
		return nil, driver.PathNotFoundError{Path: path}
	}
	return d.StorageDriver.Reader(ctx, path, offset)
}

// TestBlobGoneBetweenLookupAndOpen: a cached blob that disappears before it
// is opened is served as a miss (from the upstream), not as an error.
func TestBlobGoneBetweenLookupAndOpen(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{wrap: func(d driver.StorageDriver) driver.StorageDriver { return vanishingDriver{d} }})
	layer := e.fx.CUDA.Layers[0]
	path := "/v2/nvidia/cuda/blobs/" + layer.Digest.String()
	mustOK(t, e.do(t, http.MethodGet, path), 200) // cold: fetched and cached
	waitFills(t, e)
	before := e.up.BlobFetches(layer.Digest)
	r := e.do(t, http.MethodGet, path, "Range", "bytes=0-9") // cached, then gone
	mustOK(t, r, http.StatusPartialContent)
	if e.up.BlobFetches(layer.Digest) != before+1 {
		t.Fatal("the vanished blob was not fetched again")
	}
	if !bytes.Equal(r.body, layer.Body[:10]) || r.header.Get("Content-Range") != "bytes 0-9/"+itoa(len(layer.Body)) {
		t.Fatalf("fallback: %q %q", r.body, r.header.Get("Content-Range"))
	}
}

// mustPath is the cache's driver path of spec.
func mustPath(t *testing.T, spec storage.PathSpec) string {
	t.Helper()
	p, err := storage.Path(spec)
	if err != nil {
		t.Fatal(err)
	}
	return p
}
