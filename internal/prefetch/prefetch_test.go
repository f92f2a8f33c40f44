package prefetch_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/prefetch"
	"github.com/ngc-mirror/ngc-mirror/internal/prefetch/prefetchtest"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
	"github.com/ngc-mirror/ngc-mirror/internal/state/redistest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
	"github.com/ngc-mirror/ngc-mirror/internal/tracking"
)

var ctx = context.Background()

func cached(w *prefetchtest.World, d digest.Digest) bool {
	_, err := w.Cache.StatBlob(ctx, d)
	return err == nil
}

func manifestFetches(up *ngctest.Upstream, repo string, d digest.Digest) int {
	return up.Count("registry", http.MethodGet, "/v2/"+repo+"/manifests/"+d.String())
}

// A job for one platform fetches that platform's manifest, config and
// layers once each, keeps the index, and touches nothing of the others.
func TestPlatformFilterFetchesOnlyThoseLayers(t *testing.T) {
	forEachVia(t, testPlatformFilterFetchesOnlyThoseLayers)
}

func testPlatformFilterFetchesOnlyThoseLayers(t *testing.T, via string) {
	w := prefetchtest.New(t, prefetchtest.Options{Via: via})
	w.Start(t)
	repo, idx := ngctest.PytorchRepo, w.Fx.Pytorch
	arm, amd := idx.Child("linux/arm64"), idx.Child("linux/amd64")
	j, created, err := w.Sched.Enqueue(ctx, prefetch.Target{Repository: w.Q(repo), Reference: ngctest.PytorchTag, Platforms: []string{"linux/arm64"}})
	if err != nil || !created {
		t.Fatal(created, err)
	}
	j = w.WaitJob(t, j.ID, 20*time.Second)
	var total int64
	for _, b := range arm.Blobs() {
		total += int64(len(b.Body))
	}
	if j.State != state.JobDone || j.BlobsTotal != len(arm.Blobs()) || j.BlobsDone != j.BlobsTotal || j.BytesTotal != total || j.BytesDone != total ||
		j.BlobsFetched != j.BlobsTotal || j.BytesFetched != total || j.Started.IsZero() {
		t.Fatalf("job = %+v (want done, %d blobs, %d bytes, all fetched)", j, len(arm.Blobs()), total)
	}
	for _, b := range arm.Blobs() {
		if n := w.Up.BlobFetches(b.Digest); n != 1 || !cached(w, b.Digest) {
			t.Errorf("arm64 blob %s: fetched %d times, cached %v", b.Digest, n, cached(w, b.Digest))
		}
	}
	for _, b := range amd.Blobs() {
		if n := w.Up.BlobFetches(b.Digest); n != 0 || cached(w, b.Digest) {
			t.Errorf("amd64 blob %s fetched %d times (cached %v); the job asked for arm64 only", b.Digest, n, cached(w, b.Digest))
		}
	}
	if n := manifestFetches(w.Up, repo, amd.Manifest.Digest); n != 0 {
		t.Errorf("amd64 manifest fetched %d times", n)
	}
	for _, d := range []digest.Digest{idx.Manifest.Digest, arm.Manifest.Digest} {
		if _, err := w.Cache.GetManifest(ctx, d); err != nil {
			t.Errorf("manifest %s not cached: %v", d, err)
		}
	}
	if got := testutil.ToFloat64(w.Metrics.PrefetchBlobs.WithLabelValues("fetched")); got != float64(len(arm.Blobs())) {
		t.Errorf("fetched blobs metric = %v", got)
	}

	// Idempotent: the same target again fetches nothing more.
	before := len(w.Up.CDNRequests())
	j2, created, err := w.Sched.Enqueue(ctx, prefetch.Target{Repository: w.Q(repo), Reference: ngctest.PytorchTag, Platforms: []string{"linux/arm64"}})
	if err != nil || !created || j2.ID != j.ID {
		t.Fatalf("re-enqueue: %+v %v %v", j2, created, err)
	}
	j2 = w.WaitJob(t, j2.ID, 20*time.Second)
	if j2.State != state.JobDone || j2.BytesDone != total || j2.BlobsFetched != 0 || j2.BytesFetched != 0 {
		t.Errorf("re-run = %+v (want done, everything already cached, nothing fetched)", j2)
	}
	for _, r := range w.Up.CDNRequests()[before:] {
		t.Errorf("re-run fetched a blob again: %+v", r)
	}
}

// A rule with latest-N, a variant filter and a platform selects the newest
// release of that variant only, and its job fetches that platform; a glob
// rule selects among tracked repositories.
func TestRuleSelectsTagsAndPlatforms(t *testing.T) {
	forEachVia(t, testRuleSelectsTagsAndPlatforms)
}

func testRuleSelectsTagsAndPlatforms(t *testing.T, via string) {
	path := ngctest.PytorchRepo
	repo := qual(via, path)
	w := prefetchtest.New(t, prefetchtest.Options{Via: via,
		Tracking: tracking.Options{Repositories: []string{repo}},
		Rules: []prefetch.RuleSpec{
			{Name: "frameworks", Repositories: []string{repo}, Tags: config.TagSelect{Latest: 1},
				Variants: []string{"py3"}, Platforms: []string{"linux/amd64"}},
			{Name: "globbed", Repositories: []string{qual(via, "nvidia/pyt*"), qual(via, "nvidia/**/nothing")}, Tags: config.TagSelect{Exact: []string{"24.04-py3"}, Regex: `1[78]\..*`}},
		}})
	releases := map[string]*ngctest.Image{}
	for _, tag := range []string{"24.04-py3", "24.05-py3", "24.05-py3-igpu"} {
		im, err := w.Up.AddRelease(path, tag, 4<<10)
		if err != nil {
			t.Fatal(err)
		}
		releases[tag] = im
	}
	w.Start(t)
	rules := w.Sched.Rules()
	jobs, err := w.Sched.RunRule(ctx, rules[0])
	if err != nil {
		t.Fatal(err)
	}
	if len(jobs) != 1 || jobs[0].Reference != "24.05-py3" || !slices.Equal(jobs[0].Platforms, []string{"linux/amd64"}) || jobs[0].Rule != "frameworks" {
		t.Fatalf("rule jobs = %+v, want one for 24.05-py3 linux/amd64", jobs)
	}
	if j := w.WaitJob(t, jobs[0].ID, 20*time.Second); j.State != state.JobDone {
		t.Fatalf("job = %+v", j)
	}
	for _, b := range releases["24.05-py3"].Child("linux/amd64").Blobs() {
		if w.Up.BlobFetches(b.Digest) != 1 {
			t.Errorf("amd64 blob of 24.05-py3 fetched %d times", w.Up.BlobFetches(b.Digest))
		}
	}
	for _, im := range []*ngctest.Image{releases["24.05-py3"].Child("linux/arm64"), releases["24.05-py3-igpu"], releases["24.04-py3"]} {
		for _, b := range im.Blobs() {
			if w.Up.BlobFetches(b.Digest) != 0 {
				t.Errorf("blob %s outside the rule was fetched", b.Digest)
			}
		}
	}

	targets, err := w.Sched.Expand(ctx, rules[1])
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, tg := range targets {
		got = append(got, tg.Repository+":"+tg.Reference)
	}
	if want := []string{repo + ":17.12", repo + ":18.01-py3", repo + ":24.04-py3"}; !slices.Equal(got, want) {
		t.Errorf("glob rule targets = %v, want %v", got, want)
	}
}

func TestCompileRejectsMalformedRules(t *testing.T) {
	ok := prefetch.RuleSpec{Name: "r", Repositories: []string{"nvidia/pytorch"}, Tags: config.TagSelect{Latest: 1}}
	if _, err := prefetch.Compile(ok); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*prefetch.RuleSpec){
		"no name":         func(r *prefetch.RuleSpec) { r.Name = "" },
		"reserved name":   func(r *prefetch.RuleSpec) { r.Name = prefetch.AutoRule },
		"no repositories": func(r *prefetch.RuleSpec) { r.Repositories = nil },
		"bad repository":  func(r *prefetch.RuleSpec) { r.Repositories = []string{"Nvidia/PyTorch"} },
		"bad glob":        func(r *prefetch.RuleSpec) { r.Repositories = []string{"nvidia/[a"} },
		"no tags":         func(r *prefetch.RuleSpec) { r.Tags = config.TagSelect{} },
		"bad regex":       func(r *prefetch.RuleSpec) { r.Tags.Regex = "(" },
		"bad exact tag":   func(r *prefetch.RuleSpec) { r.Tags.Exact = []string{"a:b"} },
		"negative latest": func(r *prefetch.RuleSpec) { r.Tags.Latest = -1 },
		"bad platform":    func(r *prefetch.RuleSpec) { r.Platforms = []string{"amd64"} },
		"bad schedule":    func(r *prefetch.RuleSpec) { r.Schedule = "every day" },
		"too frequent":    func(r *prefetch.RuleSpec) { r.Schedule = "@every 1ms" },
		"bad concurrency": func(r *prefetch.RuleSpec) { r.Concurrency = 1000 },
		"bad bandwidth":   func(r *prefetch.RuleSpec) { r.Bandwidth = -1 },
	} {
		spec := ok
		spec.Tags.Exact = nil
		mut(&spec)
		if _, err := prefetch.Compile(spec); !errors.Is(err, prefetch.ErrInvalidRule) {
			t.Errorf("%s: Compile = %v, want ErrInvalidRule", name, err)
		}
	}
	for _, c := range []struct {
		pattern, name string
		match         bool
	}{
		{"nvidia/*", "nvidia/pytorch", true},
		{"nvidia/*", "nvidia/k8s/dcgm-exporter", false},
		{"nvidia/**", "nvidia/k8s/dcgm-exporter", true},
		{"nvidia/**/dcgm-exporter", "nvidia/k8s/dcgm-exporter", true},
		{"nvidia/**", "nim/meta/llama3", false},
		{"**", "a/b/c", true},
	} {
		r, err := prefetch.Compile(prefetch.RuleSpec{Name: "g", Repositories: []string{c.pattern}, Tags: config.TagSelect{Latest: 1}})
		if err != nil {
			t.Fatal(err)
		}
		if got := r.Matches(c.name); got != c.match {
			t.Errorf("pattern %q matches %q: %v", c.pattern, c.name, got)
		}
	}
}

// pullAs replays Docker's pull of repo:tag for one platform: the index by
// tag, then the platform's manifest by digest.
func pullAs(t *testing.T, w *prefetchtest.World, repo, tag string, child *ngctest.Image) {
	t.Helper()
	for _, ref := range []string{tag, child.Manifest.Digest.String()} {
		req, _ := http.NewRequest(http.MethodGet, w.Server.URL+"/v2/"+repo+"/manifests/"+ref, nil)
		req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %d", ref, resp.StatusCode)
		}
	}
}

// The automatic rule: nodes pulled 24.04-py3 for amd64; when 24.05-py3
// appears upstream, the poll tick prefetches it for amd64 only, and not the
// variants nobody pulled.
func TestAutoRuleFollowsPullHistory(t *testing.T) {
	forEachVia(t, testAutoRuleFollowsPullHistory)
}

func testAutoRuleFollowsPullHistory(t *testing.T, via string) {
	w := prefetchtest.New(t, prefetchtest.Options{Via: via, Prefetch: prefetch.Options{Auto: true, PollSchedule: "@every 1s"}})
	path := ngctest.PytorchRepo
	repo := w.Q(path)
	old, err := w.Up.AddRelease(path, "24.04-py3", 4<<10)
	if err != nil {
		t.Fatal(err)
	}
	w.Start(t)
	pullAs(t, w, repo, "24.04-py3", old.Child("linux/amd64"))
	testsupport.Eventually(t, 10*time.Second, "the first poll", func() bool {
		tags, _ := w.State.Tags(ctx, repo)
		return len(tags) == 3
	})
	if jobs, _ := w.State.Jobs(ctx); len(jobs) != 0 {
		t.Fatalf("jobs before any new release: %+v", jobs)
	}
	next, err := w.Up.AddRelease(path, "24.05-py3", 4<<10)
	if err != nil {
		t.Fatal(err)
	}
	igpu, err := w.Up.AddRelease(path, "24.05-py3-igpu", 4<<10, "linux/arm64")
	if err != nil {
		t.Fatal(err)
	}
	var job state.Job
	testsupport.Eventually(t, 15*time.Second, "an automatic job for 24.05-py3", func() bool {
		jobs, _ := w.State.Jobs(ctx)
		for _, j := range jobs {
			if j.Ended() {
				job = j
				return true
			}
		}
		return false
	})
	if job.Rule != prefetch.AutoRule || job.Reference != "24.05-py3" || !slices.Equal(job.Platforms, []string{"linux/amd64"}) || job.State != state.JobDone {
		t.Fatalf("automatic job = %+v", job)
	}
	for _, b := range next.Child("linux/amd64").Blobs() {
		if !cached(w, b.Digest) {
			t.Errorf("24.05-py3 amd64 blob %s not prefetched", b.Digest)
		}
	}
	for _, im := range []*ngctest.Image{next.Child("linux/arm64"), igpu} {
		for _, b := range im.Blobs() {
			if w.Up.BlobFetches(b.Digest) != 0 {
				t.Errorf("blob %s nobody pulls was prefetched", b.Digest)
			}
		}
	}
	// Later polls do not redo it.
	time.Sleep(2500 * time.Millisecond)
	if jobs, _ := w.State.Jobs(ctx); len(jobs) != 1 || jobs[0].Updated.After(job.Updated) {
		t.Errorf("jobs after more polls = %+v", jobs)
	}
}

// stall makes the CDN hold blob d until release is closed (or the client
// goes away).
func stall(up *ngctest.Upstream, d digest.Digest, release <-chan struct{}, started *atomic.Int32) {
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !up.IsCDN(r) || !strings.HasSuffix(r.URL.Path, d.String()) {
			return false
		}
		started.Add(1)
		select {
		case <-release:
			return false
		case <-r.Context().Done():
			return true
		}
	})
}

// A job cut off by a restart is resumed by the next process and fetches
// only what it had not cached.
func TestJobResumesAfterRestart(t *testing.T) {
	cacheDir, stateDir := t.TempDir(), t.TempDir()
	a := prefetchtest.New(t, prefetchtest.Options{CacheDir: cacheDir, StateDir: stateDir, Prefetch: prefetch.Options{Owner: "a"}})
	repo, amd := ngctest.PytorchRepo, a.Fx.Pytorch.Child("linux/amd64")
	blobs := amd.Blobs()
	last := blobs[len(blobs)-1].Digest
	release := make(chan struct{})
	var started atomic.Int32
	stall(a.Up, last, release, &started)
	// A's stalled fill outlives A's scheduler: at the end it is let go and
	// waited for, before the shared cache directory is removed (it would
	// otherwise write into it while it goes).
	t.Cleanup(func() {
		close(release)
		wctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := a.Fills.Wait(wctx); err != nil {
			t.Errorf("replica a's fill still running: %v", err)
		}
	})
	stopA := a.Start(t)
	j, _, err := a.Sched.Enqueue(ctx, prefetch.Target{Repository: repo, Reference: ngctest.PytorchTag, Platforms: []string{"linux/amd64"}})
	if err != nil {
		t.Fatal(err)
	}
	testsupport.Eventually(t, 15*time.Second, "all but the stalled blob cached", func() bool {
		got, _ := a.State.Job(ctx, j.ID)
		return got.BlobsDone == len(blobs)-1 && started.Load() > 0
	})
	stopA() // the process stops; its job is left running
	if got, _ := a.State.Job(ctx, j.ID); got.State != state.JobRunning || got.Owner != "a" {
		t.Fatalf("after stop: %+v", got)
	}
	a.State.Close()
	a.Up.SetFault(nil)

	b := prefetchtest.New(t, prefetchtest.Options{Upstream: a.Up, Fixture: a.Fx, CacheDir: cacheDir, StateDir: stateDir, Prefetch: prefetch.Options{Owner: "b"}})
	b.Start(t)
	got := b.WaitJob(t, j.ID, 20*time.Second)
	if got.State != state.JobDone || got.Owner != "b" || got.BlobsDone != len(blobs) {
		t.Fatalf("resumed job = %+v", got)
	}
	for _, bl := range blobs[:len(blobs)-1] {
		if n := b.Up.BlobFetches(bl.Digest); n != 1 {
			t.Errorf("blob %s cached before the restart was fetched %d times", bl.Digest, n)
		}
	}
	if !cached(b, last) {
		t.Error("the stalled blob was not cached by the resumed job")
	}
}

// Two replicas sharing Redis: one leads, each scheduled tick runs once,
// and when the leader stops the other takes over.
func TestTwoReplicasRunEachTickOnce(t *testing.T) {
	srv := redistest.Start(t)
	rule := []prefetch.RuleSpec{{Name: "every-second", Repositories: []string{ngctest.PytorchRepo},
		Tags: config.TagSelect{Exact: []string{ngctest.PytorchTag}}, Platforms: []string{"linux/arm64"}, Schedule: "@every 1s"}}
	// Replicas on one shared cache (as on S3).
	dir := t.TempDir()
	a := prefetchtest.New(t, prefetchtest.Options{Redis: srv, CacheDir: dir, Rules: rule, Prefetch: prefetch.Options{Owner: "a", PollSchedule: "@yearly"}})
	b := prefetchtest.New(t, prefetchtest.Options{Redis: srv, CacheDir: dir, Upstream: a.Up, Fixture: a.Fx, Rules: rule, Prefetch: prefetch.Options{Owner: "b", PollSchedule: "@yearly"}})
	stopA := a.Start(t)
	stopB := b.Start(t)
	ticks := func(w *prefetchtest.World) float64 {
		return testutil.ToFloat64(w.Metrics.Ticks.WithLabelValues("rule"))
	}
	testsupport.Eventually(t, 15*time.Second, "four ticks", func() bool { return ticks(a)+ticks(b) >= 4 })
	if a.Sched.Leader() == b.Sched.Leader() {
		t.Fatalf("leaders: a %v, b %v; want exactly one", a.Sched.Leader(), b.Sched.Leader())
	}
	leader, other, stopLeader := a, b, stopA
	if b.Sched.Leader() {
		leader, other, stopLeader = b, a, stopB
	}
	if ticks(other) != 0 {
		t.Errorf("the follower ran %v ticks", ticks(other))
	}
	stopLeader()
	testsupport.Eventually(t, 10*time.Second, "the other replica to take over and tick", func() bool {
		return other.Sched.Leader() && ticks(other) >= 2
	})
	// Every tick that ran claimed its own key: none ran twice.
	rc := redis.NewClient(&redis.Options{Addr: strings.TrimPrefix(strings.TrimSuffix(srv.URL, "/0"), "redis://")})
	defer rc.Close()
	keys, err := rc.Keys(ctx, "ngc-mirror:claim:tick:every-second:*").Result()
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	total := ticks(leader) + ticks(other)
	if float64(len(keys)) < total-1 || float64(len(keys)) > total+1 {
		// A tick may be claimed between reading the keys and the counters.
		t.Errorf("%d claimed ticks, %v ticks run", len(keys), total)
	}
	// The jobs the ticks made are one job (same image), done once: its
	// runs after the first found everything cached, so the history keeps
	// only the first run (the one that fetched) besides the latest.
	jobs, _ := a.State.Jobs(ctx)
	if len(jobs) == 0 || len(jobs) > 2 || (len(jobs) == 2 && (jobs[1].ID != prefetch.ArchivedJobID(jobs[0].ID, 1) || jobs[1].BlobsFetched == 0)) {
		t.Errorf("jobs = %+v", jobs)
	}
	for _, bl := range a.Fx.Pytorch.Child("linux/arm64").Blobs() {
		if n := a.Up.BlobFetches(bl.Digest); n != 1 {
			t.Errorf("blob %s fetched %d times across replicas and ticks", bl.Digest, n)
		}
	}
}

// A rule's bandwidth cap slows its fills (a lower bound on time only: the
// check cannot flake on a slow machine).
func TestBandwidthLimit(t *testing.T) {
	w := prefetchtest.New(t, prefetchtest.Options{LayerSize: 256 << 10, Rules: []prefetch.RuleSpec{{
		Name: "slow", Repositories: []string{ngctest.PytorchRepo}, Tags: config.TagSelect{Exact: []string{ngctest.PytorchTag}},
		Platforms: []string{"linux/arm64"}, Bandwidth: 256 << 10}}})
	w.Start(t)
	var size int64
	for _, b := range w.Fx.Pytorch.Child("linux/arm64").Blobs() {
		size += int64(len(b.Body))
	}
	start := time.Now()
	jobs, err := w.Sched.RunRule(ctx, w.Sched.Rules()[0])
	if err != nil || len(jobs) != 1 {
		t.Fatal(jobs, err)
	}
	j := w.WaitJob(t, jobs[0].ID, 30*time.Second)
	took := time.Since(start)
	if j.State != state.JobDone {
		t.Fatalf("job = %+v", j)
	}
	// 256 KiB/s with a burst of 32 KiB.
	if floor := time.Duration(float64(size-(32<<10)) / float64(256<<10) * float64(time.Second)); took < floor*9/10 {
		t.Errorf("%d bytes at 256 KiB/s took %v, less than %v", size, took, floor)
	}
}

// Rules with pin: true name the images cache eviction keeps.
func TestPinnedTargets(t *testing.T) {
	forEachVia(t, testPinnedTargets)
}

func testPinnedTargets(t *testing.T, via string) {
	w := prefetchtest.New(t, prefetchtest.Options{Via: via, Rules: []prefetch.RuleSpec{
		{Name: "pinned", Repositories: []string{qual(via, ngctest.PytorchRepo)}, Tags: config.TagSelect{Exact: []string{"17.12"}}, Pin: true},
		{Name: "loose", Repositories: []string{qual(via, ngctest.CUDARepo)}, Tags: config.TagSelect{Regex: ".*"}},
	}})
	for _, repo := range []string{w.Q(ngctest.PytorchRepo), w.Q(ngctest.CUDARepo)} {
		if _, err := w.Tracker.Poll(ctx, repo); err != nil {
			t.Fatal(err)
		}
	}
	got, err := w.Sched.PinnedTargets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Repository != w.Q(ngctest.PytorchRepo) || got[0].Reference != "17.12" {
		t.Errorf("pinned = %+v, want only nvidia/pytorch:17.12", got)
	}
}

// With every fill slot taken by a client's download, a job waits for a
// slot instead of failing.
func TestJobWaitsForAFillSlot(t *testing.T) {
	w := prefetchtest.New(t, prefetchtest.Options{MaxFills: 1})
	w.Start(t)
	cuda := w.Fx.CUDA.Layers[len(w.Fx.CUDA.Layers)-1].Digest // not shared with pytorch
	release := make(chan struct{})
	var started atomic.Int32
	stall(w.Up, cuda, release, &started)
	go func() { // a client's download holds the only slot
		resp, err := http.Get(w.Server.URL + "/v2/" + ngctest.CUDARepo + "/blobs/" + cuda.String())
		if err == nil {
			resp.Body.Close()
		}
	}()
	testsupport.Eventually(t, 10*time.Second, "the client's fill", func() bool { return started.Load() > 0 })
	j, _, err := w.Sched.Enqueue(ctx, prefetch.Target{Repository: ngctest.PytorchRepo, Reference: ngctest.PytorchTag, Platforms: []string{"linux/arm64"}})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	if got, _ := w.State.Job(ctx, j.ID); got.Ended() || got.BlobsDone != 0 {
		t.Fatalf("job while no slot is free: %+v", got)
	}
	close(release)
	if got := w.WaitJob(t, j.ID, 30*time.Second); got.State != state.JobDone || len(got.Errors) != 0 {
		t.Fatalf("job = %+v", got)
	}
}

// A task (scheduled gc) runs on its schedule on the leader only.
func TestScheduledTask(t *testing.T) {
	var runs atomic.Int32
	w := prefetchtest.New(t, prefetchtest.Options{Prefetch: prefetch.Options{PollSchedule: "@yearly",
		Tasks: []prefetch.Task{{Name: "gc", Schedule: "@every 1s", Run: func(context.Context) { runs.Add(1) }}}}})
	w.Start(t)
	testsupport.Eventually(t, 10*time.Second, "two task runs", func() bool { return runs.Load() >= 2 })
	if got := testutil.ToFloat64(w.Metrics.Ticks.WithLabelValues("task")); got < 2 {
		t.Errorf("task ticks = %v", got)
	}
	if _, err := prefetch.New(w.State, w.Tracker, w.Pull, prefetch.Options{Tasks: []prefetch.Task{{Name: "x", Schedule: "nope"}}}); err == nil {
		t.Error("a task with a bad schedule was accepted")
	}
}

// cancelWhileStalled starts a job for amd64 whose last blob stalls at the
// upstream, waits until every other blob is cached and the stalled one is
// being fetched, and cancels it with cancel. The job ends cancelled, the
// stalled download stops once the upstream answers (nothing cached, no
// second fetch), and no later save undoes the cancel.
func cancelWhileStalled(t *testing.T, cancel func(w *prefetchtest.World, id string)) {
	w := prefetchtest.New(t, prefetchtest.Options{})
	blobs := w.Fx.Pytorch.Child("linux/amd64").Blobs()
	last := blobs[len(blobs)-1].Digest
	release := make(chan struct{})
	var started atomic.Int32
	stall(w.Up, last, release, &started)
	w.Start(t)
	j, _, err := w.Sched.Enqueue(ctx, prefetch.Target{Repository: ngctest.PytorchRepo, Reference: ngctest.PytorchTag, Platforms: []string{"linux/amd64"}})
	if err != nil {
		t.Fatal(err)
	}
	testsupport.Eventually(t, 15*time.Second, "all but the stalled blob cached", func() bool {
		got, _ := w.State.Job(ctx, j.ID)
		return got.BlobsDone == len(blobs)-1 && started.Load() > 0
	})
	cancel(w, j.ID)
	got := w.WaitJob(t, j.ID, 10*time.Second)
	if got.State != state.JobCancelled || got.BlobsDone != len(blobs)-1 || got.Finished.IsZero() {
		t.Fatalf("cancelled job = %+v", got)
	}
	// The runner has stopped (on another replica, at its next progress
	// save): only then does the upstream answer.
	testsupport.Eventually(t, 10*time.Second, "the runner to end the job", func() bool {
		return testutil.ToFloat64(w.Metrics.Jobs.WithLabelValues(state.JobCancelled)) == 1
	})
	close(release)
	testsupport.Eventually(t, 10*time.Second, "the stalled fill to stop", func() bool { return w.Fills.InFlight() == 0 })
	if cached(w, last) {
		t.Error("the cancelled job's download went on and cached the blob")
	}
	if n := w.Up.BlobFetches(last); n != 1 {
		t.Errorf("stalled blob fetched %d times after the cancel", n)
	}
	time.Sleep(200 * time.Millisecond) // several save intervals: a late save must not revive it
	if again, _ := w.State.Job(ctx, j.ID); again.State != state.JobCancelled {
		t.Errorf("after the cancel: %+v", again)
	}
}

// Cancelled on the leader itself: its context stops at once.
func TestCancelRunningJob(t *testing.T) {
	cancelWhileStalled(t, func(w *prefetchtest.World, id string) {
		if j, err := w.Sched.Cancel(ctx, id); err != nil || j.State != state.JobCancelled {
			t.Fatalf("Cancel: %+v, %v", j, err)
		}
	})
}

// Cancelled through the state store (another replica's admin API): the
// leader notices when the store refuses its next progress save.
func TestCancelRunningJobFromAnotherReplica(t *testing.T) {
	cancelWhileStalled(t, func(w *prefetchtest.World, id string) {
		if j, err := w.State.CancelJob(ctx, id); err != nil || j.State != state.JobCancelled {
			t.Fatalf("CancelJob: %+v, %v", j, err)
		}
	})
}

// A queued job cancelled before a leader picks it up never runs; an
// unknown one is ErrNotFound; a cancelled job is queued again on request.
func TestCancelQueuedJob(t *testing.T) {
	w := prefetchtest.New(t, prefetchtest.Options{})
	target := prefetch.Target{Repository: ngctest.PytorchRepo, Reference: ngctest.PytorchTag, Platforms: []string{"linux/arm64"}}
	j, _, err := w.Sched.Enqueue(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := w.Sched.Cancel(ctx, j.ID); err != nil || got.State != state.JobCancelled {
		t.Fatalf("Cancel: %+v, %v", got, err)
	}
	if _, err := w.Sched.Cancel(ctx, "nope"); !errors.Is(err, state.ErrNotFound) {
		t.Errorf("Cancel of an unknown job: %v", err)
	}
	w.Start(t)
	time.Sleep(300 * time.Millisecond) // the leader is elected and looks for jobs
	if n := len(w.Up.CDNRequests()); n != 0 || w.Fills.InFlight() != 0 {
		t.Errorf("a cancelled queued job ran: %d blob requests", n)
	}
	j2, created, err := w.Sched.Enqueue(ctx, target)
	if err != nil || !created || j2.State != state.JobQueued {
		t.Fatalf("enqueue after the cancel: %+v %v %v", j2, created, err)
	}
	if done := w.WaitJob(t, j2.ID, 20*time.Second); done.State != state.JobDone {
		t.Errorf("re-enqueued job = %+v", done)
	}
}

// With NoPrefetch (prefetch.enabled: false) tag polls and tasks still run
// on their schedules; rule ticks, the automatic rule and jobs do not. Such
// a replica leads under a lock of its own: a replica sharing Redis with
// prefetch enabled leads at the same time and runs the jobs.
func TestNoPrefetchRunsPollsAndTasks(t *testing.T) {
	srv := redistest.Start(t)
	var runs atomic.Int32
	rule := []prefetch.RuleSpec{{Name: "every-second", Repositories: []string{ngctest.PytorchRepo},
		Tags: config.TagSelect{Exact: []string{ngctest.PytorchTag}}, Platforms: []string{"linux/arm64"}, Schedule: "@every 1s"}}
	dir := t.TempDir()
	w := prefetchtest.New(t, prefetchtest.Options{Redis: srv, CacheDir: dir, Rules: rule,
		Tracking: tracking.Options{Repositories: []string{ngctest.PytorchRepo}},
		Prefetch: prefetch.Options{Owner: "tasks-only", NoPrefetch: true, Auto: true, PollSchedule: "@every 1s",
			Tasks: []prefetch.Task{{Name: "gc", Schedule: "@every 1s", Run: func(context.Context) { runs.Add(1) }}}}})
	w.Start(t)
	polls := func() float64 { return testutil.ToFloat64(w.Metrics.TagPolls.WithLabelValues("success")) }
	testsupport.Eventually(t, 15*time.Second, "two task runs and a tag poll", func() bool { return runs.Load() >= 2 && polls() >= 1 })
	j, _, err := w.Sched.Enqueue(t.Context(), prefetch.Target{Repository: ngctest.PytorchRepo, Reference: ngctest.PytorchTag, Platforms: []string{"linux/arm64"}})
	if err != nil {
		t.Fatal(err)
	}
	// A replica with prefetch enabled leads too, and runs the job.
	p := prefetchtest.New(t, prefetchtest.Options{Redis: srv, CacheDir: dir, Upstream: w.Up, Fixture: w.Fx,
		Prefetch: prefetch.Options{Owner: "prefetch", PollSchedule: "@yearly"}})
	p.Start(t)
	if got := p.WaitJob(t, j.ID, 20*time.Second); got.State != state.JobDone || got.Owner != "prefetch" {
		t.Errorf("job = %+v, want done by the replica with prefetch enabled", got)
	}
	if !w.Sched.Leader() || !p.Sched.Leader() {
		t.Errorf("leaders: tasks-only %v, prefetch %v; want both", w.Sched.Leader(), p.Sched.Leader())
	}
	for _, kind := range []string{"rule", "auto"} {
		if n := testutil.ToFloat64(w.Metrics.Ticks.WithLabelValues(kind)); n != 0 {
			t.Errorf("%s ticks with prefetch disabled: %v", kind, n)
		}
	}
}

// forEachVia runs a suite written for the default upstream once as it is
// and once with the fake as a further upstream (prefetchtest.Options.Via),
// whose repositories are named with its registry in front.
func forEachVia(t *testing.T, suite func(t *testing.T, via string)) {
	for _, via := range []string{"", "ghcr.example"} {
		name := "default"
		if via != "" {
			name = via
		}
		t.Run(name, func(t *testing.T) { suite(t, via) })
	}
}

// qual is the qualified name of repository pattern p of the further
// upstream via ("": p).
func qual(via, p string) string {
	if via == "" {
		return p
	}
	return via + "/" + p
}

// TestRerunKeepsHistoryAndCountsTheCache (U1 F7): a second run of the same
// image keeps the first run's record and figures (as job <id>.1), and a
// run's record counts what the cache holds at once, not as far as its
// workers got: with one blob at a time stuck on a missing layer, the
// layers after it that are cached already count as cached.
func TestRerunKeepsHistoryAndCountsTheCache(t *testing.T) {
	w := prefetchtest.New(t, prefetchtest.Options{})
	blobs := w.Fx.Pytorch.Child("linux/amd64").Blobs()
	if len(blobs) < 3 {
		t.Fatalf("fixture has %d blobs", len(blobs))
	}
	w.Start(t)
	target := prefetch.Target{Repository: ngctest.PytorchRepo, Reference: ngctest.PytorchTag, Platforms: []string{"linux/amd64"}}
	j1, _, err := w.Sched.Enqueue(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	first := w.WaitJob(t, j1.ID, 20*time.Second)
	if first.State != state.JobDone || first.BlobsFetched != len(blobs) {
		t.Fatalf("first run = %+v", first)
	}
	// One layer leaves the cache and stalls upstream; the second run
	// fetches one blob at a time.
	stuck := blobs[1].Digest
	if _, err := w.Cache.RemoveBlob(ctx, stuck); err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	var started atomic.Int32
	stall(w.Up, stuck, release, &started)
	t.Cleanup(func() { close(release) })
	target.Concurrency = 1
	j2, created, err := w.Sched.Enqueue(ctx, target)
	if err != nil || !created || j2.ID != j1.ID || j2.Run != 2 {
		t.Fatalf("second run: %+v created=%v err=%v", j2, created, err)
	}
	testsupport.Eventually(t, 15*time.Second, "the second run on the stalled layer", func() bool {
		got, _ := w.State.Job(ctx, j2.ID)
		return started.Load() > 0 && got.Current == stuck.String()
	})
	if got, _ := w.State.Job(ctx, j2.ID); got.BlobsDone != len(blobs)-1 || got.BlobsTotal != len(blobs) {
		t.Errorf("second run stuck on one missing blob: %d/%d blobs cached, want %d/%d", got.BlobsDone, got.BlobsTotal, len(blobs)-1, len(blobs))
	}
	if _, err := w.Sched.Cancel(ctx, j2.ID); err != nil {
		t.Fatal(err)
	}
	w.WaitJob(t, j2.ID, 10*time.Second)
	old, err := w.State.Job(ctx, prefetch.ArchivedJobID(j1.ID, 1))
	if err != nil || old.State != state.JobDone || old.Run != 1 || old.BlobsFetched != first.BlobsFetched || old.BytesFetched != first.BytesFetched {
		t.Fatalf("the first run's record: %+v (%v), want its figures %+v", old, err, first)
	}
	all, err := w.State.Jobs(ctx)
	if err != nil || len(all) != 2 {
		t.Errorf("jobs after two runs: %d (%v), want 2", len(all), err)
	}
}

// TestClientLiftsATinyCapAtOnce (U1 F1): a job capped at 1 KiB/s is
// fetching a layer when a client asks for it: the client joins that fill
// (one upstream fetch) and gets the layer whole, at the upstream's speed,
// instead of waiting out the limiter (a 32 KiB burst at 1 KiB/s is half a
// minute) or losing the fill to the idle timeout (5 s here), which the
// mirror's own throttling must not trip.
func TestClientLiftsATinyCapAtOnce(t *testing.T) {
	w := prefetchtest.New(t, prefetchtest.Options{LayerSize: 256 << 10})
	w.Start(t)
	child := w.Fx.Pytorch.Child("linux/arm64")
	j, _, err := w.Sched.Enqueue(ctx, prefetch.Target{Repository: ngctest.PytorchRepo, Reference: ngctest.PytorchTag,
		Platforms: []string{"linux/arm64"}, Concurrency: 1, Bandwidth: 1 << 10})
	if err != nil {
		t.Fatal(err)
	}
	// Past the limiter's 32 KiB burst on a layer: throttled.
	var layer ngctest.Content
	testsupport.Eventually(t, 20*time.Second, "the job throttled on a layer", func() bool {
		got, _ := w.State.Job(ctx, j.ID)
		for _, b := range child.Blobs() {
			if b.Digest.String() == got.Current && len(b.Body) > 128<<10 && got.BytesFetched > 34<<10 {
				layer = b
			}
		}
		return layer.Digest != ""
	})
	cctx, cancel := context.WithTimeout(ctx, 25*time.Second) // the cap alone: over 3 minutes
	defer cancel()
	req, _ := http.NewRequestWithContext(cctx, http.MethodGet, w.Server.URL+"/v2/"+ngctest.PytorchRepo+"/blobs/"+layer.Digest.String(), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || digest.FromBytes(body) != layer.Digest {
		t.Fatalf("client GET of the layer: %d, %d bytes, %v", resp.StatusCode, len(body), err)
	}
	if n := w.Up.BlobFetches(layer.Digest); n != 1 {
		t.Errorf("layer fetched %d times upstream: the client did not join the job's fill (it died?)", n)
	}
	testsupport.Eventually(t, 10*time.Second, "the layer committed", func() bool { return cached(w, layer.Digest) })
	if _, err := w.Sched.Cancel(ctx, j.ID); err != nil { // the rest at 1 KiB/s
		t.Fatal(err)
	}
	w.WaitJob(t, j.ID, 10*time.Second)
}
