package evict_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/evict"
	"github.com/ngc-mirror/ngc-mirror/internal/state/redistest"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// replicas are two evictors, A and B, on one bucket of a real S3 server,
// sharing a real Redis; A leads.
type replicas struct {
	a, b   *evict.Evictor
	sa, sb *storage.Store
}

const sharedBlob = 1000

func startReplicas(t *testing.T, clk *clock, max int64) replicas {
	t.Helper()
	s3 := testsupport.StartS3(t)
	rd := redistest.Start(t)
	var r replicas
	open := func(owner string) (*evict.Evictor, *storage.Store) {
		s, st := testsupport.OpenS3(t, s3), rd.Open(t)
		e := evict.New(s, evict.Options{MaxSize: max, Now: clk.now, Log: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})).With("r", owner), Shared: st, Scope: "registry/", Owner: owner,
			SyncInterval: 50 * time.Millisecond, LockTTL: time.Second, Interval: time.Hour, AdmitTimeout: 3 * time.Second})
		if err := e.Seed(t.Context()); err != nil {
			t.Fatal(err)
		}
		return e, s
	}
	run := func(e *evict.Evictor) {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); e.Run(ctx) }()
		t.Cleanup(func() { cancel(); <-done })
	}
	r.a, r.sa = open("A")
	run(r.a)
	testsupport.Eventually(t, 10*time.Second, "A leads the shared budget", r.a.Leader)
	r.b, r.sb = open("B")
	run(r.b)
	return r
}

// bucketBytes lists the bucket: what every replica's cache holds.
func bucketBytes(t *testing.T, s *storage.Store) int64 {
	t.Helper()
	objs, err := s.Objects(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, o := range objs {
		n += o.Size
	}
	return n
}

// TestSharedBudgetIsOne: two replicas filling one bucket keep one budget:
// the union stays within it (each alone is under it), only the leader
// evicts, and both indexes count what the other committed and removed.
func TestSharedBudgetIsOne(t *testing.T) {
	var clk clock
	clk.set(1)
	r := startReplicas(t, &clk, 10*sharedBlob)
	if r.b.Leader() {
		t.Fatal("B leads too")
	}
	var ofB []digest.Digest
	for i := range 7 {
		clk.set(2 + i)
		putBlob(t, r.sa, sharedBlob)
		clk.set(20 + i)
		ofB = append(ofB, putBlob(t, r.sb, sharedBlob))
	}
	// Each replica committed 7000 bytes, within the budget alone; the
	// bucket holds 14000. The leader evicts (to the low-water mark of what
	// it has counted when it runs).
	testsupport.Eventually(t, 20*time.Second, "the bucket within the budget", func() bool {
		return bucketBytes(t, r.sa) <= 10*sharedBlob
	})
	testsupport.Eventually(t, 10*time.Second, "both indexes count the union", func() bool {
		n := bucketBytes(t, r.sa)
		return r.a.Used() == n && r.b.Used() == n
	})
	// The least recently used went: A's blobs (minutes 2-8) before B's
	// (20-26), whichever replica committed them.
	for _, d := range ofB {
		if !cached(t, r.sa, d) {
			t.Errorf("B's recent blob %s evicted before A's older ones", d)
		}
	}
	// B does not evict, even over budget by its own count.
	clk.set(40)
	putBlob(t, r.sb, sharedBlob)
	putBlob(t, r.sb, sharedBlob)
	if res, err := r.b.Evict(t.Context()); err != nil || len(res.Removed) != 0 {
		t.Fatalf("B evicted %v (%v); only the leader evicts", res.Removed, err)
	}
	testsupport.Eventually(t, 20*time.Second, "the leader evicts B's excess", func() bool {
		return bucketBytes(t, r.sa) <= 10*sharedBlob
	})
}

// TestSharedBudgetSparesOtherReplicasLease: a blob that replica B is
// serving (leased) is not removed by A's pass, though it is the least
// recently used; once B's response ends, the next pass removes it.
func TestSharedBudgetSparesOtherReplicasLease(t *testing.T) {
	var clk clock
	clk.set(1)
	r := startReplicas(t, &clk, 10*sharedBlob)
	old := putBlob(t, r.sb, sharedBlob)
	release, err := r.b.Lease(t.Context(), old)
	if err != nil {
		t.Fatal(err)
	}
	var rest []digest.Digest
	for i := range 8 {
		clk.set(2 + i)
		rest = append(rest, putBlob(t, r.sb, sharedBlob))
	}
	testsupport.Eventually(t, 10*time.Second, "A counts B's blobs", func() bool { return r.a.Used() == 9*sharedBlob })
	for i := range 3 {
		clk.set(20 + i)
		putBlob(t, r.sa, sharedBlob) // 12 blobs: three must go
	}
	testsupport.Eventually(t, 20*time.Second, "the bucket back within the budget", func() bool {
		return bucketBytes(t, r.sa) <= 10*sharedBlob
	})
	if !cached(t, r.sa, old) {
		t.Fatal("A's pass removed the blob B is serving")
	}
	for _, d := range rest[:2] {
		if cached(t, r.sa, d) {
			t.Errorf("blob %s (the next least recently used) was kept", d)
		}
	}
	// B's response ends: old is now the first to go.
	release()
	clk.set(30)
	putBlob(t, r.sa, sharedBlob)
	putBlob(t, r.sa, sharedBlob)
	testsupport.Eventually(t, 20*time.Second, "the unleased old blob evicted", func() bool { return !cached(t, r.sa, old) })
}

// TestSharedBudgetFullRefusesOnNonLeader: when everything is being served
// on the leader, a fill on B is refused (served without caching) instead
// of B evicting on its own.
func TestSharedBudgetFullRefusesOnNonLeader(t *testing.T) {
	var clk clock
	clk.set(1)
	r := startReplicas(t, &clk, 10*sharedBlob)
	for range 9 {
		d := putBlob(t, r.sa, sharedBlob)
		rel, err := r.a.Lease(t.Context(), d)
		if err != nil {
			t.Fatal(err)
		}
		defer rel()
	}
	testsupport.Eventually(t, 10*time.Second, "B counts A's blobs", func() bool { return r.b.Used() == 9*sharedBlob })
	_, err := r.b.Admit(t.Context(), digest.FromString("new"), 2*sharedBlob)
	if !errors.Is(err, evict.ErrFull) {
		t.Fatalf("Admit on B: %v, want ErrFull", err)
	}
	if n := bucketBytes(t, r.sa); n != 9*sharedBlob {
		t.Fatalf("bucket holds %d bytes, want the 9 leased blobs", n)
	}
	// One blob fits without evicting anything.
	rel, err := r.b.Admit(t.Context(), digest.FromString("small"), sharedBlob)
	if err != nil {
		t.Fatalf("Admit of a blob that fits: %v", err)
	}
	rel()
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// TestSharedBudgetNonLeaderGetsRoom: a blob that does not fit on B, with
// the cache under budget (nothing for a pass of the leader's own to do),
// is admitted once the leader has evicted room for it.
func TestSharedBudgetNonLeaderGetsRoom(t *testing.T) {
	var clk clock
	clk.set(1)
	r := startReplicas(t, &clk, 10*sharedBlob)
	for i := range 9 {
		clk.set(2 + i)
		putBlob(t, r.sa, sharedBlob)
	}
	testsupport.Eventually(t, 10*time.Second, "B counts A's blobs", func() bool { return r.b.Used() == 9*sharedBlob })
	rel, err := r.b.Admit(t.Context(), digest.FromString("big"), 3*sharedBlob)
	if err != nil {
		t.Fatalf("Admit on B: %v, want room made by the leader", err)
	}
	rel()
	if n := bucketBytes(t, r.sa); n > 7*sharedBlob {
		t.Fatalf("bucket holds %d bytes: the leader did not make room for 3000", n)
	}
}

// TestSharedBudgetCommitCountsOnce: a blob B admitted, filled and
// committed counts once on the leader, as cached, from the exchange that
// brings its commit, even while B's fill still holds its reservation: B
// fills three blobs that together fit the budget, and nothing is evicted.
func TestSharedBudgetCommitCountsOnce(t *testing.T) {
	var clk clock
	clk.set(1)
	r := startReplicas(t, &clk, 10*sharedBlob)
	const size = 3 * sharedBlob
	var blobs []digest.Digest
	for i := range 3 {
		clk.set(2 + i)
		data := []byte(fmt.Sprintf("%0*d", size, i))
		d := digest.FromBytes(data)
		blobs = append(blobs, d)
		release, err := r.b.Admit(t.Context(), d, size)
		if err != nil {
			t.Fatalf("blob %d: Admit on B: %v", i, err)
		}
		testsupport.Eventually(t, 10*time.Second, "A counts B's reservation", func() bool { return r.a.Reserved() == size })
		commitBlob(t, r.sb, data)
		want := int64(i+1) * size
		testsupport.Eventually(t, 10*time.Second, "A counts B's commit", func() bool { return r.a.Used() == want })
		if got := r.a.Reserved(); got != 0 {
			t.Fatalf("blob %d: A counts %d bytes reserved for a blob it counts as cached", i, got)
		}
		if res, err := r.a.Evict(t.Context()); err != nil || len(res.Removed) > 0 {
			t.Fatalf("blob %d: A's pass under budget removed %v (err %v)", i, res.Removed, err)
		}
		release()
	}
	for i, d := range blobs {
		if !cached(t, r.sa, d) {
			t.Errorf("blob %d evicted under budget", i)
		}
	}
}
