package pull_test

import (
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
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

// TestMaxFillsPerUpstream: an upstream with its own bound (Registry.MaxFills
// 1) whose misses hang does not take the global slots (fill.Options.MaxFills
// 2) from the others: its second cold blob is ErrBusy at once, a client of
// the blob it is fetching still joins that fill, and the default upstream's
// cold blob is served meanwhile.
func TestMaxFillsPerUpstream(t *testing.T) {
	t.Parallel()
	def, slow := ngctest.New(ngctest.Options{}), ngctest.New(ngctest.Options{})
	t.Cleanup(def.Close)
	t.Cleanup(slow.Close)
	a, b, c := randomBlob(t, 32<<10), randomBlob(t, 32<<10), randomBlob(t, 32<<10)
	slow.AddBlob("org/x", a)
	slow.AddBlob("org/x", b)
	def.AddBlob("nvidia/x", c)
	release := make(chan struct{})
	arrived := map[digest.Digest]chan struct{}{a.Digest: make(chan struct{}), b.Digest: make(chan struct{})}
	slow.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		for d, ch := range arrived {
			if !slow.IsCDN(r) && r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+d.String()) {
				select {
				case <-ch:
				default:
					close(ch)
				}
				<-release // every GET of a slow blob hangs until the end
			}
		}
		return false
	})
	var released bool
	unblock := func() {
		if !released {
			released = true
			close(release)
		}
	}
	t.Cleanup(unblock)
	ups, err := upstream.NewSet(&upstream.Registry{Name: strings.ToLower(def.Host()), Client: anonymousClient(def)}, nil,
		&upstream.Registry{Name: "slow.example", Client: anonymousClient(slow), MaxFills: 1})
	if err != nil {
		t.Fatal(err)
	}
	store, err := storage.OpenFilesystem(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	fills := fill.NewGroup(store, fill.Options{SpoolDir: t.TempDir(), MaxFills: 2})
	t.Cleanup(func() { // before the cache directory goes (t.Context has ended by now)
		unblock()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = fills.Wait(ctx)
	})
	svc := pull.NewSet(ups, store, fills, pull.Options{})

	type res struct {
		body []byte
		err  error
	}
	get := func(repo string, d digest.Digest) <-chan res {
		ch := make(chan res, 1)
		go func() {
			bl, err := svc.Blob(t.Context(), repo, d)
			if err != nil {
				ch <- res{err: err}
				return
			}
			defer bl.Close()
			rd, err := bl.Open(0, bl.Size)
			if err != nil {
				ch <- res{err: err}
				return
			}
			body, err := io.ReadAll(rd)
			ch <- res{body, err}
		}()
		return ch
	}
	first := get("slow.example/org/x", a.Digest)
	<-arrived[a.Digest]
	// The slow upstream's second miss: refused at once, never started.
	select {
	case r := <-get("slow.example/org/x", b.Digest):
		if !errors.Is(r.err, pull.ErrBusy) {
			t.Fatalf("the slow upstream's second cold blob: %v, want ErrBusy", r.err)
		}
		var be *pull.BusyError
		if !errors.As(r.err, &be) || be.Bound != "upstreams.slow.example.max_fills" {
			t.Fatalf("the slow upstream's second cold blob: %v, want the bound upstreams.slow.example.max_fills named", r.err)
		}
	case <-arrived[b.Digest]:
		t.Fatal("the slow upstream's second cold blob was fetched beyond its max_fills 1")
	case <-time.After(10 * time.Second):
		t.Fatal("the slow upstream's second cold blob neither refused nor fetched in 10 s")
	}
	// A client of the blob being fetched joins it, bound or not.
	joiner := get("slow.example/org/x", a.Digest)
	testsupport.Eventually(t, 10*time.Second, "the joiner on the running fill", func() bool { return fills.Clients(a.Digest) == 2 })
	// The default upstream is not starved.
	if r := <-get("nvidia/x", c.Digest); r.err != nil || string(r.body) != string(c.Body) {
		t.Fatalf("the default upstream's cold blob while the slow one hangs: %v", r.err)
	}
	unblock()
	for _, ch := range []<-chan res{first, joiner} {
		if r := <-ch; r.err != nil || string(r.body) != string(a.Body) {
			t.Fatalf("the slow blob once released: %v", r.err)
		}
	}
}
