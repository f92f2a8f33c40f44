package pull_test

import (
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/auth"
	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// randomBlob is a blob of n random bytes.
func randomBlob(t *testing.T, n int) ngctest.Content {
	t.Helper()
	body := make([]byte, n)
	_, _ = rand.Read(body)
	return ngctest.Content{MediaType: "application/octet-stream", Digest: digest.FromBytes(body), Body: body}
}

// anonymousClient is a client of u without credentials.
func anonymousClient(u *ngctest.Upstream) *upstream.Client {
	origin, _ := url.Parse(u.URL())
	return upstream.New(origin, auth.NewTransport(nil, origin, auth.Credentials{}, nil))
}

// hangs makes the registry GETs (not the CDN's) of u's blobs in arrived
// block until the test ends or the returned release is called, closing
// arrived[d] at blob d's first GET.
func hangs(t *testing.T, u *ngctest.Upstream, arrived map[digest.Digest]chan struct{}) (release func()) {
	t.Helper()
	ch := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(ch) }) }
	t.Cleanup(release)
	var mu sync.Mutex
	u.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		for d, a := range arrived {
			if !u.IsCDN(r) && r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+d.String()) {
				mu.Lock()
				select {
				case <-a:
				default:
					close(a)
				}
				mu.Unlock()
				<-ch
			}
		}
		return false
	})
	return release
}

// boundedService is the pull service over ups with a filesystem cache and a
// fill group of opts, whose fills the test waits for (after release) before
// the cache directory goes.
func boundedService(t *testing.T, ups *upstream.Set, opts fill.Options, release func()) (*pull.Service, *fill.Group) {
	t.Helper()
	store, err := storage.OpenFilesystem(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	opts.SpoolDir = t.TempDir()
	fills := fill.NewGroup(store, opts)
	t.Cleanup(func() { // t.Context has ended by now
		release()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = fills.Wait(ctx)
	})
	return pull.NewSet(ups, store, fills, pull.Options{}), fills
}

type blobResult struct {
	body []byte
	err  error
}

// getBlob reads blob d of repo through svc on a goroutine of its own.
func getBlob(t *testing.T, svc *pull.Service, repo string, d digest.Digest) <-chan blobResult {
	ch := make(chan blobResult, 1)
	go func() {
		bl, err := svc.Blob(t.Context(), repo, d)
		if err != nil {
			ch <- blobResult{err: err}
			return
		}
		defer bl.Close()
		rd, err := bl.Open(0, bl.Size)
		if err != nil {
			ch <- blobResult{err: err}
			return
		}
		body, err := io.ReadAll(rd)
		ch <- blobResult{body, err}
	}()
	return ch
}

// refused checks that a cold blob d is ErrBusy naming bound, without the
// upstream being asked for it (arrived closed).
func refused(t *testing.T, r <-chan blobResult, arrived <-chan struct{}, bound string) {
	t.Helper()
	select {
	case r := <-r:
		var be *pull.BusyError
		if !errors.Is(r.err, pull.ErrBusy) || !errors.As(r.err, &be) || be.Bound != bound {
			t.Fatalf("a cold blob past the bound: %v, want ErrBusy naming %s", r.err, bound)
		}
	case <-arrived:
		t.Fatalf("a cold blob was fetched beyond %s", bound)
	case <-time.After(10 * time.Second):
		t.Fatalf("a cold blob past %s neither refused nor fetched in 10 s", bound)
	}
}

// TestMaxFillsPerUpstream: an upstream with its own bound
// (fill.Options.MaxFillsPer 1, keyed by its registry name) whose misses
// hang does not take the global slots (fill.Options.MaxFills 2) from the
// others: its second cold blob is ErrBusy at once, a client of the blob it
// is fetching still joins that fill, and the default upstream's cold blob
// is served meanwhile.
func TestMaxFillsPerUpstream(t *testing.T) {
	t.Parallel()
	def, slow := ngctest.New(ngctest.Options{}), ngctest.New(ngctest.Options{})
	t.Cleanup(def.Close)
	t.Cleanup(slow.Close)
	a, b, c := randomBlob(t, 32<<10), randomBlob(t, 32<<10), randomBlob(t, 32<<10)
	slow.AddBlob("org/x", a)
	slow.AddBlob("org/x", b)
	def.AddBlob("nvidia/x", c)
	arrived := map[digest.Digest]chan struct{}{a.Digest: make(chan struct{}), b.Digest: make(chan struct{})}
	unblock := hangs(t, slow, arrived) // every GET of a slow blob hangs until the end
	ups, err := upstream.NewSet(&upstream.Registry{Name: strings.ToLower(def.Host()), Client: anonymousClient(def)}, nil,
		&upstream.Registry{Name: "slow.example", Client: anonymousClient(slow)})
	if err != nil {
		t.Fatal(err)
	}
	svc, fills := boundedService(t, ups, fill.Options{MaxFills: 2, MaxFillsPer: map[string]int{"slow.example": 1}}, unblock)

	first := getBlob(t, svc, "slow.example/org/x", a.Digest)
	<-arrived[a.Digest]
	// The slow upstream's second miss: refused at once, never started.
	refused(t, getBlob(t, svc, "slow.example/org/x", b.Digest), arrived[b.Digest], "upstreams.slow.example.max_fills")
	// A client of the blob being fetched joins it, bound or not.
	joiner := getBlob(t, svc, "slow.example/org/x", a.Digest)
	testsupport.Eventually(t, 10*time.Second, "the joiner on the running fill", func() bool { return fills.Clients(a.Digest) == 2 })
	// The default upstream is not starved.
	if r := <-getBlob(t, svc, "nvidia/x", c.Digest); r.err != nil || string(r.body) != string(c.Body) {
		t.Fatalf("the default upstream's cold blob while the slow one hangs: %v", r.err)
	}
	unblock()
	for _, ch := range []<-chan blobResult{first, joiner} {
		if r := <-ch; r.err != nil || string(r.body) != string(a.Body) {
			t.Fatalf("the slow blob once released: %v", r.err)
		}
	}
}

// TestMaxFillsBoundNames: the default upstream's own bound is named
// upstream.max_fills, the global one limits.max_fills, as the
// configuration spells them.
func TestMaxFillsBoundNames(t *testing.T) {
	t.Parallel()
	def, other := ngctest.New(ngctest.Options{}), ngctest.New(ngctest.Options{})
	t.Cleanup(def.Close)
	t.Cleanup(other.Close)
	a, b, c, d := randomBlob(t, 1<<10), randomBlob(t, 1<<10), randomBlob(t, 1<<10), randomBlob(t, 1<<10)
	def.AddBlob("nvidia/x", a)
	def.AddBlob("nvidia/x", b)
	other.AddBlob("org/y", c)
	other.AddBlob("org/y", d)
	defName := strings.ToLower(def.Host())
	arrived := map[digest.Digest]chan struct{}{}
	for _, bl := range []ngctest.Content{a, b, c, d} {
		arrived[bl.Digest] = make(chan struct{})
	}
	releaseDef, releaseOther := hangs(t, def, arrived), hangs(t, other, arrived)
	ups, err := upstream.NewSet(&upstream.Registry{Name: defName, Client: anonymousClient(def)}, nil,
		&upstream.Registry{Name: "other.example", Client: anonymousClient(other)})
	if err != nil {
		t.Fatal(err)
	}
	svc, _ := boundedService(t, ups, fill.Options{MaxFills: 2, MaxFillsPer: map[string]int{defName: 1}},
		func() { releaseDef(); releaseOther() })

	_ = getBlob(t, svc, "nvidia/x", a.Digest)
	<-arrived[a.Digest]
	refused(t, getBlob(t, svc, "nvidia/x", b.Digest), arrived[b.Digest], "upstream.max_fills")
	_ = getBlob(t, svc, "other.example/org/y", c.Digest)
	<-arrived[c.Digest]
	refused(t, getBlob(t, svc, "other.example/org/y", d.Digest), arrived[d.Digest], "limits.max_fills")
}
