package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/state/redistest"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

const secret = "test-secret-0123456789"

// memStore is a cache holding the blobs in it.
type memStore struct{ blobs map[digest.Digest]int64 }

func (m *memStore) StatBlob(_ context.Context, d digest.Digest) (int64, error) {
	if n, ok := m.blobs[d]; ok {
		return n, nil
	}
	return 0, storage.ErrNotFound
}

func newNode(t *testing.T, redisURL, advertise string, hb time.Duration, st Store) (*Node, *metrics.Cluster) {
	t.Helper()
	m := metrics.NewCluster(prometheus.NewRegistry())
	if st == nil {
		st = &memStore{}
	}
	n, err := New(Options{RedisURL: redisURL, Advertise: advertise, Secret: []byte(secret), Heartbeat: hb, Store: st, Metrics: m, Log: slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close() })
	return n, m
}

func runNode(t *testing.T, n *Node) context.CancelFunc {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	n.Join(ctx)
	go func() { defer close(done); n.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return cancel
}

func TestMembership(t *testing.T) {
	t.Parallel()
	r := redistest.Start(t)
	hb := 100 * time.Millisecond
	a, am := newNode(t, r.URL, "http://a:1", hb, nil)
	b, _ := newNode(t, r.URL, "http://b:1", hb, nil)
	c, _ := newNode(t, r.URL, "http://c:1", hb, nil)
	if a.Ready() {
		t.Fatal("ready before joining")
	}
	runNode(t, a)
	stopB := runNode(t, b)
	if !a.Ready() || a.Status() != StatusMember {
		t.Fatalf("status %q after joining", a.Status())
	}
	// c registers once and stops heart-beating (kill -9): it drops out
	// within its 3 heartbeats.
	c.Join(t.Context())
	members := func() string {
		ms, _ := a.Members(t.Context())
		return strings.Join(ms, ",")
	}
	testsupport.Eventually(t, 5*time.Second, "three members", func() bool { return len(strings.Split(members(), ",")) == 3 })
	testsupport.Eventually(t, 5*time.Second, "c to drop out", func() bool { return !strings.Contains(members(), "http://c:1") })
	// A clean shutdown deregisters at once (well before the expiry).
	stopB()
	testsupport.Eventually(t, 5*time.Second, "b to deregister", func() bool { return members() == "http://a:1" })
	testsupport.Eventually(t, 5*time.Second, "the members gauge", func() bool { return testutil.ToFloat64(am.Members) == 1 })
	if testutil.ToFloat64(am.Coordinated) != 1 {
		t.Fatal("coordinated gauge is not 1")
	}
}

func TestRedisUnreachable(t *testing.T) {
	t.Parallel()
	r := redistest.Start(t)
	n, m := newNode(t, r.URL, "http://a:1", 100*time.Millisecond, nil)
	other, _ := newNode(t, r.URL, "http://b:1", 100*time.Millisecond, nil)
	runNode(t, n)
	runNode(t, other)
	testsupport.Eventually(t, 5*time.Second, "two members", func() bool { return testutil.ToFloat64(m.Members) == 2 })
	r.Stop()
	testsupport.Eventually(t, 5*time.Second, "uncoordinated", func() bool { return n.Status() == StatusUncoordinated })
	// The members gauge says what the replica now works with: itself
	// alone, not the last count Redis gave.
	if !n.Ready() || testutil.ToFloat64(m.Coordinated) != 0 || testutil.ToFloat64(m.Members) != 1 {
		t.Fatalf("ready %v, coordinated gauge %v, members gauge %v; want true, 0, 1", n.Ready(), testutil.ToFloat64(m.Coordinated), testutil.ToFloat64(m.Members))
	}
	// A fill goes straight to the upstream.
	var calls atomic.Int32
	up := func(context.Context, int64) (io.ReadCloser, int64, error) {
		calls.Add(1)
		return io.NopCloser(strings.NewReader("x")), 1, nil
	}
	body, _, err := n.Source(digest.FromString("x"), up)(t.Context(), 0)
	if err != nil || calls.Load() != 1 {
		t.Fatalf("source: %v, upstream calls %d", err, calls.Load())
	}
	body.Close()
}

// blobsFunc serves one blob from memory as a peer endpoint would.
type blobsFunc func(ctx context.Context, d digest.Digest, off int64) (io.ReadCloser, int64, func(context.Context) bool, error)

func (f blobsFunc) PeerBlob(ctx context.Context, d digest.Digest, off int64) (io.ReadCloser, int64, func(context.Context) bool, error) {
	return f(ctx, d, off)
}

func serveBlob(data []byte, committed bool, served *atomic.Int32) Blobs {
	dgst := digest.FromBytes(data)
	return blobsFunc(func(_ context.Context, d digest.Digest, off int64) (io.ReadCloser, int64, func(context.Context) bool, error) {
		if d != dgst {
			return nil, 0, nil, storage.ErrNotFound
		}
		served.Add(1)
		return io.NopCloser(bytes.NewReader(data[off:])), int64(len(data)), func(context.Context) bool { return committed }, nil
	})
}

func TestPeerAuthentication(t *testing.T) {
	t.Parallel()
	data := []byte("peer blob bytes")
	dgst := digest.FromBytes(data)
	var served atomic.Int32
	srv := httptest.NewServer(NewServer([]byte(secret), serveBlob(data, true, &served), nil, nil))
	defer srv.Close()
	path := PeerPrefix + dgst.String()
	now := time.Now().Unix()
	for name, auth := range map[string]string{
		"none":         "",
		"bearer":       "Bearer " + secret,
		"wrong secret": fmt.Sprintf("%s %d:%s", authScheme, now, sign([]byte("another-secret-0123"), "GET", path, now)),
		"other path":   fmt.Sprintf("%s %d:%s", authScheme, now, sign([]byte(secret), "GET", PeerPrefix+digest.FromString("y").String(), now)),
		"stale":        fmt.Sprintf("%s %d:%s", authScheme, now-120, sign([]byte(secret), "GET", path, now-120)),
	} {
		req, _ := http.NewRequest(http.MethodGet, srv.URL+path, nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || bytes.Contains(b, data) {
			t.Errorf("%s: status %d, want 401 without the blob", name, resp.StatusCode)
		}
	}
	if served.Load() != 0 {
		t.Fatalf("blob served %d times to unauthenticated requests", served.Load())
	}
	// Signed: the blob from an offset, its size, and the commit trailer.
	p := NewPeer([]byte(secret), nil, nil)
	body, size, committed, err := p.Get(t.Context(), srv.URL, dgst, 5)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(body)
	if size != int64(len(data)) || !bytes.Equal(got, data[5:]) || !committed(t.Context()) {
		t.Fatalf("got %q (size %d), want %q (size %d) committed", got, size, data[5:], len(data))
	}
	body.Close()
	if _, _, _, err := p.Get(t.Context(), srv.URL, digest.FromString("absent"), 0); !errors.Is(err, ErrNotServed) {
		t.Fatalf("absent blob: %v, want ErrNotServed", err)
	}
}

// TestLeaseOwnerAndRelay: the first fill owns the blob and fetches from
// the upstream; a second replica streams it from the owner's peer
// endpoint (a relay); the lease goes at Close; after the commit another
// miss reads the cache (fill.ErrCached).
func TestLeaseOwnerAndRelay(t *testing.T) {
	t.Parallel()
	r := redistest.Start(t)
	data := bytes.Repeat([]byte("layer "), 1000)
	dgst := digest.FromBytes(data)
	var served atomic.Int32
	peerA := httptest.NewServer(NewServer([]byte(secret), serveBlob(data, true, &served), nil, nil))
	defer peerA.Close()
	hb := 400 * time.Millisecond // lease 1.2 s: several heartbeats may run late on a loaded machine
	shared := &memStore{blobs: map[digest.Digest]int64{}}
	a, am := newNode(t, r.URL, peerA.URL, hb, shared)
	b, bm := newNode(t, r.URL, "http://127.0.0.1:1", hb, shared)
	runNode(t, a)
	runNode(t, b)
	var upCalls atomic.Int32
	up := func(_ context.Context, off int64) (io.ReadCloser, int64, error) {
		upCalls.Add(1)
		return io.NopCloser(bytes.NewReader(data[off:])), int64(len(data)), nil
	}
	ownerBody, _, err := a.Source(dgst, up)(t.Context(), 0)
	if err != nil || upCalls.Load() != 1 || testutil.ToFloat64(am.FillsOwned) != 1 {
		t.Fatalf("owner: %v, upstream calls %d", err, upCalls.Load())
	}
	// The lease outlives several heartbeats while the fill runs.
	time.Sleep(4 * hb) // longer than the lease: only its refresh keeps it
	var relayed atomic.Bool
	relaySrc := b.Source(dgst, up)
	ctx := context.Background()
	var size int64
	// Through a real fill on b, which must relay.
	g := fill.NewGroup(&fsStore{memStore: shared}, fill.Options{SpoolDir: t.TempDir()})
	f, _, err := g.JoinMissed("", dgst, g.Seq(), func(ctx context.Context, off int64) (io.ReadCloser, int64, error) {
		rc, n, err := relaySrc(ctx, off)
		relayed.Store(true)
		return rc, n, err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Release()
	if size, err = f.Wait(ctx); err != nil || size != int64(len(data)) {
		t.Fatalf("relay fill: size %d, %v (upstream calls %d, served %d)", size, err, upCalls.Load(), served.Load())
	}
	got, err := io.ReadAll(f.NewReader(ctx, 0, size))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("relay read: %d bytes, %v", len(got), err)
	}
	if upCalls.Load() != 1 || served.Load() != 1 || !relayed.Load() {
		t.Fatalf("upstream calls %d, peer serves %d; want 1, 1", upCalls.Load(), served.Load())
	}
	if err := f.Done(ctx); err != nil {
		t.Fatal(err)
	}
	if testutil.ToFloat64(bm.PeerBlobs.WithLabelValues("ok")) != 1 || testutil.ToFloat64(bm.PeerBytes.WithLabelValues("in")) != float64(len(data)) {
		t.Fatalf("peer metrics: blobs ok %v, bytes in %v", testutil.ToFloat64(bm.PeerBlobs.WithLabelValues("ok")), testutil.ToFloat64(bm.PeerBytes.WithLabelValues("in")))
	}
	// The owner commits and closes its body: the lease goes; the next
	// miss anywhere finds the blob in the shared cache.
	shared.blobs[dgst] = int64(len(data))
	ownerBody.Close()
	if _, _, err := b.Source(dgst, up)(ctx, 0); !errors.Is(err, fill.ErrCached) {
		t.Fatalf("after the commit: %v, want fill.ErrCached", err)
	}
	if upCalls.Load() != 1 {
		t.Fatalf("upstream calls %d after the commit, want 1", upCalls.Load())
	}
}

// fsStore adds what a fill needs (uploads) to memStore; a relay whose
// owner committed never creates one.
type fsStore struct{ *memStore }

func (s *fsStore) CreateBlob(context.Context, digest.Digest, int64) (*storage.BlobWriter, error) {
	return nil, errors.New("test: a relay must not upload")
}

// TestTakeoverFromDeadOwner: the owner holds the lease and stops
// heart-beating (kill -9); a source waiting on it takes the lease once the
// owner's membership expires and resumes from the upstream at its offset.
func TestTakeoverFromDeadOwner(t *testing.T) {
	t.Parallel()
	r := redistest.Start(t)
	hb := 100 * time.Millisecond
	shared := &memStore{blobs: map[digest.Digest]int64{}}
	dead, _ := newNode(t, r.URL, "http://127.0.0.1:1", hb, shared) // nothing listens there
	b, bm := newNode(t, r.URL, "http://b:1", hb, shared)
	dead.Join(t.Context())
	runNode(t, b)
	data := bytes.Repeat([]byte("z"), 4096)
	dgst := digest.FromBytes(data)
	var offs []int64
	up := func(_ context.Context, off int64) (io.ReadCloser, int64, error) {
		offs = append(offs, off)
		return io.NopCloser(bytes.NewReader(data[off:])), int64(len(data)), nil
	}
	if _, _, err := dead.Source(dgst, up)(t.Context(), 0); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	body, _, err := b.Source(dgst, up)(ctx, 1000)
	if err != nil {
		t.Fatal(err)
	}
	body.Close()
	if len(offs) != 2 || offs[1] != 1000 || testutil.ToFloat64(bm.FillsOwned) != 1 {
		t.Fatalf("upstream offsets %v, fills owned %v; want [0 1000], 1", offs, testutil.ToFloat64(bm.FillsOwned))
	}
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// TestRestartNeverAsksItself: a replica restarted under the same
// advertise URL finds a lease of its previous run; it never sends a peer
// request to itself (it would wait on its own fill) and takes the lease
// once the previous run's membership expired.
func TestRestartNeverAsksItself(t *testing.T) {
	t.Parallel()
	r := redistest.Start(t)
	var asked atomic.Int32
	self := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { asked.Add(1); w.WriteHeader(http.StatusNotFound) }))
	defer self.Close()
	hb := 100 * time.Millisecond
	shared := &memStore{blobs: map[digest.Digest]int64{}}
	before, _ := newNode(t, r.URL, self.URL, hb, shared)
	after, m := newNode(t, r.URL, self.URL, hb, shared)
	before.Join(t.Context())
	data := []byte("restarted")
	dgst := digest.FromBytes(data)
	up := func(_ context.Context, off int64) (io.ReadCloser, int64, error) {
		return io.NopCloser(bytes.NewReader(data[off:])), int64(len(data)), nil
	}
	if _, _, err := before.Source(dgst, up)(t.Context(), 0); err != nil { // then "killed"
		t.Fatal(err)
	}
	runNode(t, after)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	body, _, err := after.Source(dgst, up)(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	body.Close()
	if asked.Load() != 0 || testutil.ToFloat64(m.FillsOwned) != 1 {
		t.Fatalf("peer requests to itself: %d, fills owned %v; want 0, 1", asked.Load(), testutil.ToFloat64(m.FillsOwned))
	}
}

// TestRelayOverIPv6: replicas that advertise IPv6 peer URLs
// (http://[::1]:port, on an IPv6 loopback listener) are members under
// those URLs and relay a blob between them: nothing builds a host:port
// that loses the brackets.
func TestRelayOverIPv6(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback on this machine (%v): the IPv6 peer URLs are not tested here", err)
	}
	r := redistest.Start(t)
	data := bytes.Repeat([]byte("v6 layer "), 1000)
	dgst := digest.FromBytes(data)
	var served atomic.Int32
	peerA := &httptest.Server{Listener: ln, Config: &http.Server{Handler: NewServer([]byte(secret), serveBlob(data, false, &served), nil, nil)}}
	peerA.Start()
	defer peerA.Close()
	if !strings.HasPrefix(peerA.URL, "http://[::1]:") {
		t.Fatalf("peer URL %s", peerA.URL)
	}
	hb := 400 * time.Millisecond
	shared := &memStore{blobs: map[digest.Digest]int64{}}
	a, _ := newNode(t, r.URL, peerA.URL, hb, shared)
	b, bm := newNode(t, r.URL, "http://[::1]:1", hb, shared)
	runNode(t, a)
	runNode(t, b)
	members, err := b.Members(t.Context())
	if err != nil || !slices.Contains(members, peerA.URL) || !slices.Contains(members, "http://[::1]:1") {
		t.Fatalf("members %q, %v; want both IPv6 URLs", members, err)
	}
	var upCalls atomic.Int32
	up := func(_ context.Context, off int64) (io.ReadCloser, int64, error) {
		upCalls.Add(1)
		return io.NopCloser(bytes.NewReader(data[off:])), int64(len(data)), nil
	}
	ownerBody, _, err := a.Source(dgst, up)(t.Context(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ownerBody.Close()
	body, size, err := b.Source(dgst, up)(t.Context(), 0)
	if err != nil {
		t.Fatalf("relay from %s: %v", peerA.URL, err)
	}
	got, err := io.ReadAll(body)
	body.Close()
	if err != nil || size != int64(len(data)) || !bytes.Equal(got, data) {
		t.Fatalf("relayed %d of %d bytes (size %d): %v", len(got), len(data), size, err)
	}
	if upCalls.Load() != 1 || served.Load() != 1 || testutil.ToFloat64(bm.PeerBlobs.WithLabelValues("ok")) != 1 {
		t.Fatalf("upstream calls %d, peer serves %d, peer blobs ok %v; want 1, 1, 1", upCalls.Load(), served.Load(), testutil.ToFloat64(bm.PeerBlobs.WithLabelValues("ok")))
	}
}
