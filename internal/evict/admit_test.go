package evict_test

import (
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/evict"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// fillBlob does what a fill does with a blob of size bytes under e:
// Admit, write the upload, Commit; then, before the fill gives its
// reservation back (as fill.Fill does once fetch returns), it runs the
// pass that the commit's event kicks (Run runs it on another goroutine,
// usually in that window). It returns the blob's digest and that pass's
// result.
func fillBlob(t *testing.T, s *storage.Store, e *evict.Evictor, size int) (digest.Digest, evict.Result) {
	t.Helper()
	data := newData(size)
	d := digest.FromBytes(data)
	release, err := e.Admit(t.Context(), d, int64(size))
	if err != nil {
		t.Fatalf("Admit %d bytes (used %d): %v", size, e.Used(), err)
	}
	defer release()
	commitBlob(t, s, data)
	res, err := e.Evict(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return d, res
}

// TestCommitCountsOnce: a committed blob counts once against the budget,
// from the moment of its commit: the room its fill reserved becomes cached
// content then, not when the fill returns. Under a 3 MiB budget, 1 MiB
// blobs filled one after another keep two in the cache (the most that fit
// with room for the next), and a pass under budget removes nothing.
// (U1's F9: every second blob evicted the one before.)
func TestCommitCountsOnce(t *testing.T) {
	forEachDriver(t, func(t *testing.T, s *storage.Store) {
		const max, size = 3 << 20, 1<<20 + 300
		var clk clock
		e := evict.New(s, evict.Options{MaxSize: max, Now: clk.now})
		var blobs []digest.Digest
		for i := range 5 {
			clk.set(i)
			d, res := fillBlob(t, s, e, size)
			blobs = append(blobs, d)
			if len(res.Removed) > 0 {
				t.Fatalf("blob %d: the pass after its commit removed %d objects with %d bytes used of %d", i, len(res.Removed), e.Used(), max)
			}
			if got := e.Used(); got != usage(s) {
				t.Fatalf("blob %d: the index counts %d bytes, the store holds %d", i, got, usage(s))
			}
			want := min(i+1, 2)
			n := 0
			for _, b := range blobs {
				if cached(t, s, b) {
					n++
				}
			}
			if n != want || !cached(t, s, d) {
				t.Fatalf("after blob %d: %d blobs cached (the new one: %v), want %d", i, n, cached(t, s, d), want)
			}
		}
		// Under budget: a pass removes nothing.
		if res, err := e.Evict(t.Context()); err != nil || len(res.Removed) > 0 {
			t.Fatalf("a pass under budget: removed %d, err %v", len(res.Removed), err)
		}
	})
}
