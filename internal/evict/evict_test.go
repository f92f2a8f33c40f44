package evict_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ngc-mirror/ngc-mirror/internal/evict"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// forEachDriver runs fn on the local filesystem (as cmd/mirror opens it)
// and on a real S3 server.
func forEachDriver(t *testing.T, fn func(t *testing.T, s *storage.Store)) {
	testsupport.ForEachDriver(t, fn, testsupport.FilesystemLocal.Named("filesystem"), testsupport.S3)
}

// clock is a settable time for Options.Now.
type clock struct{ ns atomic.Int64 }

func (c *clock) set(minute int) {
	c.ns.Store(time.Date(2025, 1, 1, 0, minute, 0, 0, time.UTC).UnixNano())
}
func (c *clock) now() time.Time { return time.Unix(0, c.ns.Load()) }

var seq atomic.Uint64

// newData returns size bytes of content no other call returns.
func newData(size int) []byte {
	r := rand.New(rand.NewPCG(seq.Add(1), 7))
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	return data
}

// commitBlob writes data to s as a fill does (known new) and commits it.
func commitBlob(t *testing.T, s *storage.Store, data []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(data)
	w, err := s.CreateBlob(t.Context(), d, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	w.KnownNew()
	_, _ = w.Write(data)
	if err := w.Commit(t.Context()); err != nil {
		t.Fatal(err)
	}
	return d
}

func putBlob(t *testing.T, s *storage.Store, size int) digest.Digest {
	t.Helper()
	return commitBlob(t, s, newData(size))
}

// putImage caches an image manifest referring to config and layers.
func putImage(t *testing.T, s *storage.Store, config digest.Digest, layers ...digest.Digest) digest.Digest {
	t.Helper()
	body := fmt.Sprintf(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":1000},"layers":[`, config)
	for i, l := range layers {
		if i > 0 {
			body += ","
		}
		body += fmt.Sprintf(`{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":%q,"size":1000}`, l)
	}
	body += "]}"
	return putManifest(t, s, "application/vnd.oci.image.manifest.v1+json", body)
}

func putIndex(t *testing.T, s *storage.Store, children ...digest.Digest) digest.Digest {
	t.Helper()
	body := `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[`
	for i, c := range children {
		if i > 0 {
			body += ","
		}
		body += fmt.Sprintf(`{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":%q,"size":300,"platform":{"os":"linux","architecture":"amd64"}}`, c)
	}
	body += "]}"
	return putManifest(t, s, "application/vnd.oci.image.index.v1+json", body)
}

func putManifest(t *testing.T, s *storage.Store, mt, body string) digest.Digest {
	t.Helper()
	d := digest.FromString(body)
	if err := s.PutManifest(t.Context(), mt, d, []byte(body)); err != nil {
		t.Fatal(err)
	}
	return d
}

func cached(t *testing.T, s *storage.Store, d digest.Digest) bool {
	t.Helper()
	_, err := s.StatBlob(t.Context(), d)
	if err != nil && !errors.Is(err, storage.ErrNotFound) {
		t.Fatal(err)
	}
	return err == nil
}

func usage(s *storage.Store) int64 {
	b, _ := s.Usage("blob")
	m, _ := s.Usage("manifest")
	return b + m
}

// TestEvictionOrder: over budget, a pass removes the least recently used
// content first, keeps a pinned image (index, child, config, layers), a
// layer shared with a retained manifest of another repository, a leased
// blob and every manifest, and ends under the low-water mark.
func TestEvictionOrder(t *testing.T) {
	forEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := t.Context()
		var clk clock
		reg := prometheus.NewRegistry()
		m := metrics.NewEviction(reg)
		// The budget is set below, once the sizes are known; the Evictor
		// must watch the store from the first commit.
		var opts evict.Options
		opts.Now, opts.Metrics = clk.now, m
		opts.Pins, opts.Registry = []evict.Pin{{Repository: "lab/p", Tag: "1"}}, "nvcr.io"
		const bs = 1000

		clk.set(1)
		orphan := putBlob(t, s, bs) // no manifest, oldest
		leased := putBlob(t, s, bs) // as old, but being served
		// Pinned, and older than everything else.
		clk.set(2)
		cp, lp := putBlob(t, s, bs), putBlob(t, s, bs)
		mp := putImage(t, s, cp, lp)
		ip := putIndex(t, s, mp)
		if err := s.PutTag(ctx, storage.Repo{Registry: "nvcr.io", Name: "lab/p"}, "1", storage.TagRecord{Digest: ip, MediaType: "application/vnd.oci.image.index.v1+json", ConfirmedAt: clk.now()}); err != nil {
			t.Fatal(err)
		}
		// Image A of lab/a, then image B of lab/b sharing a layer with A.
		clk.set(3)
		ca, la, shared := putBlob(t, s, bs), putBlob(t, s, bs), putBlob(t, s, bs)
		ma := putImage(t, s, ca, la, shared)
		clk.set(4)
		cb, lb := putBlob(t, s, bs), putBlob(t, s, bs)
		mb := putImage(t, s, cb, lb, shared)
		_ = mb

		// Nine blobs and four manifests. Keeping all but three blobs (the
		// orphan and A's own two) is within the low-water mark; keeping one
		// more is not.
		manifestBytes, _ := s.Usage("manifest")
		low := int64(6*bs) + manifestBytes + bs/2
		opts.MaxSize = int64(float64(low) / 0.9)
		if usage(s) <= opts.MaxSize {
			t.Fatalf("test set-up: usage %d within the budget %d", usage(s), opts.MaxSize)
		}
		e := evict.New(s, opts)
		if err := e.Seed(ctx); err != nil {
			t.Fatal(err)
		}
		if e.Used() != usage(s) {
			t.Fatalf("index holds %d bytes, the store %d", e.Used(), usage(s))
		}
		// Seeding from modification times must not reorder what the index
		// saw committed: re-touch at the fake times.
		for _, step := range []struct {
			minute int
			blobs  []digest.Digest
			mans   []digest.Digest
		}{
			{1, []digest.Digest{orphan, leased}, nil},
			{2, []digest.Digest{cp, lp}, []digest.Digest{mp, ip}},
			{3, []digest.Digest{ca, la, shared}, []digest.Digest{ma}},
			{4, []digest.Digest{cb, lb}, []digest.Digest{mb}},
		} {
			clk.set(step.minute)
			for _, d := range step.blobs {
				e.Touch(storage.KindBlob, d)
			}
			for _, d := range step.mans {
				e.Touch(storage.KindManifest, d)
			}
		}
		release, err := e.Lease(ctx, leased)
		if err != nil {
			t.Fatal(err)
		}
		defer release()

		res, err := e.Evict(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var got []digest.Digest
		for _, it := range res.Removed {
			if it.Kind != storage.KindBlob || it.Size != bs {
				t.Errorf("removed %+v", it)
			}
			got = append(got, it.Digest)
		}
		if len(got) != 3 || got[0] != orphan || !slices.Contains(got[1:], ca) || !slices.Contains(got[1:], la) {
			t.Fatalf("removed %v; want the orphan %s first, then A's config %s and layer %s", got, orphan, ca, la)
		}
		for _, d := range []digest.Digest{orphan, ca, la} {
			if cached(t, s, d) {
				t.Errorf("evicted blob %s still cached", d)
			}
		}
		for name, d := range map[string]digest.Digest{"leased": leased, "pinned config": cp, "pinned layer": lp, "shared layer": shared, "B config": cb, "B layer": lb} {
			if !cached(t, s, d) {
				t.Errorf("%s blob %s was evicted", name, d)
			}
		}
		for _, d := range []digest.Digest{ip, mp, ma, mb} {
			if _, err := s.GetManifest(ctx, d); err != nil {
				t.Errorf("manifest %s: %v", d, err)
			}
		}
		if u := usage(s); u > low || e.Used() != u {
			t.Errorf("usage %d (index %d) after the pass, low-water mark %d", u, e.Used(), low)
		}
		if n := testutil.ToFloat64(m.EvictedBytes.WithLabelValues("blob")); n != 3*bs {
			t.Errorf("evicted bytes metric %v, want %d", n, 3*bs)
		}
		// Within budget now: another pass removes nothing.
		if res, err := e.Evict(ctx); err != nil || len(res.Removed) != 0 {
			t.Fatalf("second pass: %+v, %v", res, err)
		}
	})
}

// TestAdmitWhenFull: a blob that does not fit a budget whose content is
// all pinned or leased is refused (ErrFull, counted); once the lease ends
// the leased blob is evicted to make room and the blob is admitted; a blob
// larger than the whole budget is refused without evicting anything.
func TestAdmitWhenFull(t *testing.T) {
	forEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := t.Context()
		reg := prometheus.NewRegistry()
		m := metrics.NewEviction(reg)
		c, l := putBlob(t, s, 2000), putBlob(t, s, 3000)
		mp := putImage(t, s, c, l)
		if err := s.PutTag(ctx, storage.Repo{Registry: "nvcr.io", Name: "lab/p"}, "1", storage.TagRecord{Digest: mp}); err != nil {
			t.Fatal(err)
		}
		leased := putBlob(t, s, 4000)
		// A budget of exactly what is cached.
		opts := evict.Options{Metrics: m, MaxSize: usage(s), Pins: []evict.Pin{{Repository: "lab/p", Tag: "1"}}, Registry: "nvcr.io"}
		e := evict.New(s, opts)
		if err := e.Seed(ctx); err != nil {
			t.Fatal(err)
		}
		release, err := e.Lease(ctx, leased)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.Admit(ctx, digest.FromString("new"), 1000); !errors.Is(err, evict.ErrFull) {
			t.Fatalf("Admit with everything pinned or leased: %v, want ErrFull", err)
		}
		if n := testutil.ToFloat64(m.Full); n != 1 {
			t.Fatalf("cache full metric %v, want 1", n)
		}
		if !cached(t, s, leased) || !cached(t, s, c) || !cached(t, s, l) {
			t.Fatal("a refused admission evicted pinned or leased content")
		}
		if _, err := e.Admit(ctx, digest.FromString("huge"), opts.MaxSize+1); !errors.Is(err, evict.ErrFull) {
			t.Fatalf("Admit larger than the budget: %v", err)
		}
		release()
		done, err := e.Admit(ctx, digest.FromString("new"), 1000)
		if err != nil {
			t.Fatalf("Admit once the lease ended: %v", err)
		}
		done()
		if cached(t, s, leased) {
			t.Fatal("the no longer leased blob was not evicted")
		}
		if !cached(t, s, c) || !cached(t, s, l) {
			t.Fatal("pinned content evicted")
		}
		if n := testutil.ToFloat64(m.Full); n != 2 {
			t.Fatalf("cache full metric %v, want 2", n)
		}
	})
}

// TestMinFree: with a minimum of free space, a pass evicts until free
// space is the minimum plus the low-water margin.
func TestMinFree(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := storage.New(filesystem.New(filesystem.DriverParameters{RootDirectory: dir, MaxThreads: 10}), storage.WithLocalRoot(dir))
	const total = 100_000
	var clk clock
	clk.set(0)
	e := evict.New(s, evict.Options{
		MinFree:   20_000,
		Now:       clk.now,
		FreeSpace: func() (int64, int64, error) { return total - usage(s), total, nil },
	})
	var blobs []digest.Digest
	for i := range 9 {
		clk.set(i)
		blobs = append(blobs, putBlob(t, s, 10_000))
	}
	// 90,000 used, 10,000 free: below 20,000; the target is 22,000 free.
	res, err := e.Evict(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Removed) != 2 || res.Removed[0].Digest != blobs[0] || res.Removed[1].Digest != blobs[1] {
		t.Fatalf("removed %+v, want the two oldest", res.Removed)
	}
	if free := total - usage(s); free < 22_000 {
		t.Fatalf("free %d after the pass", free)
	}
}

// TestSeedOrderAfterRestart: a new process orders content by the
// driver's modification times.
func TestSeedOrderAfterRestart(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	open := func() *storage.Store {
		return storage.New(filesystem.New(filesystem.DriverParameters{RootDirectory: dir, MaxThreads: 10}), storage.WithLocalRoot(dir))
	}
	s := open()
	var blobs []digest.Digest
	for range 4 {
		blobs = append(blobs, putBlob(t, s, 1000))
	}
	// Written in the order 2, 0, 3, 1.
	base := time.Now().Add(-time.Hour)
	for i, n := range []int{1, 3, 0, 2} {
		d := blobs[i]
		bp, err := storage.Path(storage.BlobPath{Digest: d})
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, filepath.FromSlash(bp))
		mt := base.Add(time.Duration(n) * time.Minute)
		if err := os.Chtimes(p, mt, mt); err != nil {
			t.Fatal(err)
		}
	}
	s = open()
	e := evict.New(s, evict.Options{MaxSize: 2500})
	if err := e.Seed(context.Background()); err != nil {
		t.Fatal(err)
	}
	res, err := e.Evict(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var got []digest.Digest
	for _, it := range res.Removed {
		got = append(got, it.Digest)
	}
	if want := []digest.Digest{blobs[2], blobs[0]}; !slices.Equal(got, want) {
		t.Fatalf("removed %v, want %v (the two least recently written)", got, want)
	}
}

func TestParsePin(t *testing.T) {
	t.Parallel()
	d := "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	hosts := []string{"nvcr.io"}
	for in, want := range map[string]evict.Pin{
		"nvidia/pytorch:24.05-py3":         {Repository: "nvidia/pytorch", Tag: "24.05-py3"},
		"nvidia/k8s/dcgm:1":                {Repository: "nvidia/k8s/dcgm", Tag: "1"},
		"nvidia/cuda@" + d:                 {Repository: "nvidia/cuda", Digest: digest.Digest(d)},
		"org/team/image:latest":            {Repository: "org/team/image", Tag: "latest"},
		"nvcr.io/nvidia/pytorch:24.05-py3": {Repository: "nvidia/pytorch", Tag: "24.05-py3"},
		"nvidia/cuda:12@" + d:              {Repository: "nvidia/cuda", Digest: digest.Digest(d)},
	} {
		got, err := evict.ParsePin(in, hosts)
		if err != nil || got != want {
			t.Errorf("ParsePin(%q) = %+v, %v; want %+v", in, got, err, want)
		}
		if again, err := evict.ParsePin(got.String(), hosts); err != nil || again != got {
			t.Errorf("ParsePin(%q) = %+v, %v; want %+v", got.String(), again, err, got)
		}
	}
	for _, in := range []string{"nvidia/pytorch", "docker.io/nvidia/pytorch:1", "Nvidia/x:1", "x:y:z", ""} {
		if p, err := evict.ParsePin(in, hosts); err == nil {
			t.Errorf("ParsePin(%q) = %+v, want an error", in, p)
		}
	}
	// A further upstream's image keeps its registry: the qualified name.
	for in, want := range map[string]evict.Pin{
		"docker.io/library/python:3.12": {Repository: "docker.io/library/python", Tag: "3.12"},
		"docker.io/python:3.12":         {Repository: "docker.io/library/python", Tag: "3.12"},
		"ghcr.io/org/img@" + d:          {Repository: "ghcr.io/org/img", Digest: digest.Digest(d)},
	} {
		got, err := evict.ParsePin(in, hosts, "docker.io", "ghcr.io")
		if err != nil || got != want {
			t.Errorf("ParsePin(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
}

// lateRemover is a store whose blob removal, once its caller gives up
// (the context ends), still happens later: an S3 DELETE that the server
// carries out after the client hung up. The late removal waits for
// leased, so that it lands while a lease is held.
type lateRemover struct {
	*storage.Store
	entered, proceed, leased chan struct{}
	scheduled                atomic.Bool
	late                     chan error
}

func (l *lateRemover) RemoveBlob(ctx context.Context, d digest.Digest) (int64, error) {
	close(l.entered)
	<-l.proceed
	if err := ctx.Err(); err != nil {
		l.scheduled.Store(true)
		go func() {
			select {
			case <-l.leased:
			case <-time.After(10 * time.Second):
			}
			_, err := l.Store.RemoveBlob(context.Background(), d)
			l.late <- err
		}()
		return 0, err
	}
	return l.Store.RemoveBlob(ctx, d)
}

// TestLeaseNotUndercutByAbandonedRemoval: an eviction pass that gives up
// while removing a blob (an admission's timeout) must not let a lease be
// granted while that removal can still land: a client would stat the blob,
// answer 200 and then find it gone (issue 16: "status 200, 0 bytes" on S3).
// The removal finishes, whatever the pass's context, before a waiting
// lease is granted.
func TestLeaseNotUndercutByAbandonedRemoval(t *testing.T) {
	forEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := t.Context()
		d := putBlob(t, s, 1000)
		ls := &lateRemover{Store: s, entered: make(chan struct{}), proceed: make(chan struct{}),
			leased: make(chan struct{}), late: make(chan error, 1)}
		e := evict.New(ls, evict.Options{MaxSize: 1}) // over budget: a pass evicts d
		if err := e.Seed(ctx); err != nil {
			t.Fatal(err)
		}
		pctx, cancel := context.WithCancel(ctx)
		passDone := make(chan struct{})
		go func() {
			defer close(passDone)
			_, _ = e.Evict(pctx)
		}()
		select {
		case <-ls.entered:
		case <-time.After(10 * time.Second):
			t.Fatal("the pass never removed the blob")
		}
		granted := make(chan func(), 1)
		go func() {
			rel, err := e.Lease(ctx, d)
			if err != nil {
				t.Errorf("lease: %v", err)
				rel = func() {}
			}
			granted <- rel
		}()
		cancel() // the pass gives up mid-removal
		close(ls.proceed)
		var release func()
		select {
		case release = <-granted:
		case <-time.After(10 * time.Second):
			t.Fatal("the lease was never granted")
		}
		defer release()
		// As a client does with its lease: look the blob up, and if it is
		// there, read it.
		_, statErr := s.StatBlob(ctx, d)
		close(ls.leased)
		select {
		case <-passDone:
		case <-time.After(10 * time.Second):
			t.Fatal("the pass never ended")
		}
		if ls.scheduled.Load() {
			<-ls.late
		}
		if statErr != nil {
			return // a miss: the client fetches it again
		}
		rc, err := s.OpenBlob(ctx, d, 0)
		if err != nil {
			t.Fatalf("blob found under a lease, then removed before it was read: %v", err)
		}
		_ = rc.Close()
	})
}
