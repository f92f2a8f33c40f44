package prefetch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/time/rate"

	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/manifest"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
)

// Warmer is the cache's pull-through path (*pull.Service): what a job
// fetches goes exactly where a client's pull would, and coalesces with it.
type Warmer interface {
	// Manifest returns repo's manifest for ref (tag or digest), from the
	// cache or fetched and cached.
	Manifest(ctx context.Context, repo, ref string) (pull.Manifest, error)
	// CacheBlob caches blob dgst of repo through the fill group (joining a
	// fill that runs). wrap, when not nil, wraps the upstream source of a
	// fill this call starts. fetched reports whether this call caused an
	// upstream fetch; an already cached blob returns (false, nil).
	CacheBlob(ctx context.Context, repo string, dgst digest.Digest, wrap func(fill.Source) fill.Source) (fetched bool, err error)
	// FillClients reports how many callers wait on a running fill of dgst.
	FillClients(dgst digest.Digest) int
	// BlobCached reports whether blob dgst is in the cache.
	BlobCached(ctx context.Context, dgst digest.Digest) bool
}

// Target is one image to prefetch.
type Target struct {
	Repository string
	Reference  string   // tag or digest
	Platforms  []string // empty: every platform
	Rule       string   // "" manual, AutoRule, or a rule name
	// Concurrency and Bandwidth (bytes per second) of the rule; zero:
	// defaults (4 blobs at once, no cap).
	Concurrency int
	Bandwidth   int64
}

// JobID is the stable ID of a target: the same image and platforms give
// the same job, so enqueueing twice is idempotent.
func JobID(t Target) string {
	p := slices.Clone(t.Platforms)
	sort.Strings(p)
	sum := sha256.Sum256([]byte(t.Repository + "\x00" + t.Reference + "\x00" + strings.Join(p, ",")))
	return hex.EncodeToString(sum[:8])
}

// ArchivedJobID is the ID under which run number run of job id is kept
// once a later run of the same target is queued: "<id>.<run>".
func ArchivedJobID(id string, run int) string { return fmt.Sprintf("%s.%d", id, run) }

// runner executes jobs.
type runner struct {
	warm    Warmer
	store   state.Store
	owner   string
	log     *slog.Logger
	m       *metrics.Tracking
	rules   map[string]*Rule
	limits  map[string]*rate.Limiter // by rule name
	saveGap time.Duration
}

// settings returns a job's concurrency and limiter. A configured rule's
// jobs share the rule's limiter; any other job with a cap (an ad hoc rule)
// gets its own.
func (r *runner) settings(j state.Job) (concurrency int, lim *rate.Limiter) {
	concurrency = 4
	if j.Concurrency > 0 {
		concurrency = j.Concurrency
	}
	if ru := r.rules[j.Rule]; ru != nil && int64(ru.Bandwidth) == j.Bandwidth {
		return concurrency, r.limits[j.Rule]
	}
	return concurrency, newLimiter(j.Bandwidth)
}

// errJobCancelled is the cause of a running job's context when the job
// was cancelled (Scheduler.Cancel, or the state store refusing a progress
// save with state.ErrCancelled).
var errJobCancelled = errors.New("prefetch: job cancelled")

// errFillAbandoned ends a fill that only a cancelled job wanted: for the
// fill (and its failure metric) its last client left.
var errFillAbandoned = fmt.Errorf("%w (the prefetch job was cancelled)", fill.ErrNoClients)

// job is a running job: its record and live counters.
type job struct {
	mu        sync.Mutex
	rec       state.Job
	bytesLive atomic.Int64 // bytes of blobs in progress
	current   sync.Map     // digest → struct{}
}

func (j *job) snapshot() state.Job {
	j.mu.Lock()
	defer j.mu.Unlock()
	rec := j.rec
	live := j.bytesLive.Load()
	rec.BytesDone += live
	rec.BytesFetched += live
	rec.Current = ""
	j.current.Range(func(k, _ any) bool {
		if rec.Current == "" || k.(string) < rec.Current {
			rec.Current = k.(string)
		}
		return true
	})
	rec.Updated = time.Now().UTC()
	return rec
}

// run executes one job to its end, saving progress every saveGap. It
// fetches the manifest (by tag or digest); for an index, the children of
// the job's platforms (all but attestations when none is given); then
// every config and layer blob of those, Concurrency at a time. Blobs
// already cached count as done at once, so a re-run (resume after a
// restart) only fetches what is missing.
//
// A job cancelled in the state store (CancelJob, from any replica) is
// noticed at the next progress save, which the store refuses; a cancel on
// this replica cancels ctx with errJobCancelled at once. Either way no new
// blob is started; blobs being downloaded stop unless a client waits on
// them (see counted), and the job ends cancelled.
func (r *runner) run(ctx context.Context, rec state.Job) state.Job {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	j := &job{rec: rec}
	j.rec.State = state.JobRunning
	j.rec.Owner = r.owner
	j.rec.Errors = nil
	j.rec.BlobsDone, j.rec.BytesDone, j.rec.BlobsTotal, j.rec.BytesTotal = 0, 0, 0, 0
	j.rec.BlobsFetched, j.rec.BytesFetched = 0, 0
	j.rec.Started = time.Now().UTC()
	j.rec.Finished = time.Time{}
	save := func(rec state.Job) {
		if errors.Is(r.save(ctx, rec), state.ErrCancelled) {
			cancel(errJobCancelled)
		}
	}
	save(j.snapshot())
	r.m.JobStarted()

	stop := make(chan struct{})
	saved := make(chan struct{})
	go func() {
		defer close(saved)
		t := time.NewTicker(r.saveGap)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				save(j.snapshot())
			}
		}
	}()
	var err error
	if ctx.Err() == nil {
		err = r.execute(ctx, j, save)
	}
	close(stop)
	<-saved

	final := j.snapshot()
	final.Current = ""
	final.Finished = time.Now().UTC()
	switch {
	case errors.Is(context.Cause(ctx), errJobCancelled):
		final.State = state.JobCancelled
		r.save(ctx, final) // its progress when it stopped; the store has it cancelled already
		r.m.JobEnded(final.State)
		r.log.Info("prefetch job cancelled", "job", final.ID, "repository", final.Repository, "reference", final.Reference,
			"blobs", final.BlobsDone, "blobs_total", final.BlobsTotal, "fetched_blobs", final.BlobsFetched)
		return final
	case ctx.Err() != nil:
		// Shutdown or lost leadership: left running, resumed by the next
		// scheduler.
		final.Finished = time.Time{}
		r.save(context.WithoutCancel(ctx), final)
		r.m.JobStopped()
		return final
	case err != nil:
		final.State = state.JobFailed
		final.Errors = append(final.Errors, err.Error())
	case len(final.Errors) > 0:
		final.State = state.JobFailed
	default:
		final.State = state.JobDone
	}
	if errors.Is(r.save(ctx, final), state.ErrCancelled) {
		final.State = state.JobCancelled // cancelled as it ended: the store keeps that
	}
	r.m.JobEnded(final.State)
	level := slog.LevelInfo
	if final.BlobsFetched == 0 && final.State == state.JobDone {
		level = slog.LevelDebug // everything was cached already
	}
	r.log.Log(ctx, level, "prefetch job ended", "job", final.ID, "fetched_blobs", final.BlobsFetched, "repository", final.Repository, "reference", final.Reference,
		"state", final.State, "blobs", final.BlobsDone, "bytes", final.BytesDone, "errors", len(final.Errors))
	return final
}

// save writes a job record. It returns state.ErrCancelled when the job
// was cancelled in the store; other errors are counted and logged here.
func (r *runner) save(ctx context.Context, j state.Job) error {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	err := r.store.PutJob(sctx, j)
	if err != nil && !errors.Is(err, state.ErrCancelled) {
		r.m.StateError(metrics.OpJob)
		r.log.Debug("saving job progress failed", "job", j.ID, "err", err)
	}
	return err
}

// errNoPlatform is returned for an index that has none of the job's
// platforms.
var errNoPlatform = errors.New("no manifest for the requested platforms")

func (r *runner) execute(ctx context.Context, j *job, save func(state.Job)) error {
	repo, ref, platforms := j.rec.Repository, j.rec.Reference, j.rec.Platforms
	m, err := r.warm.Manifest(ctx, repo, ref)
	if err != nil {
		return fmt.Errorf("manifest %s:%s: %w", repo, ref, err)
	}
	mt, body := m.MediaType, m.Body
	var blobs []manifest.Descriptor
	seen := map[digest.Digest]bool{}
	addBlobs := func(body []byte) error {
		refs, err := manifest.References(body)
		if err != nil {
			return err
		}
		for _, d := range refs {
			if !seen[d.Digest] && !isManifest(d.MediaType) {
				seen[d.Digest] = true
				blobs = append(blobs, d)
			}
		}
		return nil
	}
	if manifest.IsIndex(mt) {
		children, err := manifest.Children(body)
		if err != nil {
			return err
		}
		var have []string
		picked := 0
		for _, c := range children {
			p := c.PlatformString()
			if p == "" { // attestations, not images
				continue
			}
			have = append(have, p)
			if len(platforms) > 0 && !slices.ContainsFunc(platforms, func(w string) bool { return manifest.MatchPlatform(p, w) }) {
				continue
			}
			cm, err := r.warm.Manifest(ctx, repo, c.Digest.String())
			if err != nil {
				return fmt.Errorf("manifest %s for %s: %w", c.Digest, p, err)
			}
			if err := addBlobs(cm.Body); err != nil {
				return err
			}
			picked++
		}
		if picked == 0 {
			return fmt.Errorf("%w %v in %s:%s (it has %v)", errNoPlatform, platforms, repo, ref, have)
		}
	} else if err := addBlobs(body); err != nil {
		return err
	}

	// What the cache holds counts as done at once, before any fetch, so
	// that the record (and a cancel's "N/M blobs cached") says what is
	// in the cache, not how far the workers got.
	var missing []manifest.Descriptor
	var cachedBlobs int
	var cachedBytes int64
	for _, b := range blobs {
		if ctx.Err() == nil && r.warm.BlobCached(ctx, b.Digest) {
			cachedBlobs++
			cachedBytes += b.Size
			r.m.PrefetchBlob("cached", b.Size)
		} else {
			missing = append(missing, b)
		}
	}
	j.mu.Lock()
	j.rec.BlobsTotal, j.rec.BlobsDone, j.rec.BytesDone = len(blobs), cachedBlobs, cachedBytes
	for _, b := range blobs {
		j.rec.BytesTotal += b.Size
	}
	j.mu.Unlock()
	blobs = missing
	save(j.snapshot())

	concurrency, lim := r.settings(j.rec)
	work := make(chan manifest.Descriptor)
	var wg sync.WaitGroup
	for range min(concurrency, max(len(blobs), 1)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for d := range work {
				r.blob(ctx, j, repo, d, lim)
			}
		}()
	}
	for _, d := range blobs {
		select {
		case work <- d:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
	}
	close(work)
	wg.Wait()
	return nil
}

func isManifest(mt string) bool {
	return manifest.IsIndex(mt) || strings.Contains(mt, "manifest")
}

// blob caches one blob, with one retry.
func (r *runner) blob(ctx context.Context, j *job, repo string, d manifest.Descriptor, lim *rate.Limiter) {
	done := func() {
		j.mu.Lock()
		j.rec.BlobsDone++
		j.rec.BytesDone += d.Size
		j.mu.Unlock()
	}
	j.current.Store(d.Digest.String(), struct{}{})
	defer j.current.Delete(d.Digest.String())
	var err error
	busy := 0
	for attempt := 0; attempt < 2 && ctx.Err() == nil; attempt++ {
		var got atomic.Int64
		var fetched bool
		fetched, err = r.warm.CacheBlob(ctx, repo, d.Digest, func(src fill.Source) fill.Source {
			return r.counted(ctx, src, d.Digest, &got, j, lim)
		})
		j.bytesLive.Add(-got.Load())
		if errors.Is(err, fill.ErrTooManyFills) && busy < maxBusyWaits {
			// Clients' downloads fill limits.max_fills: wait, without
			// spending an attempt.
			busy++
			attempt--
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		if err == nil {
			done()
			if fetched {
				j.mu.Lock()
				j.rec.BlobsFetched++
				j.rec.BytesFetched += d.Size
				j.mu.Unlock()
				r.m.PrefetchBlob("fetched", d.Size)
			} else {
				r.m.PrefetchBlob("cached", d.Size)
			}
			return
		}
	}
	if ctx.Err() != nil {
		return
	}
	r.m.PrefetchBlob("failed", 0)
	j.mu.Lock()
	j.rec.Errors = append(j.rec.Errors, fmt.Sprintf("blob %s: %v", d.Digest, err))
	j.mu.Unlock()
}

// maxBusyWaits bounds the one-second waits of a blob for a free fill slot.
const maxBusyWaits = 600

// counted wraps a fill source: it counts bytes into the job's live
// progress and, with a limiter, throttles while no client waits on the
// blob.
//
// Once jobCtx ends with errJobCancelled, a read while no client waits on
// the blob fails with that error, so the fill this job started stops (and
// caches nothing) rather than downloading on for a cancelled job; a fill a
// client shares carries on for the client.
func (r *runner) counted(jobCtx context.Context, src fill.Source, dgst digest.Digest, got *atomic.Int64, j *job, lim *rate.Limiter) fill.Source {
	return func(ctx context.Context, offset int64) (io.ReadCloser, int64, error) {
		if cancelledAlone(jobCtx, func() bool { return r.warm.FillClients(dgst) <= 1 }) {
			return nil, 0, errFillAbandoned // a resume after the cancel
		}
		body, size, err := src(ctx, offset)
		if err != nil {
			return nil, size, err
		}
		// Throttling waits end when the job is cancelled.
		wctx, wcancel := context.WithCancel(ctx)
		stop := context.AfterFunc(jobCtx, func() {
			if errors.Is(context.Cause(jobCtx), errJobCancelled) {
				wcancel()
			}
		})
		return &progressReader{rc: body, ctx: wctx, job: jobCtx, got: got, live: &j.bytesLive, lim: lim,
			alone: func() bool { return r.warm.FillClients(dgst) <= 1 },
			done:  func() { stop(); wcancel() }}, size, nil
	}
}

type progressReader struct {
	rc    io.ReadCloser
	ctx   context.Context // the fill's, ended too when the job is cancelled
	job   context.Context // the job run's
	got   *atomic.Int64
	live  *atomic.Int64
	lim   *rate.Limiter
	alone func() bool // no client waits on the blob: throttle, and stop when cancelled
	done  func()
}

// cancelledAlone reports whether the job was cancelled and no client waits
// on the blob.
func cancelledAlone(job context.Context, alone func() bool) bool {
	return errors.Is(context.Cause(job), errJobCancelled) && alone()
}

func (p *progressReader) Read(b []byte) (int, error) {
	if cancelledAlone(p.job, p.alone) {
		return 0, errFillAbandoned
	}
	if p.lim != nil && p.alone() {
		// At most throttleStep's worth of bytes a read: each wait is short,
		// so the fill reading this sees bytes often (its idle timeout
		// is for the upstream, not for this cap) and a client joining
		// lifts the cap within a step.
		if step := max(int(float64(p.lim.Limit())*throttleStep.Seconds()), 1); len(b) > min(step, p.lim.Burst()) {
			b = b[:min(step, p.lim.Burst())]
		}
	}
	n, err := p.rc.Read(b)
	if n > 0 {
		p.got.Add(int64(n))
		p.live.Add(int64(n))
		if p.lim != nil && p.alone() {
			if werr := p.throttle(n); werr != nil && err == nil {
				err = werr
			}
		}
	}
	return n, err
}

// throttleStep bounds one throttled read's share of the cap (a tenth of a
// second's worth of bytes) and how long a wait goes without looking for a
// client that joined.
const throttleStep = 100 * time.Millisecond

// throttle waits for n bytes of the limiter's budget, or less: as soon as
// a client waits on the blob (alone turns false) the wait ends and the
// bytes not waited for go back to the limiter, so the client gets the
// upstream's full speed at once, not after this wait. Errors: p.ctx's
// (the fill's end, or the job's cancel).
func (p *progressReader) throttle(n int) error {
	res := p.lim.ReserveN(time.Now(), n)
	if !res.OK() { // n over the burst: cannot happen with Read's bound
		return p.lim.WaitN(p.ctx, min(n, p.lim.Burst()))
	}
	delay := res.Delay()
	if delay == 0 {
		return nil
	}
	t := time.NewTimer(delay)
	defer t.Stop()
	tick := time.NewTicker(throttleStep)
	defer tick.Stop()
	for {
		select {
		case <-t.C:
			return nil
		case <-p.ctx.Done():
			res.Cancel()
			return context.Cause(p.ctx)
		case <-tick.C:
			if !p.alone() {
				res.Cancel() // lifted: a client waits on this blob
				return nil
			}
		}
	}
}

func (p *progressReader) Close() error {
	p.done()
	return p.rc.Close()
}

// newLimiter returns a limiter of bytesPerSecond (nil for 0), with a burst
// of a tenth of a second's worth (at least 32 KiB).
func newLimiter(bytesPerSecond int64) *rate.Limiter {
	if bytesPerSecond <= 0 {
		return nil
	}
	burst := int(max(bytesPerSecond/10, 32<<10))
	return rate.NewLimiter(rate.Limit(bytesPerSecond), burst)
}
