package pull

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// Holds are one per digest (a second redirect extends the first and gives
// its own lease back), bounded in number, and end with their release.
func TestRedirectHolds(t *testing.T) {
	h := &redirectHolds{m: map[digest.Digest]*heldLease{}, max: 2, d: 50 * time.Millisecond}
	var released [4]atomic.Int32
	rel := func(i int) func() { return func() { released[i].Add(1) } }
	a, b, c := digest.FromString("a"), digest.FromString("b"), digest.FromString("c")
	if !h.keep(a, rel(0)) || !h.keep(a, rel(1)) || !h.keep(b, rel(2)) {
		t.Fatal("keep refused below the bound")
	}
	if released[1].Load() != 1 || released[0].Load() != 0 {
		t.Fatalf("a second hold of a digest: released %d and %d, want the new lease given back at once", released[0].Load(), released[1].Load())
	}
	if h.keep(c, rel(3)) {
		t.Fatal("keep accepted a third digest over the bound of two")
	}
	if released[3].Load() != 0 {
		t.Fatal("a refused keep called release: it is the caller's")
	}
	if !testsupport.Until(10*time.Second, 10*time.Millisecond, func() bool { return released[0].Load() > 0 && released[2].Load() > 0 }) {
		t.Fatal("holds did not end")
	}
	h.mu.Lock()
	n := len(h.m)
	h.mu.Unlock()
	if n != 0 || released[0].Load() != 1 || released[2].Load() != 1 {
		t.Fatalf("after expiry: %d held, releases %d %d", n, released[0].Load(), released[2].Load())
	}
}
