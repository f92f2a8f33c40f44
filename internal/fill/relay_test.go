package fill

import (
	"bytes"
	"context"
	"io"
	"sync/atomic"
	"testing"

	driver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// writerCounter counts the uploads the store opens (S3 PUTs would follow).
type writerCounter struct {
	*hookDriver
	writers atomic.Int32
}

func (d *writerCounter) Writer(ctx context.Context, path string, append bool) (driver.FileWriter, error) {
	d.writers.Add(1)
	return d.hookDriver.Writer(ctx, path, append)
}

// relaySource is src whose bodies say they come from an owner that
// committed the blob (owner true) or did not; committedCalls counts the
// questions.
func relaySource(src Source, owner bool, committedCalls *atomic.Int32) Source {
	return func(ctx context.Context, off int64) (io.ReadCloser, int64, error) {
		Relay(ctx, func(context.Context) bool { committedCalls.Add(1); return owner })
		return src(ctx, off)
	}
}

func TestRelayWritesNothingWhenOwnerCommitted(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{}, nil)
	data, dgst := randomBlob(t, 300<<10)
	// The owner's commit, on the cache the replicas share: done before the
	// relay asks.
	putBlob(t, e.store, dgst, data)
	wc := &writerCounter{hookDriver: e.d}
	e2 := &testEnv{g: NewGroup(storageOn(wc), Options{SpoolDir: t.TempDir()}), store: e.store, d: e.d}
	var asked atomic.Int32
	f, _ := mustJoinMissed(t, e2.g, dgst, relaySource(newSource(t, data).open, true, &asked))
	defer f.Release()
	waitSize(t, f)
	got, err := readRange(t, f, 0, int64(len(data)))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("relayed read: %d bytes, %v", len(got), err)
	}
	if err := done(t, f); err != nil {
		t.Fatal(err)
	}
	if !f.Committed() || asked.Load() != 1 {
		t.Fatalf("Committed() = %v, owner asked %d times; want true, 1", f.Committed(), asked.Load())
	}
	if n := wc.writers.Load(); n != 0 {
		t.Fatalf("the relay opened %d uploads; the owner's commit should have been enough", n)
	}
}

func TestRelayCommitsFromSpoolWhenOwnerDidNot(t *testing.T) {
	t.Parallel()
	for _, takeover := range []bool{false, true} {
		e := newEnv(t, Options{}, nil)
		data, dgst := randomBlob(t, 300<<10)
		src := newSource(t, data)
		var asked atomic.Int32
		relayed := relaySource(src.open, false, &asked)
		s := relayed
		if takeover {
			// The owner dies at 100 KiB; the resume comes from the upstream
			// (no Relay): this replica took the blob over.
			src.breakAfter = 100 << 10
			s = func(ctx context.Context, off int64) (io.ReadCloser, int64, error) {
				if off == 0 {
					return relayed(ctx, off)
				}
				src.breakAfter = 0
				return src.open(ctx, off)
			}
		}
		f, _ := mustJoinMissed(t, e.g, dgst, s)
		waitSize(t, f)
		got, err := readRange(t, f, 0, int64(len(data)))
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("takeover %v: read %d bytes, %v", takeover, len(got), err)
		}
		if err := done(t, f); err != nil {
			t.Fatal(err)
		}
		f.Release()
		e.assertStored(t, dgst, data)
		if want := int32(1); takeover {
			if asked.Load() != 0 {
				t.Fatalf("after a takeover the dead owner was asked about its commit")
			}
		} else if asked.Load() != want {
			t.Fatalf("owner asked %d times, want %d", asked.Load(), want)
		}
	}
}

func TestSourceSaysCached(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{}, nil)
	data, dgst := randomBlob(t, 10<<10)
	putBlob(t, e.store, dgst, data)
	f, _ := mustJoinMissed(t, e.g, dgst, func(context.Context, int64) (io.ReadCloser, int64, error) { return nil, 0, ErrCached })
	defer f.Release()
	if size := waitSize(t, f); size != int64(len(data)) || !f.Cached() {
		t.Fatalf("size %d, Cached %v; want %d, true", size, f.Cached(), len(data))
	}
}

func storageOn(d driver.StorageDriver) *storage.Store { return storage.New(d) }

// putBlob commits data as blob dgst to store, as another replica would.
func putBlob(t *testing.T, store *storage.Store, dgst digest.Digest, data []byte) {
	t.Helper()
	w, err := store.CreateBlob(t.Context(), dgst, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = w.Write(data)
	if err := w.Commit(t.Context()); err != nil {
		t.Fatal(err)
	}
}

func mustJoinMissed(t *testing.T, g *Group, dgst digest.Digest, src Source) (*Fill, bool) {
	t.Helper()
	f, started, err := g.JoinMissed("", dgst, g.Seq(), src)
	if err != nil {
		t.Fatal(err)
	}
	return f, started
}
