package prefetch

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/robfig/cron/v3"
	"golang.org/x/time/rate"

	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctag"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
	"github.com/ngc-mirror/ngc-mirror/internal/tracking"
)

// Options configure a Scheduler. Zero values take the defaults noted.
type Options struct {
	Rules []*Rule
	// PollSchedule is the cron expression of tag polling (default
	// "@every 1h"). Each poll is followed by the automatic rule.
	PollSchedule string
	// Auto enables the automatic rule: a new monthly release of a variant
	// that nodes pulled within AutoWindow is prefetched for the platforms
	// they pulled.
	Auto       bool
	AutoWindow time.Duration // default 14 days
	// MaxJobs bounds jobs running at once on the leader (default 2).
	MaxJobs int
	// Owner names this replica in the lock and in jobs (default
	// host-pid-random).
	Owner string
	// LockTTL is the scheduler lock's expiry (default 15 s); it is renewed
	// every third of it. A replica that dies holding it is replaced within
	// LockTTL.
	LockTTL time.Duration
	// Tasks are other scheduled work run by the leader, once per tick
	// across replicas (the cache's garbage collection).
	Tasks []Task
	// NoPrefetch runs only tag polls and Tasks (prefetch.enabled: false):
	// no rule ticks, no automatic rule, no jobs. Such a scheduler elects
	// its leader with a lock of its own ("scheduler-tasks"), so that it
	// never keeps a replica with prefetch enabled from leading and running
	// jobs; each tick still runs once across replicas (its claim).
	NoPrefetch bool
	// SaveInterval is how often a running job's progress is saved (default 1 s).
	SaveInterval time.Duration
	Log          *slog.Logger
	Metrics      *metrics.Tracking
}

// Task is scheduled work other than prefetch.
type Task struct {
	Name     string // unique among tasks and rules
	Schedule string // cron expression (see ParseSchedule)
	Run      func(ctx context.Context)
}

// Scheduler elects one leader among replicas through the store's lock;
// the leader runs scheduled ticks (rules, tag polls and the automatic rule)
// and executes queued jobs. Every replica may enqueue jobs.
type Scheduler struct {
	store   state.Store
	tracker *tracking.Tracker
	opts    Options
	log     *slog.Logger
	m       *metrics.Tracking
	runner  *runner
	poll    cron.Schedule
	tasks   []cron.Schedule // of opts.Tasks

	mu     sync.Mutex
	leader bool
	active map[string]context.CancelCauseFunc // jobs running here
	wake   chan struct{}
}

// New returns a Scheduler. It fails on an invalid PollSchedule.
func New(store state.Store, tracker *tracking.Tracker, warm Warmer, opts Options) (*Scheduler, error) {
	if opts.PollSchedule == "" {
		opts.PollSchedule = "@every 1h"
	}
	poll, err := ParseSchedule(opts.PollSchedule)
	if err != nil {
		return nil, fmt.Errorf("prefetch: poll schedule %q: %w", opts.PollSchedule, err)
	}
	taskSchedules := make([]cron.Schedule, len(opts.Tasks))
	for i, task := range opts.Tasks {
		sc, err := ParseSchedule(task.Schedule)
		if err != nil {
			return nil, fmt.Errorf("prefetch: task %s: schedule %q: %w", task.Name, task.Schedule, err)
		}
		taskSchedules[i] = sc
	}
	if opts.AutoWindow <= 0 {
		opts.AutoWindow = 14 * 24 * time.Hour
	}
	if opts.MaxJobs <= 0 {
		opts.MaxJobs = 2
	}
	if opts.Owner == "" {
		host, _ := os.Hostname()
		var b [4]byte
		_, _ = rand.Read(b[:])
		opts.Owner = fmt.Sprintf("%s-%d-%x", host, os.Getpid(), b)
	}
	if opts.LockTTL <= 0 {
		opts.LockTTL = 15 * time.Second
	}
	if opts.SaveInterval <= 0 {
		opts.SaveInterval = time.Second
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	s := &Scheduler{store: store, tracker: tracker, opts: opts, log: opts.Log, m: opts.Metrics, poll: poll, tasks: taskSchedules,
		active: map[string]context.CancelCauseFunc{}, wake: make(chan struct{}, 1)}
	rules := map[string]*Rule{}
	limits := map[string]*rate.Limiter{}
	for _, r := range opts.Rules {
		rules[r.Name] = r
		limits[r.Name] = newLimiter(int64(r.Bandwidth))
	}
	s.runner = &runner{warm: warm, store: store, owner: opts.Owner, log: opts.Log, m: opts.Metrics,
		rules: rules, limits: limits, saveGap: opts.SaveInterval}
	return s, nil
}

// Rules returns the configured rules.
func (s *Scheduler) Rules() []*Rule { return s.opts.Rules }

// Leader reports whether this replica holds the scheduler lock.
func (s *Scheduler) Leader() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.leader
}

// lockName is the scheduler lock's name in the state store.
func (s *Scheduler) lockName() string {
	if s.opts.NoPrefetch {
		return "scheduler-tasks"
	}
	return "scheduler"
}

// Run elects, ticks and executes jobs until ctx ends, then releases the
// lock (with Options.NoPrefetch: tag polls and tasks only). Store outages
// pause it (not leader while the lock cannot be renewed); it resumes when
// the store answers.
func (s *Scheduler) Run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(1)
	go func() { defer wg.Done(); s.elect(ctx) }()
	if !s.opts.NoPrefetch {
		wg.Add(1)
		go func() { defer wg.Done(); s.execute(ctx) }()
	}
	type sched struct {
		kind, name string
		s          cron.Schedule
		run        func(ctx context.Context, tick time.Time)
	}
	scheds := []sched{{"poll", "poll", s.poll, s.pollTick}}
	for _, r := range s.opts.Rules {
		if r.schedule != nil && !s.opts.NoPrefetch {
			scheds = append(scheds, sched{"rule", r.Name, r.schedule, func(ctx context.Context, _ time.Time) { s.ruleTick(ctx, r) }})
		}
	}
	for i, task := range s.opts.Tasks {
		scheds = append(scheds, sched{"task", "task:" + task.Name, s.tasks[i], func(ctx context.Context, _ time.Time) { task.Run(ctx) }})
	}
	for _, sc := range scheds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				at := next(sc.s, time.Now())
				select {
				case <-ctx.Done():
					return
				case <-time.After(time.Until(at)):
				}
				if !s.Leader() {
					continue
				}
				// The claim makes a tick run once even if two replicas
				// both believe they lead for a moment (lock handover).
				cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				ok, err := s.store.Claim(cctx, "tick:"+sc.name+":"+strconv.FormatInt(at.Unix(), 10), claimTTL)
				cancel()
				if err != nil {
					s.m.StateError(metrics.OpSchedule)
					s.log.Warn("scheduler: state store unreachable; tick skipped", "tick", sc.name, "err", err)
					continue
				}
				if !ok {
					continue
				}
				s.m.Tick(sc.kind)
				s.log.Debug("scheduled tick", "tick", sc.name, "at", at)
				sc.run(ctx, at)
			}
		}()
	}
	<-ctx.Done()
}

// claimTTL is how long a tick's claim is kept: far longer than any clock
// difference between replicas, short enough that frequent schedules leave
// few keys behind.
const claimTTL = time.Hour

// elect takes and renews the scheduler lock every third of its TTL.
func (s *Scheduler) elect(ctx context.Context) {
	t := time.NewTicker(s.opts.LockTTL / 3)
	defer t.Stop()
	failing := false
	for {
		lctx, cancel := context.WithTimeout(ctx, s.opts.LockTTL/3)
		ok, err := s.store.Lock(lctx, s.lockName(), s.opts.Owner, s.opts.LockTTL)
		cancel()
		switch {
		case err != nil && ctx.Err() == nil:
			s.m.StateError(metrics.OpSchedule)
			if !failing {
				s.log.Warn("scheduler: state store unreachable; ticks and jobs pause", "err", err)
				failing = true
			}
		case err == nil && failing:
			s.log.Info("scheduler: state store reachable again")
			failing = false
		}
		s.setLeader(ctx, ok && err == nil, err)
		select {
		case <-ctx.Done():
			uctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_ = s.store.Unlock(uctx, s.lockName(), s.opts.Owner)
			cancel()
			s.setLeader(ctx, false, nil)
			return
		case <-t.C:
		}
	}
}

func (s *Scheduler) setLeader(ctx context.Context, on bool, err error) {
	s.mu.Lock()
	was := s.leader
	s.leader = on
	var stop []context.CancelCauseFunc
	if was && !on {
		for _, c := range s.active {
			stop = append(stop, c) // another replica takes over (and resumes them)
		}
	}
	s.mu.Unlock()
	for _, c := range stop {
		c(nil)
	}
	s.m.SetLeader(on)
	switch {
	case on && !was:
		if s.opts.NoPrefetch {
			s.log.Info("scheduler: this replica leads (runs tag polls and scheduled tasks; prefetch is disabled)", "owner", s.opts.Owner)
		} else {
			s.log.Info("scheduler: this replica leads (runs ticks and prefetch jobs)", "owner", s.opts.Owner)
		}
		s.Wake()
	case was && !on && ctx.Err() == nil:
		s.log.Warn("scheduler: lost the lock; pausing", "owner", s.opts.Owner, "err", err)
	}
}

// Wake makes the leader look for queued jobs now.
func (s *Scheduler) Wake() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// execute runs queued jobs, and jobs left running by a replica that
// stopped, while this replica leads.
func (s *Scheduler) execute(ctx context.Context) {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.wake:
		}
		if !s.Leader() {
			continue
		}
		jctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		jobs, err := s.store.Jobs(jctx)
		cancel()
		if err != nil {
			s.m.StateError(metrics.OpJob)
			continue
		}
		slices.Reverse(jobs) // oldest first
		for _, j := range jobs {
			if j.Ended() {
				continue
			}
			s.mu.Lock()
			if _, running := s.active[j.ID]; running || len(s.active) >= s.opts.MaxJobs || !s.leader {
				s.mu.Unlock()
				continue
			}
			rctx, cancel := context.WithCancelCause(ctx)
			s.active[j.ID] = cancel
			s.mu.Unlock()
			if j.State == state.JobRunning {
				s.log.Info("resuming prefetch job", "job", j.ID, "repository", j.Repository, "reference", j.Reference, "was_owner", j.Owner)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.runner.run(rctx, j)
				cancel(nil)
				s.mu.Lock()
				delete(s.active, j.ID)
				s.mu.Unlock()
				s.Wake()
			}()
		}
	}
}

// Cancel cancels job id in the state store (state.Store.CancelJob) and
// returns it; a job that has ended is returned as it is. Whichever replica
// runs it stops it: this one at once, another at its next progress save
// (Options.SaveInterval). Errors: state.ErrNotFound, or the store's.
func (s *Scheduler) Cancel(ctx context.Context, id string) (state.Job, error) {
	j, err := s.store.CancelJob(ctx, id)
	if err != nil || j.State != state.JobCancelled {
		return j, err
	}
	s.mu.Lock()
	stop := s.active[id]
	s.mu.Unlock()
	if stop != nil {
		stop(errJobCancelled)
	}
	s.log.Info("prefetch job cancelled on request", "job", id, "repository", j.Repository, "reference", j.Reference, "was_running_here", stop != nil)
	return j, nil
}

// Enqueue adds a job for t, or returns the queued or running job of the
// same image and platforms (created false). An ended job of the same
// target (done, failed or cancelled) is queued again as its next run (a
// re-run skips what is cached) under the same ID; the ended run's record
// is kept as job ArchivedJobID(id, run), unless it was done and fetched
// nothing.
func (s *Scheduler) Enqueue(ctx context.Context, t Target) (j state.Job, created bool, err error) {
	return s.enqueue(ctx, t, false)
}

// enqueue is Enqueue; with keepDone, a job of t that is done or was
// cancelled is returned as it is instead of queued again (the automatic
// rule fetches a release once, and does not undo an operator's cancel).
func (s *Scheduler) enqueue(ctx context.Context, t Target, keepDone bool) (j state.Job, created bool, err error) {
	id := JobID(t)
	old, err := s.store.Job(ctx, id)
	switch {
	case err == nil && (!old.Ended() || (keepDone && (old.State == state.JobDone || old.State == state.JobCancelled))):
		return old, false, nil
	case err != nil && !errors.Is(err, state.ErrNotFound):
		return state.Job{}, false, err
	}
	run := 1
	if err == nil {
		// The ended run stays in the history under its own ID, with its
		// figures, and the target's ID goes to the new run; a run that
		// found everything cached is not kept (a rule's schedule re-runs
		// it often, and the next run says the same).
		prev := max(old.Run, 1)
		run = prev + 1
		if old.State != state.JobDone || old.BlobsFetched > 0 {
			old.ID, old.Run = ArchivedJobID(id, prev), prev
			if err := s.store.PutJob(ctx, old); err != nil {
				return state.Job{}, false, err
			}
		}
	}
	now := time.Now().UTC()
	j = state.Job{ID: id, Repository: t.Repository, Reference: t.Reference, Platforms: t.Platforms,
		Rule: t.Rule, Concurrency: t.Concurrency, Bandwidth: t.Bandwidth, State: state.JobQueued, Created: now, Updated: now, Run: run}
	if err := s.store.PutJob(ctx, j); err != nil {
		return state.Job{}, false, err
	}
	s.Wake()
	return j, true, nil
}

// Expand returns the targets a rule selects now: for each repository it
// covers (its plain names, and tracked repositories matching its globs),
// the selected tags known from polling.
func (s *Scheduler) Expand(ctx context.Context, r *Rule) ([]Target, error) {
	tracked, err := s.tracker.Tracked(ctx)
	if err != nil {
		return nil, err
	}
	return s.expand(ctx, r, tracked, s.store.Tags)
}

// expand is Expand over the tracked repositories already known, reading
// tags through tagsOf.
func (s *Scheduler) expand(ctx context.Context, r *Rule, tracked []string, tagsOf func(context.Context, string) ([]state.Tag, error)) ([]Target, error) {
	repos := map[string]bool{}
	for _, n := range r.Literal() {
		repos[n] = true
	}
	for _, n := range tracked {
		if r.Matches(n) {
			repos[n] = true
		}
	}
	names := make([]string, 0, len(repos))
	for n := range repos {
		names = append(names, n)
	}
	sort.Strings(names)
	var out []Target
	for _, repo := range names {
		tags, err := tagsOf(ctx, repo)
		if err != nil {
			return nil, err
		}
		for _, tag := range r.SelectTags(tags) {
			out = append(out, Target{Repository: repo, Reference: tag, Platforms: r.Platforms, Rule: r.Name,
				Concurrency: r.Concurrency, Bandwidth: int64(r.Bandwidth)})
		}
	}
	return out, nil
}

// RunRule polls the rule's plain repositories (unless polled within a
// minute), expands it and enqueues its targets. It returns the jobs (new or
// already queued).
func (s *Scheduler) RunRule(ctx context.Context, r *Rule) ([]state.Job, error) {
	repos, err := s.store.Repositories(ctx)
	if err != nil {
		return nil, err
	}
	recent := map[string]bool{}
	for _, rp := range repos {
		recent[rp.Name] = time.Since(rp.LastPolled) < time.Minute
	}
	for _, repo := range r.Literal() {
		if recent[repo] {
			continue
		}
		if _, err := s.tracker.Poll(ctx, repo); err != nil {
			s.log.Warn("prefetch rule: polling tags failed", "rule", r.Name, "repository", repo, "err", err)
		}
	}
	targets, err := s.expand(ctx, r, s.tracker.TrackedOf(repos), s.store.Tags)
	if err != nil {
		return nil, err
	}
	var jobs []state.Job
	for _, t := range targets {
		j, _, err := s.Enqueue(ctx, t)
		if err != nil {
			return jobs, err
		}
		jobs = append(jobs, j)
	}
	return jobs, nil
}

func (s *Scheduler) ruleTick(ctx context.Context, r *Rule) {
	jobs, err := s.RunRule(ctx, r)
	if err != nil {
		s.m.StateError(metrics.OpSchedule)
		s.log.Warn("prefetch rule failed", "rule", r.Name, "err", err)
		return
	}
	s.log.Info("prefetch rule ran", "rule", r.Name, "jobs", len(jobs))
}

func (s *Scheduler) pollTick(ctx context.Context, _ time.Time) {
	if _, err := s.tracker.PollAll(ctx); err != nil {
		if ctx.Err() == nil {
			s.log.Warn("tag polling paused: state store unreachable", "err", err)
		}
		return
	}
	if s.opts.Auto && !s.opts.NoPrefetch {
		s.m.Tick("auto")
		if _, err := s.RunAuto(ctx); err != nil {
			s.m.StateError(metrics.OpSchedule)
			s.log.Warn("automatic prefetch rule failed", "err", err)
		}
	}
}

// autoTargets returns what the automatic rule would prefetch now: for each
// repository and variant that nodes pulled within the window, the newest
// known release of that variant when it is newer than every release they
// pulled, for the platforms they pulled (all when none was recorded).
func (s *Scheduler) autoTargets(ctx context.Context) ([]Target, error) {
	usage, err := s.store.Usage(ctx, time.Now().Add(-s.opts.AutoWindow))
	if err != nil {
		return nil, err
	}
	type key struct{ repo, variant string }
	pulled := map[key]string{}             // newest release pulled
	platforms := map[key]map[string]bool{} // platforms pulled
	for _, u := range usage {
		p := ngctag.Parse(u.Tag)
		if !p.Monthly {
			continue
		}
		k := key{u.Repository, p.Variant}
		if ngctag.Newer(p.Release, pulled[k]) {
			pulled[k] = p.Release
		}
		if platforms[k] == nil {
			platforms[k] = map[string]bool{}
		}
		if u.Platform != "" {
			platforms[k][u.Platform] = true
		}
	}
	var out []Target
	byRepo := map[string][]state.Tag{}
	for k, rel := range pulled {
		tags, ok := byRepo[k.repo]
		if !ok {
			if tags, err = s.store.Tags(ctx, k.repo); err != nil {
				return nil, err
			}
			byRepo[k.repo] = tags
		}
		best := ""
		for _, t := range tags {
			if p := ngctag.Parse(t.Name); p.Monthly && p.Variant == k.variant && ngctag.Newer(p.Release, rel) &&
				(best == "" || ngctag.Newer(p.Release, ngctag.Parse(best).Release)) {
				best = t.Name
			}
		}
		if best == "" {
			continue
		}
		var ps []string
		for p := range platforms[k] {
			ps = append(ps, p)
		}
		sort.Strings(ps)
		out = append(out, Target{Repository: k.repo, Reference: best, Platforms: ps, Rule: AutoRule})
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].Repository+":"+out[i].Reference < out[j].Repository+":"+out[j].Reference
	})
	return out, nil
}

// RunAuto enqueues the automatic rule's targets that have no job yet (a
// done or cancelled job is not redone: the automatic rule fetches each
// release once).
func (s *Scheduler) RunAuto(ctx context.Context) ([]state.Job, error) {
	targets, err := s.autoTargets(ctx)
	if err != nil {
		return nil, err
	}
	var jobs []state.Job
	for _, t := range targets {
		j, created, err := s.enqueue(ctx, t, true)
		if err != nil {
			return jobs, err
		}
		if !created && (j.State == state.JobDone || j.State == state.JobCancelled) {
			continue
		}
		if created {
			s.log.Info("automatic prefetch of a new release", "repository", t.Repository, "tag", t.Reference, "platforms", t.Platforms)
		}
		jobs = append(jobs, j)
	}
	return jobs, nil
}

// PinnedTargets returns the images selected now by the rules with Pin set
// (for cache eviction, which keeps them).
func (s *Scheduler) PinnedTargets(ctx context.Context) ([]Target, error) {
	tracked, err := s.tracker.Tracked(ctx)
	if err != nil {
		return nil, err
	}
	// Rules may cover the same repositories: read each one's tags once.
	tags := map[string][]state.Tag{}
	tagsOf := func(ctx context.Context, repo string) ([]state.Tag, error) {
		if t, ok := tags[repo]; ok {
			return t, nil
		}
		t, err := s.store.Tags(ctx, repo)
		tags[repo] = t
		return t, err
	}
	var out []Target
	for _, r := range s.opts.Rules {
		if !r.Pin {
			continue
		}
		ts, err := s.expand(ctx, r, tracked, tagsOf)
		if err != nil {
			return nil, err
		}
		out = append(out, ts...)
	}
	return out, nil
}
