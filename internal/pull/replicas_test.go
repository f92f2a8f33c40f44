package pull_test

import (
	"errors"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/auth"
	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
	"github.com/ngc-mirror/ngc-mirror/internal/state/redistest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// replicaServices are two pull-through services on one bucket of a real S3
// server sharing a real Redis, as two mirror replicas are; the upstream
// holds every manifest answer for a while, so that both replicas ask at
// once.
func replicaServices(t *testing.T, leases bool) (*ngctest.Upstream, *ngctest.Fixture, [2]*pull.Service) {
	t.Helper()
	up := ngctest.New(ngctest.Options{})
	t.Cleanup(up.Close)
	fx, err := up.Populate(1 << 10)
	if err != nil {
		t.Fatal(err)
	}
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/manifests/") || strings.HasSuffix(r.URL.Path, "/tags/list") {
			time.Sleep(300 * time.Millisecond)
		}
		return false
	})
	s3 := testsupport.StartS3(t)
	rd := redistest.Start(t)
	var svcs [2]*pull.Service
	for i := range svcs {
		store, st := testsupport.OpenS3(t, s3), rd.Open(t)
		origin, _ := url.Parse(up.URL())
		client := upstream.New(origin, auth.NewTransport(nil, origin, auth.Credentials{}, nil))
		opts := pull.Options{TagFreshness: time.Minute}
		if leases {
			opts.Leases, opts.LeaseScope = st, "test/registry/"
		}
		svcs[i] = pull.New(client, store, fill.NewGroup(store, fill.Options{SpoolDir: t.TempDir()}), opts)
	}
	return up, fx, svcs
}

// pullAll asks every service for repo:ref from n clients each at once and
// returns how many were served from the cache.
func pullAll(t *testing.T, svcs [2]*pull.Service, n int, repo, ref string) int {
	t.Helper()
	var wg sync.WaitGroup
	var hits atomic.Int32
	for _, s := range svcs {
		for range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				m, err := s.Manifest(t.Context(), repo, ref)
				if err != nil {
					t.Errorf("%s:%s: %v", repo, ref, err)
					return
				}
				if m.Hit {
					hits.Add(1)
				}
			}()
		}
	}
	wg.Wait()
	return int(hits.Load())
}

// TestManifestOnceAcrossReplicas: a cold manifest asked of two replicas at
// once, by tag and then by digest, costs the upstream one GET; the replica
// that did not fetch serves it from the shared cache.
func TestManifestOnceAcrossReplicas(t *testing.T) {
	up, fx, svcs := replicaServices(t, true)
	const repo = "nvidia/pytorch"
	pullAll(t, svcs, 4, repo, "17.12")
	if n := manifestGETs(up, "/v2/"+repo+"/manifests/17.12"); n != 1 {
		t.Errorf("upstream manifest GETs by tag: %d, want 1", n)
	}
	child := fx.Pytorch.Children[0].Manifest.Digest
	hits := pullAll(t, svcs, 4, repo, child.String())
	if n := manifestGETs(up, "/v2/"+repo+"/manifests/"+child.String()); n != 1 {
		t.Errorf("upstream manifest GETs by digest: %d, want 1", n)
	}
	if hits < 4 {
		t.Errorf("%d of 8 served as cache hits; want at least the other replica's 4", hits)
	}
}

// TestTagListOnceAcrossReplicas: a complete tag list asked of two
// replicas at once is listed from the upstream by one of them.
func TestTagListOnceAcrossReplicas(t *testing.T) {
	up, _, svcs := replicaServices(t, true)
	var wg sync.WaitGroup
	for _, s := range svcs {
		for range 3 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p, err := s.AllTags(t.Context(), ngctest.PytorchRepo, "")
				if err != nil || len(p.Tags) < 2 {
					t.Errorf("tags: %v %v", p.Tags, err)
				}
			}()
		}
	}
	wg.Wait()
	if n := manifestGETs(up, "/v2/"+ngctest.PytorchRepo+"/tags/list"); n != 1 {
		t.Errorf("upstream tag list GETs: %d, want 1", n)
	}
}

// TestManifestTwiceWithoutLeases is the control: without the leases each
// replica fetches the cold tag itself (so the test above can fail).
func TestManifestTwiceWithoutLeases(t *testing.T) {
	up, _, svcs := replicaServices(t, false)
	pullAll(t, svcs, 2, "nvidia/pytorch", "17.12")
	if n := manifestGETs(up, "/v2/nvidia/pytorch/manifests/17.12"); n != 2 {
		t.Errorf("upstream manifest GETs without leases: %d, want 2 (one per replica)", n)
	}
}

// TestManifestLeaseHolderFails: when the replica holding the lease fails
// (the upstream answers it 503), the waiting replica fetches itself
// instead of failing or waiting out the lease.
func TestManifestLeaseHolderFails(t *testing.T) {
	up, _, svcs := replicaServices(t, true)
	var first atomic.Bool
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.Contains(r.URL.Path, "/manifests/") {
			return false
		}
		time.Sleep(300 * time.Millisecond)
		if r.Header.Get("Authorization") != "" && first.CompareAndSwap(false, true) {
			http.Error(w, `{"errors":[{"code":"UNAVAILABLE"}]}`, http.StatusServiceUnavailable)
			return true
		}
		return false
	})
	errs := make(chan error, 2)
	start := time.Now()
	for _, s := range svcs {
		go func() {
			_, err := s.Manifest(t.Context(), "nvidia/pytorch", "17.12")
			errs <- err
		}()
	}
	var failed, ok int
	for range 2 {
		if err := <-errs; err == nil {
			ok++
		} else if errors.Is(err, upstream.ErrUnavailable) || err != nil {
			failed++
		}
	}
	if ok != 1 || failed != 1 {
		t.Fatalf("%d succeeded and %d failed; want the holder to fail and the other to fetch itself", ok, failed)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("took %s: the waiter waited out the lease", d)
	}
	if n := manifestGETs(up, "/v2/nvidia/pytorch/manifests/17.12"); n != 2 {
		t.Errorf("upstream manifest GETs: %d, want 2 (the failed one and the waiter's)", n)
	}
}

// manifestGETs counts the upstream's authorized GETs of path (a first
// request without a token is answered 401 and repeated with one).
func manifestGETs(up *ngctest.Upstream, path string) int {
	n := 0
	for _, r := range up.Requests() {
		if r.Host == "registry" && r.Method == http.MethodGet && r.Path == path && r.Auth != "" {
			n++
		}
	}
	return n
}
