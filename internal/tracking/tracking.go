// Package tracking is the mirror's memory of NGC tags and of what the nodes
// pull. It polls the tag lists of tracked repositories (following Link
// pagination), records each tag's first and last sighting, digest and
// platforms, detects new tags and new monthly releases, and keeps the pull
// history that the automatic prefetch rule follows. All of it lives in a
// state.Store; the registry's request path only hands pulls to a bounded
// queue and never waits on the store.
package tracking

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"

	"github.com/ngc-mirror/ngc-mirror/internal/clientip"
	"github.com/ngc-mirror/ngc-mirror/internal/manifest"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctag"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// Upstream is what tracking needs of the upstream registry
// (*upstream.Client).
type Upstream interface {
	ListTags(ctx context.Context, repo string, n int, last string) (*upstream.TagPage, error)
	GetManifest(ctx context.Context, repo, ref string, accept []string) (*upstream.Manifest, error)
}

// Options tune a Tracker. Zero values take the defaults noted.
type Options struct {
	// Repositories are always tracked (config tracking.repositories).
	Repositories []string
	// Recent: repositories pulled within this long are tracked too
	// (default 30 days).
	Recent time.Duration
	// ResolvePerPoll bounds how many tags one poll of a repository
	// resolves (a manifest GET each; default 50): first those without a
	// known digest, newest first, then those resolved longest ago, past
	// Reresolve. The rest follow in later polls. A first poll of nvidia/cuda
	// sees over a thousand tags.
	ResolvePerPoll int
	// Reresolve: a tag's digest older than this is read again, so that a
	// tag that moves (latest) is followed (default 24 h).
	Reresolve time.Duration
	// StoreTimeout bounds one store operation (default 2 s).
	StoreTimeout time.Duration
	Log          *slog.Logger
	Metrics      *metrics.Tracking
}

// Tracker polls tags and records pulls. Build it with New; run Run in a
// goroutine to write recorded pulls.
type Tracker struct {
	store state.Store
	up    Upstream
	opts  Options
	log   *slog.Logger
	m     *metrics.Tracking
	queue chan state.Pull

	mu     sync.Mutex
	recent map[string]*lastTag // client \x00 repo → the tag it last resolved
}

// lastTag is what a client resolved by tag, to learn the platform it then
// picks from the index (by digest).
type lastTag struct {
	tag      string
	digest   digest.Digest
	children map[digest.Digest]string // child digest → platform
	at       time.Time
}

const maxRecent = 4096

// queueSize bounds pulls waiting to be recorded; beyond it pulls are
// dropped and counted (ngc_mirror_pull_records_dropped_total).
const queueSize = 4096

// New returns a Tracker.
func New(store state.Store, up Upstream, opts Options) *Tracker {
	if opts.Recent <= 0 {
		opts.Recent = 30 * 24 * time.Hour
	}
	if opts.ResolvePerPoll <= 0 {
		opts.ResolvePerPoll = 50
	}
	if opts.Reresolve <= 0 {
		opts.Reresolve = 24 * time.Hour
	}
	if opts.StoreTimeout <= 0 {
		opts.StoreTimeout = 2 * time.Second
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	return &Tracker{store: store, up: up, opts: opts, log: opts.Log, m: opts.Metrics,
		queue: make(chan state.Pull, queueSize), recent: map[string]*lastTag{}}
}

// Store returns the tracker's state store.
func (t *Tracker) Store() state.Store { return t.store }

// ManifestServed is what the registry handler reports for each manifest it
// served (GET or HEAD, status 200).
type ManifestServed struct {
	Repository string
	Reference  string // the tag or digest in the request
	Digest     digest.Digest
	MediaType  string
	Body       []byte // nil for HEAD
	Client     string // user name or IP address
	Time       time.Time
}

// ClientOf names the client of r for the pull history: user (when
// authenticated) or the client's IP address (clientip.Of: behind a trusted
// load balancer, from X-Forwarded-For).
func ClientOf(r *http.Request, user string) string {
	if user != "" {
		return user
	}
	return clientip.Of(r)
}

// Served records a manifest pull. It never blocks: when the queue is full
// the pull is dropped and counted.
//
// A pull by tag is recorded with the tag. Docker then GETs the platform's
// manifest by digest, and containerd HEADs the tag and GETs the index and
// the platform's manifest by digest; a by-digest pull of a child of the
// index this client last resolved by tag is recorded with that tag and the
// child's platform. Repeats within a minute (HEAD then GET) count once. A
// GET by digest that belongs to no tag the client resolved is recorded
// without a tag.
func (t *Tracker) Served(ev ManifestServed) {
	key := ev.Client + "\x00" + ev.Repository
	var kids map[digest.Digest]string // an index's children, parsed outside the lock
	if ev.Body != nil {
		kids = children(ev.MediaType, ev.Body)
	}
	var rec *state.Pull
	t.mu.Lock()
	lt := t.recent[key]
	if _, err := digest.Parse(ev.Reference); err != nil { // by tag
		if lt == nil || lt.tag != ev.Reference || lt.digest != ev.Digest || ev.Time.Sub(lt.at) > time.Minute {
			rec = &state.Pull{Repository: ev.Repository, Tag: ev.Reference, Digest: ev.Digest.String(), Client: ev.Client, Time: ev.Time}
			if len(t.recent) >= maxRecent {
				clear(t.recent) // crude, bounded; loses at most the platform of in-flight pulls
			}
			lt = &lastTag{tag: ev.Reference, digest: ev.Digest, at: ev.Time}
			t.recent[key] = lt
		}
		if ev.Body != nil && lt.children == nil {
			lt.children = kids
		}
	} else {
		var p string
		var child bool
		if lt != nil {
			p, child = lt.children[ev.Digest]
		}
		switch {
		case lt != nil && ev.Digest == lt.digest:
			// containerd fetches the index it resolved by tag: part of
			// that pull, recorded with the tag already.
			if ev.Body != nil && lt.children == nil {
				lt.children = kids
			}
		case child && p != "" && ev.Body != nil:
			rec = &state.Pull{Repository: ev.Repository, Tag: lt.tag, Digest: ev.Digest.String(), Platform: p, Client: ev.Client, Time: ev.Time}
			lt.children[ev.Digest] = "" // once per pull
		case child:
			// A HEAD or a repeat of a child already recorded.
		case ev.Body != nil:
			// A pull by digest alone (repository@sha256:...).
			rec = &state.Pull{Repository: ev.Repository, Digest: ev.Digest.String(), Client: ev.Client, Time: ev.Time}
		}
	}
	t.mu.Unlock()
	if rec == nil {
		return
	}
	select {
	case t.queue <- *rec:
	default:
		t.m.PullDropped()
	}
}

func children(mediaType string, body []byte) map[digest.Digest]string {
	if !manifest.IsIndex(mediaType) {
		return map[digest.Digest]string{}
	}
	ds, err := manifest.Children(body)
	if err != nil {
		return map[digest.Digest]string{}
	}
	m := make(map[digest.Digest]string, len(ds))
	for _, d := range ds {
		if p := d.PlatformString(); p != "" {
			m[d.Digest] = p
		}
	}
	return m
}

// Run writes queued pulls to the store until ctx ends. A pull the store
// refuses (outage) is dropped, logged once per outage and counted; writing
// resumes when the store answers again.
func (t *Tracker) Run(ctx context.Context) {
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case p := <-t.queue:
			sctx, cancel := context.WithTimeout(ctx, t.opts.StoreTimeout)
			err := t.store.RecordPull(sctx, p)
			cancel()
			switch {
			case err != nil:
				t.m.PullDropped()
				t.m.StateError(metrics.OpRecordPull)
				if !failing {
					t.log.Warn("state store unreachable: pull history paused", "err", err)
					failing = true
				}
			case failing:
				t.log.Info("state store reachable again: pull history resumed")
				failing = false
			}
		}
	}
}

// Tracked returns the repositories to poll: the configured ones and those
// pulled within Options.Recent, sorted.
func (t *Tracker) Tracked(ctx context.Context) ([]string, error) {
	repos, err := t.store.Repositories(ctx)
	if err != nil {
		return nil, err
	}
	return t.TrackedOf(repos), nil
}

// TrackedOf is Tracked over repositories already read from the store.
func (t *Tracker) TrackedOf(repos []state.Repository) []string {
	set := map[string]bool{}
	for _, r := range t.opts.Repositories {
		set[r] = true
	}
	since := time.Now().Add(-t.opts.Recent)
	for _, r := range repos {
		if !r.LastPulled.IsZero() && r.LastPulled.After(since) {
			set[r.Name] = true
		}
	}
	out := make([]string, 0, len(set))
	for r := range set {
		out = append(out, r)
	}
	sort.Strings(out)
	return out
}

// ErrState wraps the state store's errors returned by Poll, to tell them
// from the upstream's.
var ErrState = errors.New("state store")

// PollResult is what one poll of a repository found.
type PollResult struct {
	Repository string
	Tags       int         // tags listed upstream
	New        []state.Tag // tags never seen before (empty on a first poll: that is the baseline)
	Releases   []state.Tag // of New, monthly tags whose release is newer than any known for their variant
	Resolved   int         // tags whose digest was resolved in this poll
}

// maxPages bounds Link pagination (1000 tags a page).
const maxPages = 1000

// Poll lists repo's tags upstream and records them. The first poll of a
// repository sets the baseline; later polls report tags not seen before
// (logged, counted in ngc_mirror_tags_discovered_total) and new monthly
// releases of a known variant. Up to Options.ResolvePerPoll tags without a
// known digest are resolved (digest, media type, platforms of an index).
// Errors: the upstream's (*upstream.Error: unknown repository, denied,
// unavailable) or the store's.
func (t *Tracker) Poll(ctx context.Context, repo string) (*PollResult, error) {
	res, err := t.poll(ctx, repo)
	t.m.Polled(err == nil)
	return res, err
}

func (t *Tracker) poll(ctx context.Context, repo string) (*PollResult, error) {
	var names []string
	last := ""
	for range maxPages {
		page, err := t.up.ListTags(ctx, repo, 1000, last)
		if err != nil {
			return nil, err
		}
		names = append(names, page.Tags...)
		if !page.More || len(page.Tags) == 0 {
			break
		}
		last = page.Tags[len(page.Tags)-1]
	}
	known, err := t.store.Tags(ctx, repo)
	if err != nil {
		t.m.StateError(metrics.OpPoll)
		return nil, fmt.Errorf("%w: %w", ErrState, err)
	}
	byName := make(map[string]state.Tag, len(known))
	newest := map[string]string{} // variant → newest known release
	for _, k := range known {
		byName[k.Name] = k
		if p := ngctag.Parse(k.Name); p.Monthly && ngctag.Newer(p.Release, newest[p.Variant]) {
			newest[p.Variant] = p.Release
		}
	}
	baseline := len(known) > 0
	if !baseline {
		if repos, err := t.store.Repositories(ctx); err == nil {
			for _, r := range repos {
				baseline = baseline || (r.Name == repo && !r.LastPolled.IsZero())
			}
		}
	}
	now := time.Now().UTC()
	res := &PollResult{Repository: repo, Tags: len(names)}
	upd := make([]state.Tag, 0, len(names))
	for _, n := range names {
		tg, ok := byName[n]
		if !ok {
			tg = state.Tag{Repository: repo, Name: n, FirstSeen: now}
			if baseline {
				res.New = append(res.New, tg)
				if p := ngctag.Parse(n); p.Monthly && ngctag.Newer(p.Release, newest[p.Variant]) {
					res.Releases = append(res.Releases, tg)
				}
			}
		}
		tg.LastSeen = now
		upd = append(upd, tg)
	}
	t.resolve(ctx, repo, upd, res)
	for _, tg := range res.New {
		p := ngctag.Parse(tg.Name)
		t.log.Info("new upstream tag", "repository", repo, "tag", tg.Name, "release", p.Release, "variant", p.Variant)
	}
	for _, tg := range res.Releases {
		p := ngctag.Parse(tg.Name)
		t.log.Info("new monthly release", "repository", repo, "tag", tg.Name, "release", p.Release, "variant", p.Variant)
	}
	t.m.Discovered("tag", len(res.New))
	t.m.Discovered("release", len(res.Releases))
	if err := t.store.PutTags(ctx, upd); err != nil {
		t.m.StateError(metrics.OpPoll)
		return nil, fmt.Errorf("%w: %w", ErrState, err)
	}
	if err := t.store.MarkPolled(ctx, repo, now); err != nil {
		t.m.StateError(metrics.OpPoll)
		return nil, fmt.Errorf("%w: %w", ErrState, err)
	}
	if !baseline {
		t.log.Info("tracking repository", "repository", repo, "tags", len(names))
	}
	return res, nil
}

// resolve fills in digest, media type and platforms of up to
// ResolvePerPoll tags of upd: those without a digest (monthly tags newest
// first, then the others in reverse name order), then those resolved
// longer than Reresolve ago, oldest first. A failure leaves the tag as it
// was for the next poll.
func (t *Tracker) resolve(ctx context.Context, repo string, upd []state.Tag, res *PollResult) {
	var todo, stale []int
	for i := range upd {
		switch {
		case upd[i].Digest == "":
			todo = append(todo, i)
		case time.Since(upd[i].Resolved) > t.opts.Reresolve:
			stale = append(stale, i)
		}
	}
	slices.SortFunc(todo, func(a, b int) int {
		pa, pb := ngctag.Parse(upd[a].Name), ngctag.Parse(upd[b].Name)
		switch {
		case pa.Monthly != pb.Monthly:
			if pa.Monthly {
				return -1
			}
			return 1
		case pa.Release != pb.Release:
			if pa.Release > pb.Release {
				return -1
			}
			return 1
		case upd[a].Name > upd[b].Name:
			return -1
		case upd[a].Name < upd[b].Name:
			return 1
		}
		return 0
	})
	slices.SortFunc(stale, func(a, b int) int { return upd[a].Resolved.Compare(upd[b].Resolved) })
	todo = append(todo, stale...)
	if len(todo) > t.opts.ResolvePerPoll {
		todo = todo[:t.opts.ResolvePerPoll]
	}
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(4)
	for _, i := range todo {
		g.Go(func() error {
			m, err := t.up.GetManifest(gctx, repo, upd[i].Name, nil)
			if err != nil {
				t.log.Debug("resolving tag failed", "repository", repo, "tag", upd[i].Name, "err", err)
				return nil
			}
			var platforms []string
			if manifest.IsIndex(m.MediaType) {
				ds, _ := manifest.Children(m.Body)
				for _, d := range ds {
					if p := d.PlatformString(); p != "" && !slices.Contains(platforms, p) {
						platforms = append(platforms, p)
					}
				}
				sort.Strings(platforms)
			}
			mu.Lock()
			upd[i].Digest, upd[i].MediaType, upd[i].Platforms = m.Digest.String(), m.MediaType, platforms
			upd[i].Resolved = time.Now().UTC()
			res.Resolved++
			mu.Unlock()
			return nil
		})
	}
	_ = g.Wait()
}

// PollAll polls every tracked repository, one after another, and returns
// the results of those that succeeded. A repository the upstream fails on
// is logged and skipped; a state store failure ends the round (tracking
// pauses until the store is back) and is returned.
func (t *Tracker) PollAll(ctx context.Context) ([]*PollResult, error) {
	repos, err := t.Tracked(ctx)
	if err != nil {
		t.m.StateError(metrics.OpPoll)
		return nil, err
	}
	var out []*PollResult
	for _, r := range repos {
		res, err := t.Poll(ctx, r)
		if err != nil {
			if ctx.Err() != nil {
				return out, ctx.Err()
			}
			if errors.Is(err, ErrState) {
				return out, err
			}
			t.log.Warn("polling tags failed", "repository", r, "err", err)
			continue
		}
		out = append(out, res)
	}
	return out, nil
}
