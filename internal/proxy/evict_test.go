package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ngc-mirror/ngc-mirror/internal/access"
	"github.com/ngc-mirror/ngc-mirror/internal/evict"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

func sizeOf(cs ...ngctest.Content) int64 {
	var n int64
	for _, c := range cs {
		n += int64(len(c.Body))
	}
	return n
}

// manifestGets counts upstream manifest GETs of repo.
func manifestGets(up *ngctest.Upstream, repo string) int {
	n := 0
	for _, r := range up.Requests() {
		if r.Host == "registry" && r.Method == http.MethodGet && strings.HasPrefix(r.Path, "/v2/"+repo+"/manifests/") {
			n++
		}
	}
	return n
}

// pullImage pulls repo:tag like a node: the tag, the amd64 child when it
// is an index, then every blob of that image; it checks every byte.
func pullImage(t *testing.T, e *env, repo, tag string, im *ngctest.Image) *ngctest.Image {
	t.Helper()
	mustServe(t, e, "/v2/"+repo+"/manifests/"+tag, im.Manifest.Body)
	if c := im.Child("linux/amd64"); c != nil {
		im = c
		mustServe(t, e, "/v2/"+repo+"/manifests/"+im.Manifest.Digest.String(), im.Manifest.Body)
	}
	for _, b := range im.Blobs() {
		mustServe(t, e, "/v2/"+repo+"/blobs/"+b.Digest.String(), b.Body)
	}
	waitFills(t, e)
	return im
}

// TestEvictedImageComesBack: under a budget that holds one image, pulling
// image B evicts image A's blobs (least recently used); pulling A again
// works: its manifests come from the cache, its evicted blobs are fetched
// again on demand, once each. With an access policy, A's repository links
// survive the eviction.
func TestEvictedImageComesBack(t *testing.T) {
	t.Parallel()
	forEachVia(t, testEvictedImageComesBack)
}

func testEvictedImageComesBack(t *testing.T, via string) {
	for _, withPolicy := range []bool{false, true} {
		t.Run(fmt.Sprintf("access=%v", withPolicy), func(t *testing.T) {
			t.Parallel()
			o := envOpts{layerSize: 256 << 10, budget: func(fx *ngctest.Fixture) evict.Options {
				a := fx.DCGM.Child("linux/amd64")
				// B (CUDA) and every manifest fit under the low-water
				// mark; A and B together do not fit.
				room := sizeOf(fx.CUDA.Blobs()...) + 32<<10
				if sizeOf(a.Blobs()...)+room < int64(float64(room)/0.9)+64<<10 {
					panic("fixture too small for the test")
				}
				return evict.Options{MaxSize: int64(float64(room) / 0.9)}
			}}
			if withPolicy {
				o.access = policy(t, access.Config{Mode: access.ModeNone, PublicNamespaces: []string{"nvidia"}}, nil)
			}
			e := newEnv(t, o)
			a := pullImage(t, e, ngctest.DCGMRepo, ngctest.DCGMTag, e.fx.DCGM)
			pullImage(t, e, ngctest.CUDARepo, ngctest.CUDATag, e.fx.CUDA)
			if used := e.evictor.Used(); used > int64(float64(sizeOf(e.fx.CUDA.Blobs()...)+32<<10)/0.9) {
				t.Fatalf("cache holds %d bytes, over its budget", used)
			}
			var evicted []ngctest.Content
			for _, b := range a.Blobs() {
				if _, err := e.store.StatBlob(t.Context(), b.Digest); errors.Is(err, storage.ErrNotFound) {
					evicted = append(evicted, b)
				}
			}
			if len(evicted) == 0 {
				t.Fatal("pulling B evicted none of A's blobs")
			}
			for _, b := range e.fx.CUDA.Blobs() {
				if _, err := e.store.StatBlob(t.Context(), b.Digest); err != nil {
					t.Fatalf("B's blob %s evicted while B was the most recent: %v", b.Digest, err)
				}
			}
			before := manifestGets(e.up, ngctest.DCGMRepo)
			pullImage(t, e, ngctest.DCGMRepo, ngctest.DCGMTag, e.fx.DCGM)
			if n := manifestGets(e.up, ngctest.DCGMRepo); n != before {
				t.Errorf("A's manifests were fetched again (%d upstream GETs, %d before): they should have stayed cached", n, before)
			}
			for _, b := range a.Blobs() {
				want := 1
				if slicesContains(evicted, b) {
					want = 2
				}
				if n := e.up.BlobFetches(b.Digest); n != want {
					t.Errorf("blob %s fetched %d times, want %d", b.Digest, n, want)
				}
			}
		})
	}
}

func slicesContains(cs []ngctest.Content, c ngctest.Content) bool {
	for _, x := range cs {
		if x.Digest == c.Digest {
			return true
		}
	}
	return false
}

// TestCacheFullServesUncached: when everything cached is pinned and a new
// blob does not fit, the blob is still served, byte for byte, straight
// from the upstream; it is not cached, and the cache-full metric counts it.
func TestCacheFullServesUncached(t *testing.T) {
	t.Parallel()
	forEachVia(t, testCacheFullServesUncached)
}

func testCacheFullServesUncached(t *testing.T, via string) {
	reg := prometheus.NewRegistry()
	em := metrics.NewEviction(reg)
	m := metrics.New(reg)
	e := newEnv(t, envOpts{via: via, layerSize: 256 << 10, metrics: m, budget: func(fx *ngctest.Fixture) evict.Options {
		return evict.Options{
			MaxSize: sizeOf(fx.CUDA.Blobs()...) + 16<<10, // CUDA and its manifest, not one layer more
			Pins:    []evict.Pin{{Repository: ngctest.CUDARepo, Tag: ngctest.CUDATag}},
			Metrics: em,
		}
	}})
	pullImage(t, e, ngctest.CUDARepo, ngctest.CUDATag, e.fx.CUDA)
	if n := testutil.ToFloat64(em.Full); n != 0 {
		t.Fatalf("cache full %v times while the pinned image fit", n)
	}
	layer := e.fx.DCGM.Child("linux/amd64").Layers[0]
	path := "/v2/" + ngctest.DCGMRepo + "/blobs/" + layer.Digest.String()
	for i := 1; i <= 2; i++ {
		mustServe(t, e, path, layer.Body)
		assertNotCached(t, e, layer) // over a full budget
		if n := testutil.ToFloat64(em.Full); n != float64(i) {
			t.Fatalf("cache full metric %v after %d pulls", n, i)
		}
	}
	// A Range request is answered from the upstream as well.
	r := e.do(t, http.MethodGet, path, "Range", "bytes=10-19")
	mustOK(t, r, http.StatusPartialContent)
	if !bytes.Equal(r.body, layer.Body[10:20]) {
		t.Fatal("range of an uncached blob differs")
	}
	// The pinned image stays whole and is still served from the cache.
	for _, b := range e.fx.CUDA.Blobs() {
		if _, err := e.store.StatBlob(t.Context(), b.Digest); err != nil {
			t.Fatalf("pinned blob %s: %v", b.Digest, err)
		}
	}
	if got := testutil.ToFloat64(m.FillFailures.WithLabelValues(metrics.ReasonDisk)); got != 0 {
		t.Fatalf("a refused blob counted as a disk failure (%v)", got)
	}
}

// TestCachePurgedDuringConcurrentPulls: many clients pull images over
// loopback HTTP while their content is removed under them, again and
// again: by `mirror gc` (storage.GC with no grace period; blobs pulled
// without their manifest are garbage to it) or by eviction under a budget
// far below what the clients pull. Every pull must get the right bytes,
// on the filesystem and on S3 (where a blob removed during a read would
// break it: the proxy's leases keep eviction off blobs being served).
func TestCachePurgedDuringConcurrentPulls(t *testing.T) {
	t.Parallel()
	forEachVia(t, testCachePurgedDuringConcurrentPulls)
}

func testCachePurgedDuringConcurrentPulls(t *testing.T, via string) {
	for _, tc := range []struct {
		name    string
		s3      bool
		byEvict bool
	}{
		{"gc/filesystem", false, false},
		{"gc/s3", true, false},
		{"evict/filesystem", false, true},
		{"evict/s3", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			o := envOpts{s3: tc.s3, layerSize: 96 << 10}
			em := metrics.NewEviction(prometheus.NewRegistry())
			if tc.byEvict {
				o.budget = func(fx *ngctest.Fixture) evict.Options {
					// Half of what the clients pull.
					all := append(append(fx.Pytorch.Blobs(), fx.CUDA.Blobs()...), fx.DCGM.Blobs()...)
					return evict.Options{MaxSize: sizeOf(all...) / 2, AdmitTimeout: 2 * time.Second, Metrics: em}
				}
			}
			e := newEnv(t, o)
			type item struct {
				path string
				body []byte
			}
			var items []item
			add := func(repo string, withManifests bool, im *ngctest.Image) {
				if withManifests {
					items = append(items, item{"/v2/" + repo + "/manifests/" + im.Manifest.Digest.String(), im.Manifest.Body})
					for _, c := range im.Children {
						items = append(items, item{"/v2/" + repo + "/manifests/" + c.Manifest.Digest.String(), c.Manifest.Body})
					}
				}
				for _, b := range im.Blobs() {
					items = append(items, item{"/v2/" + repo + "/blobs/" + b.Digest.String(), b.Body})
				}
			}
			add(ngctest.PytorchRepo, true, e.fx.Pytorch)
			add(ngctest.CUDARepo, true, e.fx.CUDA)
			add(ngctest.DCGMRepo, false, e.fx.DCGM) // blobs only: unreferenced

			ctx, stop := context.WithCancel(t.Context())
			var purged, passes atomic.Int64
			var purger sync.WaitGroup
			purger.Add(1)
			go func() {
				defer purger.Done()
				for ctx.Err() == nil {
					if tc.byEvict {
						// Passes also run when a fill finds no room.
						if _, err := e.evictor.Evict(ctx); err != nil && ctx.Err() == nil {
							t.Errorf("eviction pass: %v", err)
						}
						purged.Store(int64(testutil.ToFloat64(em.EvictedObjects.WithLabelValues("blob"))))
					} else {
						res, err := e.store.GC(ctx, 0, false)
						if err != nil && ctx.Err() == nil {
							t.Errorf("gc: %v", err)
						}
						purged.Add(int64(res.Blobs))
					}
					passes.Add(1)
					time.Sleep(2 * time.Millisecond)
				}
			}()

			const clients, rounds = 12, 4
			var wg sync.WaitGroup
			var failures atomic.Int64
			for c := range clients {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(c), 1))
					for range rounds {
						order := r.Perm(len(items))
						for _, i := range order {
							it := items[i]
							got := e.do(t, http.MethodGet, it.path)
							if got.err != nil || got.status != 200 || !bytes.Equal(got.body, it.body) {
								if failures.Add(1) <= 5 {
									t.Errorf("client %d: GET %s: status %d, %d bytes (want %d), err %v, body %.200q",
										c, it.path, got.status, len(got.body), len(it.body), got.err, got.body)
								}
							}
						}
					}
				}()
			}
			wg.Wait()
			stop()
			purger.Wait()
			if failures.Load() > 0 {
				t.Fatalf("%d of %d pulls failed", failures.Load(), clients*rounds*len(items))
			}
			if purged.Load() == 0 {
				t.Fatalf("%d passes removed nothing: the test exercised no removal", passes.Load())
			}
			t.Logf("%d pulls, %d passes removed %d blobs", clients*rounds*len(items), passes.Load(), purged.Load())
		})
	}
}

// fakeTracker records what the proxy tells a CacheTracker.
type fakeTracker struct {
	mu       sync.Mutex
	touches  map[storage.Kind]int
	active   map[digest.Digest]int
	leases   int
	releases int
}

func (f *fakeTracker) Touch(kind storage.Kind, d digest.Digest) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.touches[kind]++
}

func (f *fakeTracker) Lease(ctx context.Context, d digest.Digest) (func(), error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.leases++
	f.active[d]++
	return func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.releases++
		f.active[d]--
	}, nil
}

func (f *fakeTracker) activeLeases(d digest.Digest) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.active[d]
}

// TestProxyLeasesAndTouches: a blob GET holds a lease on the blob while
// it is fetched and served, released when the response ends; HEAD takes
// none; cache hits of blobs and manifests are touched.
func TestProxyLeasesAndTouches(t *testing.T) {
	t.Parallel()
	forEachVia(t, testProxyLeasesAndTouches)
}

func testProxyLeasesAndTouches(t *testing.T, via string) {
	ft := &fakeTracker{touches: map[storage.Kind]int{}, active: map[digest.Digest]int{}}
	e := newEnv(t, envOpts{via: via, cache: ft})
	layer := e.fx.CUDA.Layers[1]
	var leasedDuringFetch atomic.Int64
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if e.up.IsCDN(r) && strings.HasSuffix(r.URL.Path, layer.Digest.String()) {
			leasedDuringFetch.Store(int64(ft.activeLeases(layer.Digest)))
		}
		return false
	})
	path := "/v2/" + ngctest.CUDARepo + "/blobs/" + layer.Digest.String()
	mustServe(t, e, path, layer.Body) // miss
	waitFills(t, e)
	if n := leasedDuringFetch.Load(); n != 1 {
		t.Fatalf("%d leases on the blob while the upstream served it, want 1", n)
	}
	mustServe(t, e, path, layer.Body) // hit
	mustOK(t, e.do(t, http.MethodHead, path), 200)
	mustServe(t, e, "/v2/"+ngctest.CUDARepo+"/manifests/"+ngctest.CUDATag, e.fx.CUDA.Manifest.Body)
	mustServe(t, e, "/v2/"+ngctest.CUDARepo+"/manifests/"+ngctest.CUDATag, e.fx.CUDA.Manifest.Body)
	ft.mu.Lock()
	defer ft.mu.Unlock()
	if ft.leases != 2 || ft.releases != 2 || ft.active[layer.Digest] != 0 {
		t.Errorf("leases %d, releases %d, active %d; want 2 GETs leased and released", ft.leases, ft.releases, ft.active[layer.Digest])
	}
	if ft.touches["blob"] != 2 || ft.touches["manifest"] != 2 { // the hit GET and HEAD; both manifest answers
		t.Errorf("touches %v", ft.touches)
	}
}
