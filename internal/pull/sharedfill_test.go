package pull_test

import (
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// TestCacheBlobRetriesAnotherUpstreamsFailure: a prefetch (CacheBlob) of a
// further upstream's repository that joined the fill a default-upstream
// client started is not failed by the default's 404: it caches the blob
// from its own upstream.
func TestCacheBlobRetriesAnotherUpstreamsFailure(t *testing.T) {
	t.Parallel()
	def, other := ngctest.New(ngctest.Options{}), ngctest.New(ngctest.Options{})
	t.Cleanup(def.Close)
	t.Cleanup(other.Close)
	c := randomBlob(t, 64<<10)
	def.AddBlob("nvidia/a", c)
	other.AddBlob("org/b", c)
	arrived, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	def.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if def.IsCDN(r) || r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, "/blobs/"+c.Digest.String()) {
			return false
		}
		once.Do(func() { close(arrived); <-release })
		return ngctest.FailWith(http.StatusNotFound)(w, r)
	})
	ups, err := upstream.NewSet(&upstream.Registry{Name: strings.ToLower(def.Host()), Client: anonymousClient(def)}, nil,
		&upstream.Registry{Name: "ghcr.example", Client: anonymousClient(other)})
	if err != nil {
		t.Fatal(err)
	}
	store, err := storage.OpenFilesystem(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	fills := fill.NewGroup(store, fill.Options{SpoolDir: t.TempDir()})
	svc := pull.NewSet(ups, store, fills, pull.Options{})

	var wg sync.WaitGroup
	var err1, err2 error
	var fetched2 bool
	wg.Add(2)
	go func() { defer wg.Done(); _, err1 = svc.CacheBlob(t.Context(), "nvidia/a", c.Digest, nil) }()
	<-arrived
	go func() {
		defer wg.Done()
		fetched2, err2 = svc.CacheBlob(t.Context(), "ghcr.example/org/b", c.Digest, nil)
	}()
	joined := testsupport.Until(10*time.Second, 5*time.Millisecond, func() bool { return fills.Clients(c.Digest) == 2 })
	close(release)
	wg.Wait()
	if !joined {
		t.Fatal("the second prefetch never joined the running fill")
	}
	if err1 == nil {
		t.Fatal("the default's prefetch succeeded although its upstream answered 404")
	}
	if err2 != nil || !fetched2 {
		t.Fatalf("the further upstream's prefetch: fetched %v, %v; want its own upstream's blob cached", fetched2, err2)
	}
	if n := other.BlobFetches(c.Digest); n != 1 {
		t.Fatalf("the further upstream served the blob %d times, want 1", n)
	}
	if !svc.BlobCached(t.Context(), c.Digest) {
		t.Fatal("blob not cached")
	}
}
