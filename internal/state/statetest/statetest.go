// Package statetest is the contract every state.Store must meet. Run it
// from a backend's tests with a constructor of fresh, empty stores.
package statetest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/state"
)

// Run runs the contract. open returns a fresh, empty store; calling it
// twice in one test must give two handles on the same data (two replicas)
// when shared is true.
func Run(t *testing.T, open func(t *testing.T) state.Store, shared func(t *testing.T) (state.Store, state.Store)) {
	t.Run("Tags", func(t *testing.T) { testTags(t, open(t)) })
	t.Run("Pulls", func(t *testing.T) { testPulls(t, open(t)) })
	t.Run("Jobs", func(t *testing.T) { testJobs(t, open(t)) })
	t.Run("CancelJob", func(t *testing.T) { a, b := shared(t); testCancelJob(t, a, b) })
	t.Run("Lock", func(t *testing.T) { a, b := shared(t); testLock(t, a, b) })
	t.Run("Claim", func(t *testing.T) { a, b := shared(t); testClaim(t, a, b) })
}

var ctx = context.Background()

func testTags(t *testing.T, s state.Store) {
	now := time.Now().UTC().Truncate(time.Second)
	if tags, err := s.Tags(ctx, "nvidia/pytorch"); err != nil || len(tags) != 0 {
		t.Fatalf("empty store: %v %v", tags, err)
	}
	in := []state.Tag{
		{Repository: "nvidia/pytorch", Name: "24.05-py3", Digest: "sha256:aa", Platforms: []string{"linux/amd64", "linux/arm64"}, FirstSeen: now, LastSeen: now},
		{Repository: "nvidia/pytorch", Name: "24.04-py3", FirstSeen: now, LastSeen: now},
		{Repository: "nvidia/pytorch-other", Name: "1", FirstSeen: now, LastSeen: now},
	}
	if err := s.PutTags(ctx, in); err != nil {
		t.Fatal(err)
	}
	got, err := s.Tags(ctx, "nvidia/pytorch")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Name != "24.04-py3" || got[1].Name != "24.05-py3" {
		t.Fatalf("tags = %+v (want the two of nvidia/pytorch, by name; not nvidia/pytorch-other's)", got)
	}
	if got[1].Digest != "sha256:aa" || !slices.Equal(got[1].Platforms, in[0].Platforms) || !got[1].FirstSeen.Equal(now) {
		t.Errorf("round trip: %+v", got[1])
	}
	// Update replaces.
	upd := got[0]
	upd.Digest = "sha256:bb"
	upd.LastSeen = now.Add(time.Hour)
	if err := s.PutTags(ctx, []state.Tag{upd}); err != nil {
		t.Fatal(err)
	}
	got, _ = s.Tags(ctx, "nvidia/pytorch")
	if len(got) != 2 || got[0].Digest != "sha256:bb" || !got[0].LastSeen.Equal(now.Add(time.Hour)) {
		t.Errorf("after update: %+v", got)
	}
	if err := s.MarkPolled(ctx, "nvidia/pytorch", now); err != nil {
		t.Fatal(err)
	}
	repos, err := s.Repositories(ctx)
	if err != nil || len(repos) != 1 || repos[0].Name != "nvidia/pytorch" || !repos[0].LastPolled.Equal(now) {
		t.Errorf("repositories = %+v, %v", repos, err)
	}
}

func testPulls(t *testing.T, s state.Store) {
	t0 := time.Now().UTC().Truncate(time.Second).Add(-48 * time.Hour)
	pulls := []state.Pull{
		{Repository: "nvidia/pytorch", Tag: "24.04-py3", Digest: "sha256:1", Client: "10.0.0.1", Time: t0},
		{Repository: "nvidia/pytorch", Tag: "24.04-py3", Digest: "sha256:2", Platform: "linux/amd64", Client: "10.0.0.1", Time: t0.Add(time.Hour)},
		{Repository: "nvidia/pytorch", Tag: "24.04-py3", Digest: "sha256:2", Platform: "linux/amd64", Client: "10.0.0.2", Time: t0.Add(47 * time.Hour)},
		{Repository: "nvidia/cuda", Tag: "12.4.1-base-ubuntu22.04", Digest: "sha256:3", Client: "alice", Time: t0.Add(2 * time.Hour)},
	}
	for _, p := range pulls {
		if err := s.RecordPull(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	all, err := s.Usage(ctx, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	want := []state.Usage{
		{Repository: "nvidia/cuda", Tag: "12.4.1-base-ubuntu22.04", Count: 1, Last: t0.Add(2 * time.Hour)},
		{Repository: "nvidia/pytorch", Tag: "24.04-py3", Count: 1, Last: t0},
		{Repository: "nvidia/pytorch", Tag: "24.04-py3", Platform: "linux/amd64", Count: 2, Last: t0.Add(47 * time.Hour)},
	}
	if !equalUsage(all, want) {
		t.Fatalf("usage = %+v\nwant %+v", all, want)
	}
	recent, err := s.Usage(ctx, t0.Add(24*time.Hour))
	if err != nil || !equalUsage(recent, want[2:]) {
		t.Errorf("usage since t0+24h = %+v, %v", recent, err)
	}
	log, err := s.RecentPulls(ctx, 2)
	if err != nil || len(log) != 2 || log[0].Repository != "nvidia/cuda" || log[1].Client != "10.0.0.2" {
		t.Errorf("recent pulls = %+v, %v (want newest first)", log, err)
	}
	repos, err := s.Repositories(ctx)
	if err != nil || len(repos) != 2 {
		t.Fatalf("repositories = %+v, %v", repos, err)
	}
	if r := repos[1]; r.Name != "nvidia/pytorch" || r.Pulls != 3 || !r.LastPulled.Equal(t0.Add(47*time.Hour)) {
		t.Errorf("pytorch = %+v", r)
	}
	// Concurrent recording loses nothing.
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = s.RecordPull(ctx, state.Pull{Repository: "nvidia/tritonserver", Tag: "24.05-py3", Client: fmt.Sprint(i), Time: time.Now()})
		}()
	}
	wg.Wait()
	u, _ := s.Usage(ctx, time.Now().Add(-time.Minute))
	if len(u) != 1 || u[0].Count != 20 {
		t.Errorf("concurrent pulls: %+v", u)
	}
}

func equalUsage(a, b []state.Usage) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		x, y := a[i], b[i]
		if x.Repository != y.Repository || x.Tag != y.Tag || x.Platform != y.Platform || x.Count != y.Count || !x.Last.Equal(y.Last) {
			return false
		}
	}
	return true
}

func testJobs(t *testing.T, s state.Store) {
	if _, err := s.Job(ctx, "nope"); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("missing job: %v", err)
	}
	t0 := time.Now().UTC()
	j := state.Job{ID: "j1", Repository: "nvidia/pytorch", Reference: "24.05-py3", Platforms: []string{"linux/amd64"}, State: state.JobQueued, Created: t0, Updated: t0}
	if err := s.PutJob(ctx, j); err != nil {
		t.Fatal(err)
	}
	j2 := j
	j2.ID, j2.Created = "j2", t0.Add(time.Second)
	if err := s.PutJob(ctx, j2); err != nil {
		t.Fatal(err)
	}
	j.State, j.BytesDone, j.BytesTotal, j.Errors = state.JobRunning, 10, 100, []string{"x"}
	if err := s.PutJob(ctx, j); err != nil {
		t.Fatal(err)
	}
	got, err := s.Job(ctx, "j1")
	if err != nil || got.State != state.JobRunning || got.BytesDone != 10 || len(got.Errors) != 1 || !got.Created.Equal(t0) {
		t.Fatalf("job = %+v, %v", got, err)
	}
	jobs, err := s.Jobs(ctx)
	if err != nil || len(jobs) != 2 || jobs[0].ID != "j2" {
		t.Fatalf("jobs = %+v, %v (want newest first)", jobs, err)
	}
	// Beyond MaxJobs the oldest ended jobs go; unfinished ones stay.
	for i := range state.MaxJobs + 5 {
		e := state.Job{ID: fmt.Sprintf("old-%03d", i), State: state.JobDone, Created: t0.Add(-time.Hour + time.Duration(i)*time.Millisecond)}
		if err := s.PutJob(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	jobs, _ = s.Jobs(ctx)
	if len(jobs) > state.MaxJobs {
		t.Errorf("kept %d jobs, want at most %d", len(jobs), state.MaxJobs)
	}
	if _, err := s.Job(ctx, "j1"); err != nil {
		t.Errorf("a running job was trimmed: %v", err)
	}
	if _, err := s.Job(ctx, "old-000"); !errors.Is(err, state.ErrNotFound) {
		t.Errorf("oldest ended job kept: %v", err)
	}
}

func testLock(t *testing.T, a, b state.Store) {
	ttl := 300 * time.Millisecond
	ok, err := a.Lock(ctx, "scheduler", "A", ttl)
	if err != nil || !ok {
		t.Fatalf("A takes free lock: %v %v", ok, err)
	}
	if ok, _ := b.Lock(ctx, "scheduler", "B", ttl); ok {
		t.Fatal("B took a held lock")
	}
	// A renews within the ttl, repeatedly: B never gets it.
	for range 4 {
		time.Sleep(ttl / 3)
		if ok, _ := a.Lock(ctx, "scheduler", "A", ttl); !ok {
			t.Fatal("A could not renew")
		}
		if ok, _ := b.Lock(ctx, "scheduler", "B", ttl); ok {
			t.Fatal("B took a renewed lock")
		}
	}
	// A dies (stops renewing): the lock expires and B gets it.
	time.Sleep(ttl + 100*time.Millisecond)
	if ok, _ := b.Lock(ctx, "scheduler", "B", ttl); !ok {
		t.Fatal("B did not get an expired lock")
	}
	if ok, _ := a.Lock(ctx, "scheduler", "A", ttl); ok {
		t.Fatal("A renewed a lock it lost")
	}
	// Unlock by a non-owner does nothing; by the owner frees it.
	_ = a.Unlock(ctx, "scheduler", "A")
	if ok, _ := a.Lock(ctx, "scheduler", "A", ttl); ok {
		t.Fatal("A's unlock released B's lock")
	}
	_ = b.Unlock(ctx, "scheduler", "B")
	if ok, _ := a.Lock(ctx, "scheduler", "A", ttl); !ok {
		t.Fatal("lock not free after owner's unlock")
	}
	// Many contenders at once: exactly one wins.
	_ = a.Unlock(ctx, "scheduler", "A")
	wins := contend(a, b, func(st state.Store, i int) bool {
		ok, _ := st.Lock(ctx, "race", fmt.Sprint("owner-", i), time.Minute)
		return ok
	})
	if wins != 1 {
		t.Errorf("%d contenders won the lock, want 1", wins)
	}
}

func testClaim(t *testing.T, a, b state.Store) {
	wins := contend(a, b, func(st state.Store, _ int) bool {
		ok, _ := st.Claim(ctx, "tick:rule:1000", time.Minute)
		return ok
	})
	if wins != 1 {
		t.Errorf("%d claims won, want 1", wins)
	}
	if ok, _ := a.Claim(ctx, "tick:rule:1001", time.Minute); !ok {
		t.Error("a new key was not claimable")
	}
	if ok, _ := a.Claim(ctx, "short", 200*time.Millisecond); !ok {
		t.Fatal("claim short")
	}
	time.Sleep(400 * time.Millisecond)
	if ok, _ := b.Claim(ctx, "short", time.Minute); !ok {
		t.Error("an expired claim was not claimable again")
	}
}

// contend runs try from 16 goroutines at once, half on each store, and
// returns how many got true.
func contend(a, b state.Store, try func(st state.Store, i int) bool) int {
	var wins atomic.Int32
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st := a
			if i%2 == 1 {
				st = b
			}
			if try(st, i) {
				wins.Add(1)
			}
		}()
	}
	wg.Wait()
	return int(wins.Load())
}

// testCancelJob: a queued or running job is cancelled for good (through
// another replica's handle too): progress writes of its runner are
// refused, a final cancelled write and a new enqueue are not; an ended
// job is left as it is; an unknown one is ErrNotFound.
func testCancelJob(t *testing.T, a, b state.Store) {
	if _, err := a.CancelJob(ctx, "nope"); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("cancel of an unknown job: %v", err)
	}
	t0 := time.Now().UTC()
	run := state.Job{ID: "c1", Repository: "nvidia/pytorch", Reference: "24.05-py3", State: state.JobRunning, Created: t0, Updated: t0,
		BlobsTotal: 4, BlobsDone: 1, BytesTotal: 400, BytesDone: 100, Current: "sha256:aa"}
	if err := a.PutJob(ctx, run); err != nil {
		t.Fatal(err)
	}
	got, err := b.CancelJob(ctx, "c1")
	if err != nil || got.State != state.JobCancelled || got.Finished.IsZero() || got.Current != "" || got.BytesDone != 100 || !got.Ended() {
		t.Fatalf("cancel of a running job: %+v, %v", got, err)
	}
	// The runner's next progress save (and its final "done") are refused.
	run.BytesDone, run.BlobsDone = 200, 2
	if err := a.PutJob(ctx, run); !errors.Is(err, state.ErrCancelled) {
		t.Errorf("progress write over a cancelled job: %v, want ErrCancelled", err)
	}
	run.State = state.JobDone
	if err := a.PutJob(ctx, run); !errors.Is(err, state.ErrCancelled) {
		t.Errorf("done over a cancelled job: %v, want ErrCancelled", err)
	}
	if j, _ := a.Job(ctx, "c1"); j.State != state.JobCancelled || j.BytesDone != 100 {
		t.Errorf("after refused writes: %+v", j)
	}
	// Its final progress, still cancelled, is kept.
	final := got
	final.BytesDone = 150
	if err := a.PutJob(ctx, final); err != nil {
		t.Errorf("final cancelled write: %v", err)
	}
	// Cancelling again changes nothing.
	if again, err := a.CancelJob(ctx, "c1"); err != nil || again.State != state.JobCancelled || again.BytesDone != 150 {
		t.Errorf("second cancel: %+v, %v", again, err)
	}
	// Enqueued again, it runs again.
	requeued := state.Job{ID: "c1", Repository: "nvidia/pytorch", Reference: "24.05-py3", State: state.JobQueued, Created: t0, Updated: time.Now().UTC()}
	if err := b.PutJob(ctx, requeued); err != nil {
		t.Fatalf("enqueue of a cancelled job: %v", err)
	}
	requeued.State = state.JobRunning
	if err := a.PutJob(ctx, requeued); err != nil {
		t.Errorf("running after a new enqueue: %v", err)
	}
	// A queued job is cancelled as well; an ended one is left alone.
	q := state.Job{ID: "c2", State: state.JobQueued, Created: t0, Updated: t0}
	done := state.Job{ID: "c3", State: state.JobDone, Created: t0, Updated: t0, Finished: t0}
	for _, j := range []state.Job{q, done} {
		if err := a.PutJob(ctx, j); err != nil {
			t.Fatal(err)
		}
	}
	if j, err := a.CancelJob(ctx, "c2"); err != nil || j.State != state.JobCancelled {
		t.Errorf("cancel of a queued job: %+v, %v", j, err)
	}
	if j, err := a.CancelJob(ctx, "c3"); err != nil || j.State != state.JobDone || !j.Finished.Equal(t0) {
		t.Errorf("cancel of a done job: %+v, %v", j, err)
	}
	// Cancels racing with the runner's saves: every cancel wins.
	for i := range 20 {
		id := fmt.Sprintf("race-%d", i)
		r := state.Job{ID: id, State: state.JobRunning, Created: t0, Updated: t0}
		if err := a.PutJob(ctx, r); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := range 50 {
				r.BytesDone = int64(n)
				if err := a.PutJob(ctx, r); errors.Is(err, state.ErrCancelled) {
					return
				}
			}
		}()
		if _, err := b.CancelJob(ctx, id); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		if j, _ := a.Job(ctx, id); j.State != state.JobCancelled {
			t.Fatalf("%s: a racing progress save undid the cancel: %+v", id, j)
		}
	}
}
