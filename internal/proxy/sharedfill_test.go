package proxy_test

import (
	"bytes"
	"crypto/rand"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/access"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// sharedBlob is a blob with the same digest (so the same bytes) on both
// upstreams of e: the default's repositories nvidia/a and nvidia/b, the
// second's org/b.
func sharedBlob(t *testing.T, e *env) ngctest.Content {
	t.Helper()
	body := make([]byte, 256<<10)
	_, _ = rand.Read(body)
	c := ngctest.Content{MediaType: "application/octet-stream", Digest: digest.FromBytes(body), Body: body}
	e.up.AddBlob("nvidia/a", c)
	e.up.AddBlob("nvidia/b", c)
	e.up2.AddBlob("org/b", c)
	return c
}

// holdThen is a fault for u that holds the first registry GET of blob d
// under a repository fails matches (all when nil) until release is
// closed, signalling arrived when it holds it; from then on every such GET
// is answered by fail. Other requests are served as usual.
func holdThen(u *ngctest.Upstream, d digest.Digest, fails func(path string) bool, fail func(http.ResponseWriter, *http.Request) bool) (arrived, release chan struct{}) {
	arrived, release = make(chan struct{}), make(chan struct{})
	var once sync.Once
	u.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if u.IsCDN(r) || r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, "/blobs/"+d.String()) {
			return false
		}
		if fails != nil && !fails(r.URL.Path) {
			return false
		}
		once.Do(func() {
			close(arrived)
			<-release
		})
		return fail(w, r)
	})
	return arrived, release
}

// registryBlobGETs counts the GETs of blob d u's registry listener
// received (under any repository; a 404 there never reaches the CDN).
func registryBlobGETs(u *ngctest.Upstream, d digest.Digest) int {
	n := 0
	for _, r := range u.Requests() {
		if r.Host == "registry" && r.Method == http.MethodGet && strings.HasSuffix(r.Path, "/blobs/"+d.String()) {
			n++
		}
	}
	return n
}

// TestSharedFillFailureOfAnotherSource: a blob fill is shared by digest,
// so a client of one repository joins the fill another repository's
// client started. When that fill fails for a reason of the other's source
// (another upstream's 404, 401 or outage; a not found of another
// repository on the same upstream), the joined client is served from its
// own source (one more fetch, by it); an outage of its own upstream is
// not retried (one fetch for everyone).
func TestSharedFillFailureOfAnotherSource(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		// first and joiner are the repositories (paths after /v2/) the
		// two clients ask the blob of.
		first, joiner string
		fails         func(path string) bool
		fail          func(http.ResponseWriter, *http.Request) bool
		// retried: the joiner is served (by its own source); otherwise it
		// gets the first's error and the default upstream saw one GET.
		retried bool
	}{
		{"other upstream 404", "nvidia/a", second + "/org/b", nil, ngctest.FailWith(http.StatusNotFound), true},
		{"other upstream 401", "nvidia/a", second + "/org/b", nil, ngctest.FailWith(http.StatusUnauthorized), true},
		{"other upstream offline", "nvidia/a", second + "/org/b", nil, ngctest.Offline, true},
		{"other upstream 503", "nvidia/a", second + "/org/b", nil, ngctest.FailWith(http.StatusServiceUnavailable), true},
		{"same upstream, other repository 404", "nvidia/a", "nvidia/b",
			func(p string) bool { return strings.HasPrefix(p, "/v2/nvidia/a/") }, ngctest.FailWith(http.StatusNotFound), true},
		{"same upstream outage", "nvidia/a", "nvidia/b", nil, ngctest.FailWith(http.StatusServiceUnavailable), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, envOpts{second: second})
			c := sharedBlob(t, e)
			arrived, release := holdThen(e.up, c.Digest, tc.fails, tc.fail)
			var wg sync.WaitGroup
			var r1, r2 result
			wg.Add(2)
			go func() { defer wg.Done(); r1 = e.do(t, http.MethodGet, "/v2/"+tc.first+"/blobs/"+c.Digest.String()) }()
			select {
			case <-arrived:
			case <-time.After(10 * time.Second):
				close(release)
				t.Fatal("the first client's fill never reached the upstream")
			}
			go func() { defer wg.Done(); r2 = e.do(t, http.MethodGet, "/v2/"+tc.joiner+"/blobs/"+c.Digest.String()) }()
			joined := testsupport.Until(10*time.Second, 5*time.Millisecond, func() bool { return e.fills.Clients(c.Digest) == 2 })
			close(release)
			wg.Wait()
			if !joined {
				t.Fatal("the second client never joined the running fill")
			}
			if r1.err == nil && r1.status == http.StatusOK {
				t.Fatalf("the first client was served although its upstream failed")
			}
			if !tc.retried {
				if r2.err == nil && r2.status == http.StatusOK {
					t.Fatal("the joiner was served although its own upstream is failing")
				}
				if n := registryBlobGETs(e.up, c.Digest); n != 1 {
					t.Fatalf("the failing upstream saw %d blob GETs, want 1 (no retry into its own outage)", n)
				}
				return
			}
			if r2.err != nil || r2.status != http.StatusOK || !bytes.Equal(r2.body, c.Body) {
				t.Fatalf("the joiner got %d %q (%v), want its own source's blob", r2.status, truncate(r2.body), r2.err)
			}
			src := e.up
			if strings.HasPrefix(tc.joiner, second+"/") {
				src = e.up2
			}
			if n := src.BlobFetches(c.Digest); n != 1 {
				t.Fatalf("the joiner's upstream served the blob %d times, want 1", n)
			}
			waitFills(t, e)
			assertCached(t, e, c.Digest, "the joiner's fill")
		})
	}
}

// TestSharedFillSucceedsOnce is the control: a client of another upstream
// joining a fill that succeeds is served from it, and its own upstream
// sees no blob request.
func TestSharedFillSucceedsOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{second: second})
	c := sharedBlob(t, e)
	arrived, release := holdThen(e.up, c.Digest, nil, func(http.ResponseWriter, *http.Request) bool { return false })
	var wg sync.WaitGroup
	var r1, r2 result
	wg.Add(2)
	go func() { defer wg.Done(); r1 = e.do(t, http.MethodGet, "/v2/nvidia/a/blobs/"+c.Digest.String()) }()
	<-arrived
	go func() { defer wg.Done(); r2 = e.do(t, http.MethodGet, "/v2/"+second+"/org/b/blobs/"+c.Digest.String()) }()
	joined := testsupport.Until(10*time.Second, 5*time.Millisecond, func() bool { return e.fills.Clients(c.Digest) == 2 })
	close(release)
	wg.Wait()
	if !joined {
		t.Fatal("the second client never joined the running fill")
	}
	for i, r := range []result{r1, r2} {
		if r.err != nil || r.status != http.StatusOK || !bytes.Equal(r.body, c.Body) {
			t.Fatalf("client %d: %d (%v)", i+1, r.status, r.err)
		}
	}
	if n := registryBlobGETs(e.up2, c.Digest); n != 0 {
		t.Fatalf("the joiner's upstream saw %d blob GETs, want 0 (one fetch per blob)", n)
	}
}

// TestRunningFillNotSharedAcrossAccess: a client allowed only on the second
// upstream learns nothing of a blob the default's private repository is
// filling: asked through a repository of its own upstream that does not
// hold it, the answer is 404 BLOB_UNKNOWN without joining the fill, and
// the same once the blob is cached.
func TestRunningFillNotSharedAcrossAccess(t *testing.T) {
	t.Parallel()
	pol := policy(t, access.Config{
		Mode:             access.ModeHtpasswd,
		HtpasswdFile:     ngctest.WriteHtpasswd(t, "alice", "alice-pw", "bob", "bob-pw"),
		PublicNamespaces: []string{second},
		Rules:            []access.Rule{{Repositories: []string{"myorg/**"}, Users: []string{"alice"}}},
	}, nil)
	e := newEnv(t, envOpts{second: second, key: ngctest.APIKey, access: pol})
	layer := e.fx.Private.Layers[0]
	// The private manifest links its layer, as a real pull does.
	mustOK(t, e.doAs(t, "alice", "alice-pw", http.MethodGet, "/v2/"+ngctest.PrivateRepo+"/manifests/"+ngctest.PrivateTag), 200)
	arrived, release := holdThen(e.up, layer.Digest, nil, func(http.ResponseWriter, *http.Request) bool { return false })
	var wg sync.WaitGroup
	var ra result
	wg.Add(1)
	go func() {
		defer wg.Done()
		ra = e.doAs(t, "alice", "alice-pw", http.MethodGet, "/v2/"+ngctest.PrivateRepo+"/blobs/"+layer.Digest.String())
	}()
	<-arrived
	bobAsks := func(when string) {
		t.Helper()
		for _, m := range []string{http.MethodGet, http.MethodHead} {
			r := e.doAs(t, "bob", "bob-pw", m, "/v2/"+second+"/"+ngctest.CUDARepo+"/blobs/"+layer.Digest.String())
			if r.status != http.StatusNotFound {
				t.Errorf("%s: bob's %s of the private layer through %s: %d %q, want 404", when, m, second, r.status, truncate(r.body))
			}
		}
	}
	bobAsks("during the fill")
	if n := e.fills.Clients(layer.Digest); n != 1 {
		t.Errorf("the fill has %d clients, want alice's only", n)
	}
	close(release)
	wg.Wait()
	mustOK(t, ra, 200)
	waitFills(t, e)
	bobAsks("once cached")
}

func truncate(b []byte) []byte {
	if len(b) > 200 {
		return b[:200]
	}
	return b
}

// TestSharedFillBreaksMidStream: the other upstream's fill sends its
// headers and half the blob, so the joiner has its size and waits for the
// (small) blob to verify before it answers; then that upstream goes away
// (the connection breaks, the resume finds it offline). The joiner is
// still served from its own upstream: nothing was sent to it yet.
func TestSharedFillBreaksMidStream(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{second: second})
	c := sharedBlob(t, e)
	half, release := make(chan struct{}), make(chan struct{})
	var cdnGETs atomic.Int32
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, "/blobs/"+c.Digest.String()) {
			return false
		}
		if !e.up.IsCDN(r) {
			if r.Header.Get("Range") == "" {
				return false // the first registry GET: its 307 to the CDN
			}
			return ngctest.Offline(w, r) // the resume
		}
		if cdnGETs.Add(1) > 1 {
			return ngctest.Offline(w, r)
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(c.Body)))
		_, _ = w.Write(c.Body[:len(c.Body)/2])
		w.(http.Flusher).Flush()
		close(half)
		<-release
		return true // short: the connection ends before Content-Length
	})
	var wg sync.WaitGroup
	var r1, r2 result
	wg.Add(2)
	go func() { defer wg.Done(); r1 = e.do(t, http.MethodGet, "/v2/nvidia/a/blobs/"+c.Digest.String()) }()
	select {
	case <-half:
	case <-time.After(10 * time.Second):
		close(release)
		t.Fatal("the first client's fill never reached the CDN")
	}
	go func() {
		defer wg.Done()
		r2 = e.do(t, http.MethodGet, "/v2/"+second+"/org/b/blobs/"+c.Digest.String())
	}()
	joined := testsupport.Until(10*time.Second, 5*time.Millisecond, func() bool { return e.fills.Clients(c.Digest) == 2 })
	close(release)
	wg.Wait()
	if !joined {
		t.Fatal("the second client never joined the running fill")
	}
	if r1.err == nil && r1.status == http.StatusOK && bytes.Equal(r1.body, c.Body) {
		t.Fatal("the first client got the whole blob although its upstream broke off")
	}
	if r2.err != nil || r2.status != http.StatusOK || !bytes.Equal(r2.body, c.Body) {
		t.Fatalf("the joiner got %d %q (%v), want its own upstream's blob", r2.status, truncate(r2.body), r2.err)
	}
	if n := e.up2.BlobFetches(c.Digest); n != 1 {
		t.Fatalf("the joiner's upstream served the blob %d times, want 1", n)
	}
	waitFills(t, e)
	assertCached(t, e, c.Digest, "the joiner's fill")
}
