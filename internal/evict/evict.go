// Package evict keeps the cache within its budget: a maximum size of cached
// content (cache.max_size) and a minimum of free space on the filesystem
// that holds it (cache.min_free, filesystem driver only).
//
// # Access times
//
// An in-memory index holds every cached blob and manifest with its size and
// last access (Unix nanoseconds in an atomic, in a sharded map). Cache hits
// (Touch) and commits (storage.Event) update it; nothing is written to
// storage on a hit. At start the index is seeded from the driver's
// modification times (Seed), so a restart keeps a sensible order: content
// written long ago and not asked for since goes first.
//
// # What is retained
//
// Eviction removes content in order of effective access time, oldest first.
// The effective time of an object is the latest of its own access and the
// effective time of every cached manifest that refers to it, transitively
// (an index → its child manifests → their config and layer blobs). So:
//
//   - A manifest is retained while its effective time is after the point the
//     eviction pass has reached (the LRU window); its config and layers are
//     then retained with it, whether or not a client asked for them lately
//     (a node that has the layers pulls only the manifests).
//   - A layer shared by images of several repositories is retained while any
//     of those manifests is: it goes only after the last of them left the
//     window.
//   - Evicting an image drops its manifest from the retained set and removes
//     its blobs; the manifest bytes are kept (they are small). A client
//     pulling the image again gets the manifest from the cache and the
//     missing blobs are fetched again on demand (a cache miss, one fill per
//     digest); repository links (storage.LinkPath) stay, so access
//     checks still pass. Manifests themselves are removed only when
//     removing every evictable blob was not enough.
//
// Never evicted: a blob under a lease (a response streaming it now, see
// Lease), and everything a pin covers: the pinned manifest (for a tag, the
// digest the cache's tag record points at), and for an index its child
// manifests, and the config and layer blobs of all of them.
//
// # Budget
//
// A pass starts when the cache is over budget (usage above max_size, or free
// space below min_free): after a commit that crossed it, every Interval, and
// when a fill asks for room (Admit) that is not there. It evicts down to the
// low-water mark (LowWater of max_size; min_free plus (1-LowWater) of it),
// so that it does not run on every commit. When nothing more can be evicted
// Admit refuses the blob with ErrFull: the fill then serves it straight
// from the upstream without caching it (internal/fill, internal/proxy).
//
// The index is this process's view. Content another process adds to a
// shared bucket is not counted until the next start; content it removes is
// forgotten when eviction finds it gone.
package evict

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/manifest"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/names"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// ErrFull is returned by Admit when a blob does not fit the budget and
// nothing evictable is left (everything is pinned or being served).
var ErrFull = errors.New("evict: the cache is full and nothing can be evicted")

// Pin names an image that eviction keeps: a tag (the manifest the cache's
// tag record points at, whatever it is at the time of a pass) or a digest.
type Pin struct {
	Registry   string // "": Options.Registry
	Repository string
	Tag        string        // "" when Digest is set
	Digest     digest.Digest // "" when Tag is set
}

// ParsePin parses "repository:tag" or "repository@sha256:..."
// (names.ParseReference; with both, the digest). The repository is a path
// on the upstream (nvidia/pytorch), without a registry host.
func ParsePin(s string) (Pin, error) {
	r, err := names.ParseReference(s)
	if err != nil || r.Registry != "" {
		return Pin{}, fmt.Errorf("evict: pin %q: want repository:tag or repository@digest", s)
	}
	if r.Ref() == "" {
		return Pin{}, fmt.Errorf("evict: pin %q names no tag or digest", s)
	}
	p := Pin{Repository: r.Repository, Digest: r.Digest}
	if p.Digest == "" {
		p.Tag = r.Tag
	}
	return p, nil
}

// String returns the pin as ParsePin reads it.
func (p Pin) String() string {
	if p.Digest != "" {
		return p.Repository + "@" + p.Digest.String()
	}
	return p.Repository + ":" + p.Tag
}

// PinSource returns images to keep, for example those a prefetch rule
// matches. It is called at the start of each eviction pass.
type PinSource func(ctx context.Context) ([]Pin, error)

// Options configure an Evictor. Zero values take the defaults noted.
type Options struct {
	// MaxSize is the most bytes of cached blobs and manifests (0: no limit).
	MaxSize int64
	// MinFree is the least bytes to keep free on the filesystem holding
	// Dir, and MinFreePercent the least percentage (0 to 100) of it; the
	// larger applies. 0: no minimum. Both need Dir (or FreeSpace).
	MinFree        int64
	MinFreePercent float64
	// Dir is the local cache directory whose filesystem MinFree is about
	// ("" with the S3 driver: only MaxSize applies).
	Dir string
	// LowWater is the fraction of MaxSize a pass evicts down to (default
	// 0.9); min_free is raised by the same margin.
	LowWater float64
	// Interval between periodic passes in Run (default 1 minute).
	Interval time.Duration
	// AdmitTimeout bounds how long Admit waits for a pass to make room
	// (default 10 s).
	AdmitTimeout time.Duration
	// Pins are images always kept (from the configuration).
	Pins []Pin
	// Registry is the upstream registry of pins that name none (the cache
	// keys tag records by registry: storage.Repo).
	Registry string
	Log      *slog.Logger
	Metrics  *metrics.Eviction // nil records nothing
	// Now returns the time (default time.Now); tests set it.
	Now func() time.Time
	// FreeSpace returns the free and total bytes of the cache's filesystem
	// (default: statfs(2) of Dir).
	FreeSpace func() (free, total int64, err error)
}

// Enabled reports whether o sets a budget at all.
func (o Options) Enabled() bool {
	return o.MaxSize > 0 || o.MinFree > 0 || o.MinFreePercent > 0
}

const (
	kBlob uint8 = iota
	kManifest
)

type key struct {
	kind uint8
	d    digest.Digest
}

func kindOf(kind storage.Kind) (uint8, bool) {
	switch kind {
	case storage.KindBlob:
		return kBlob, true
	case storage.KindManifest:
		return kManifest, true
	}
	return 0, false
}

func kindName(k uint8) storage.Kind {
	if k == kManifest {
		return storage.KindManifest
	}
	return storage.KindBlob
}

type entry struct {
	last atomic.Int64 // Unix nanoseconds of the last access

	// Guarded by the shard's mutex.
	size     int64
	present  bool          // cached, as far as this process knows
	leases   int           // responses streaming it now
	skipped  bool          // a pass left it alone for its leases: their end can make room
	evicting chan struct{} // non-nil while a pass removes it; closed after

	// Guarded by Evictor.passSem (read and written by passes only).
	refs       []digest.Digest
	refsLoaded bool
}

const nShards = 64

type shard struct {
	mu sync.RWMutex
	m  map[key]*entry
}

var seed = maphash.MakeSeed()

// Store is what eviction needs of the cache (*storage.Store).
type Store interface {
	// Notify subscribes to the cache's changes (commits, removals).
	Notify(func(storage.Event))
	// Objects lists every cached blob and manifest (the seed).
	Objects(ctx context.Context) ([]storage.Object, error)
	// GetManifest reads a manifest, for what it refers to.
	GetManifest(ctx context.Context, dgst digest.Digest) (*storage.Manifest, error)
	// GetTag resolves a tag pin.
	GetTag(ctx context.Context, repo storage.Repo, tag string) (storage.TagRecord, error)
	RemoveBlob(ctx context.Context, dgst digest.Digest) (int64, error)
	RemoveManifest(ctx context.Context, dgst digest.Digest) (int64, error)
}

// Evictor keeps a Store within its budget. Build it with New; a cache
// without a budget uses Unlimited instead.
type Evictor struct {
	store  Store
	opts   Options
	log    *slog.Logger
	shards [nShards]shard
	used   atomic.Int64 // bytes of the objects the index holds
	// gen counts changes that can make room (commits, removals, the end
	// of leases that kept a pass from evicting); fruitless is gen when an
	// admission's pass freed nothing, so that a full cache does not rescan
	// the index on every miss while nothing changed.
	gen       atomic.Uint64
	fruitless atomic.Uint64

	mu          sync.Mutex
	reserved    int64 // bytes admitted but not committed yet
	sources     map[string]PinSource
	lastPins    map[string][]Pin // each source's last good answer
	refused     int              // refusals since the last warning
	lastWarning time.Time

	passSem chan struct{} // one pass at a time
	kick    chan struct{}
}

// New returns an Evictor for store and subscribes it to the store's
// changes (storage.Store.Notify). Call Run to seed it and start the
// periodic passes.
func New(store Store, opts Options) *Evictor {
	if opts.LowWater <= 0 || opts.LowWater > 1 {
		opts.LowWater = 0.9
	}
	if opts.Interval <= 0 {
		opts.Interval = time.Minute
	}
	if opts.AdmitTimeout <= 0 {
		opts.AdmitTimeout = 10 * time.Second
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.FreeSpace == nil && opts.Dir != "" {
		dir := opts.Dir
		opts.FreeSpace = func() (int64, int64, error) {
			var st syscall.Statfs_t
			if err := syscall.Statfs(dir, &st); err != nil {
				return 0, 0, err
			}
			return int64(st.Bavail) * int64(st.Bsize), int64(st.Blocks) * int64(st.Bsize), nil
		}
	}
	e := &Evictor{
		store:    store,
		opts:     opts,
		log:      opts.Log,
		sources:  map[string]PinSource{},
		lastPins: map[string][]Pin{},
		passSem:  make(chan struct{}, 1),
		kick:     make(chan struct{}, 1),
	}
	for i := range e.shards {
		e.shards[i].m = map[key]*entry{}
	}
	e.fruitless.Store(^uint64(0))
	e.opts.Metrics.SetBudget(opts.MaxSize, e.minFree())
	store.Notify(e.observe)
	return e
}

func (e *Evictor) shard(d digest.Digest) *shard {
	return &e.shards[maphash.String(seed, string(d))%nShards]
}

// getLocked returns the entry of k, creating an absent one. sh.mu is held.
func (sh *shard) getLocked(k key) *entry {
	en := sh.m[k]
	if en == nil {
		en = &entry{}
		sh.m[k] = en
	}
	return en
}

// dropLocked removes an entry nothing refers to any more. sh.mu is held.
func (sh *shard) dropLocked(k key, en *entry) {
	if !en.present && en.leases == 0 && en.evicting == nil && sh.m[k] == en {
		delete(sh.m, k)
	}
}

func (e *Evictor) now() int64 { return e.opts.Now().UnixNano() }

// observe follows the store's changes.
func (e *Evictor) observe(ev storage.Event) {
	kind, ok := kindOf(ev.Kind)
	if !ok {
		return
	}
	k := key{kind, ev.Digest}
	e.gen.Add(1)
	if ev.Removed {
		e.forget(k)
		return
	}
	sh := e.shard(k.d)
	sh.mu.Lock()
	en := sh.getLocked(k)
	if !en.present {
		en.present, en.size = true, ev.Size
		e.used.Add(ev.Size)
	}
	en.last.Store(e.now())
	sh.mu.Unlock()
	if over, _ := e.excess(0); over {
		select {
		case e.kick <- struct{}{}:
		default:
		}
	}
}

// forget records that k is no longer cached.
func (e *Evictor) forget(k key) {
	sh := e.shard(k.d)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	en := sh.m[k]
	if en == nil {
		return
	}
	if en.present {
		en.present = false
		e.used.Add(-en.size)
	}
	sh.dropLocked(k, en)
}

// Seed adds everything the store holds to the index (SeedObjects of a new
// listing).
func (e *Evictor) Seed(ctx context.Context) error {
	objs, err := e.store.Objects(ctx)
	e.SeedObjects(objs)
	return err
}

// SeedObjects adds listed objects to the index, with their modification
// time as last access unless the index saw a later one. Seed the index
// before Run: passes see only what the index holds.
func (e *Evictor) SeedObjects(objs []storage.Object) {
	for _, o := range objs {
		kind, ok := kindOf(o.Kind)
		if !ok || o.Digest.Validate() != nil {
			continue
		}
		k := key{kind, o.Digest}
		sh := e.shard(k.d)
		sh.mu.Lock()
		en := sh.getLocked(k)
		if !en.present {
			en.present, en.size = true, o.Size
			e.used.Add(o.Size)
		}
		if t := o.ModTime.UnixNano(); en.last.Load() < t {
			en.last.Store(t)
		}
		sh.mu.Unlock()
	}
}

// Used returns the bytes of cached content the index holds.
func (e *Evictor) Used() int64 {
	return e.used.Load()
}

// Touch records an access to a cached object of kind now. It takes a read lock and an atomic store; it never
// writes to storage.
func (e *Evictor) Touch(kind storage.Kind, d digest.Digest) {
	kd, ok := kindOf(kind)
	if !ok {
		return
	}
	k := key{kd, d}
	now := e.now()
	sh := e.shard(d)
	sh.mu.RLock()
	en := sh.m[k]
	if en != nil {
		en.last.Store(now)
	}
	sh.mu.RUnlock()
	if en == nil { // not indexed yet (Seed still running): remember the time
		sh.mu.Lock()
		sh.getLocked(k).last.Store(now)
		sh.mu.Unlock()
	}
}

// Lease protects blob d from eviction until release is called (call it
// exactly once; later calls do nothing). Take it before looking the blob
// up, so that a pass either removed it already (the lookup misses) or
// leaves it alone. It waits while a pass is removing d, and returns ctx's
// error if ctx ends first.
func (e *Evictor) Lease(ctx context.Context, d digest.Digest) (release func(), err error) {
	k := key{kBlob, d}
	sh := e.shard(d)
	sh.mu.Lock()
	en := sh.getLocked(k)
	for en.evicting != nil {
		ch := en.evicting
		sh.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		sh.mu.Lock()
		en = sh.getLocked(k)
	}
	en.leases++
	sh.mu.Unlock()
	return sync.OnceFunc(func() {
		sh.mu.Lock()
		en.leases--
		if en.leases == 0 && en.skipped {
			// Only a lease that kept a pass from evicting frees something
			// by ending; others leave the "nothing to free" verdict valid.
			en.skipped = false
			e.gen.Add(1)
		}
		sh.dropLocked(k, en)
		sh.mu.Unlock()
	}), nil
}

// minFree returns the bytes to keep free now (0: no minimum).
func (e *Evictor) minFree() int64 {
	mf := e.opts.MinFree
	if e.opts.MinFreePercent > 0 && e.opts.FreeSpace != nil {
		if _, total, err := e.opts.FreeSpace(); err == nil {
			mf = max(mf, int64(float64(total)*e.opts.MinFreePercent/100))
		}
	}
	if e.opts.FreeSpace == nil {
		return 0
	}
	return mf
}

// excess says whether the cache, with extra more bytes, is over budget,
// and how many bytes a pass must free to reach the low-water mark.
func (e *Evictor) excess(extra int64) (over bool, need int64) {
	e.mu.Lock()
	used := e.used.Load() + e.reserved + extra
	e.mu.Unlock()
	if max := e.opts.MaxSize; max > 0 {
		if used > max {
			over = true
		}
		need = used - int64(float64(max)*e.opts.LowWater)
	}
	if mf := e.minFree(); mf > 0 {
		free, _, err := e.opts.FreeSpace()
		if err == nil {
			free -= extra
			if free < mf {
				over = true
			}
			target := mf + int64(float64(mf)*(1-e.opts.LowWater))
			need = max(need, target-free)
		}
	}
	return over, need
}

// Admit asks for room for a blob of size bytes that a fill is about to
// write. When it does not fit, Admit runs an eviction pass (waiting at
// most Options.AdmitTimeout). It returns release, to be called once the
// blob is committed or abandoned (the room it reserved is then counted as
// cached content, or given back), or an error wrapping ErrFull when the
// blob cannot be cached: the caller serves it without caching.
func (e *Evictor) Admit(ctx context.Context, d digest.Digest, size int64) (release func(), err error) {
	if !e.opts.Enabled() {
		return func() {}, nil
	}
	if r := e.reserve(size); r != nil {
		return r, nil
	}
	if e.opts.MaxSize > 0 && size > e.opts.MaxSize {
		e.refuse(d, size, nil) // would never fit: evict nothing for it
		return nil, fmt.Errorf("%w: blob %s of %d bytes is larger than the budget", ErrFull, d, size)
	}
	var perr error
	g := e.gen.Load()
	ran, freed := false, false
	if g != e.fruitless.Load() {
		pctx, cancel := context.WithTimeout(ctx, e.opts.AdmitTimeout)
		var res Result
		res, perr = e.pass(pctx, size)
		cancel()
		ran, freed = true, len(res.Removed) > 0
	}
	if r := e.reserve(size); r != nil {
		return r, nil
	}
	if ran && !freed && perr == nil {
		e.fruitless.Store(g) // the same pass would free nothing until gen moves
	}
	if err := ctx.Err(); err != nil {
		return nil, err // the fill was cancelled: not a refusal
	}
	e.refuse(d, size, perr)
	return nil, fmt.Errorf("%w (blob %s, %d bytes)", ErrFull, d, size)
}

// reserve counts size bytes as on their way into the cache if they fit,
// and returns the function giving them back; nil when they do not fit.
func (e *Evictor) reserve(size int64) func() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if max := e.opts.MaxSize; max > 0 && e.used.Load()+e.reserved+size > max {
		return nil
	}
	if mf := e.minFree(); mf > 0 {
		// Space a running fill reserved (fallocate) is already gone from
		// free.
		if free, _, err := e.opts.FreeSpace(); err == nil && free-size < mf {
			return nil
		}
	}
	e.reserved += size
	return sync.OnceFunc(func() {
		e.mu.Lock()
		e.reserved -= size
		e.mu.Unlock()
		e.gen.Add(1)
	})
}

// refuse counts a refused blob and warns, at most once a minute.
func (e *Evictor) refuse(d digest.Digest, size int64, passErr error) {
	e.opts.Metrics.CacheFull()
	e.mu.Lock()
	e.refused++
	now := e.opts.Now()
	if now.Sub(e.lastWarning) < time.Minute {
		e.mu.Unlock()
		return
	}
	n := e.refused
	e.refused, e.lastWarning = 0, now
	e.mu.Unlock()
	args := []any{"digest", d, "size", size, "blobs_refused", n, "used", e.used.Load(),
		"max_size", e.opts.MaxSize, "min_free", e.minFree()}
	if passErr != nil {
		args = append(args, "err", passErr)
	}
	e.log.Warn("cache full and nothing evictable (pinned or being served); serving new blobs from the upstream without caching", args...)
}

// SetPinSource registers f under name (replacing an earlier one of that
// name; nil removes it). Each pass calls every source and keeps what they
// pin; a source that fails keeps its previous answer.
func (e *Evictor) SetPinSource(name string, f PinSource) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if f == nil {
		delete(e.sources, name)
		delete(e.lastPins, name)
		return
	}
	e.sources[name] = f
}

// Run keeps the cache within budget until ctx ends: a pass every
// Options.Interval and whenever a commit takes the cache over budget. Seed
// the index first (Seed or SeedObjects).
func (e *Evictor) Run(ctx context.Context) {
	t := time.NewTicker(e.opts.Interval)
	defer t.Stop()
	for {
		if _, err := e.Evict(ctx); err != nil && ctx.Err() == nil {
			e.log.Warn("eviction pass failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-e.kick:
		}
	}
}

// Item is one object an eviction pass removed.
type Item struct {
	Kind   storage.Kind
	Digest digest.Digest
	Size   int64 // bytes
}

// Result is what a pass removed, in the order it removed it.
type Result struct {
	Removed []Item
	Bytes   int64
}

// Evict runs one pass now if the cache is over budget (it does nothing
// otherwise) and returns what it removed. Errors are storage errors
// reading manifests or tag records (the pass then removes nothing, since
// it cannot tell what is pinned) or ctx's.
func (e *Evictor) Evict(ctx context.Context) (Result, error) {
	if !e.opts.Enabled() {
		return Result{}, nil
	}
	return e.pass(ctx, 0)
}

type item struct {
	k    key
	en   *entry
	size int64
	last int64
	eff  int64
	done bool // eff computed
	busy bool // eff being computed (cycle guard)
}

// pass evicts down to the low-water mark when the cache plus extra bytes
// is over budget.
func (e *Evictor) pass(ctx context.Context, extra int64) (Result, error) {
	var res Result
	select {
	case e.passSem <- struct{}{}:
	case <-ctx.Done():
		return res, ctx.Err()
	}
	defer func() { <-e.passSem }()
	e.opts.Metrics.SetBudget(e.opts.MaxSize, e.minFree())
	over, need := e.excess(extra)
	if !over || need <= 0 {
		return res, nil
	}
	start := time.Now()

	// Snapshot the index.
	var items []*item
	byDigest := map[digest.Digest][]*item{}
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.RLock()
		for k, en := range sh.m {
			if en.present {
				it := &item{k: k, en: en, size: en.size, last: en.last.Load()}
				items = append(items, it)
				byDigest[k.d] = append(byDigest[k.d], it)
			}
		}
		sh.mu.RUnlock()
	}
	// What each cached manifest refers to (read once per manifest: they
	// are immutable).
	parents := map[digest.Digest][]*item{}
	for _, it := range items {
		if it.k.kind != kManifest {
			continue
		}
		refs, err := e.refs(ctx, it.k.d, it.en)
		if err != nil {
			return res, err
		}
		for _, r := range refs {
			parents[r] = append(parents[r], it)
		}
	}
	pinned, err := e.pinned(ctx, byDigest)
	if err != nil {
		return res, err
	}
	var eff func(it *item) int64
	eff = func(it *item) int64 {
		if it.done || it.busy {
			return it.eff
		}
		it.busy, it.eff = true, it.last
		for _, p := range parents[it.k.d] {
			it.eff = max(it.eff, eff(p))
		}
		it.busy, it.done = false, true
		return it.eff
	}
	var blobs, manifests []*item
	for _, it := range items {
		eff(it)
		if pinned[it.k.d] {
			continue
		}
		if it.k.kind == kBlob {
			blobs = append(blobs, it)
		} else {
			manifests = append(manifests, it)
		}
	}
	order := func(a, b *item) int {
		if a.eff != b.eff {
			return compare(a.eff, b.eff)
		}
		return strings.Compare(string(a.k.d), string(b.k.d))
	}
	slices.SortFunc(blobs, order)
	slices.SortFunc(manifests, order)
	if extra > 0 {
		// Room for a new blob: not worth emptying the cache for when
		// everything evictable would not make it fit anyway. Then only
		// what the budget itself needs goes.
		var avail int64
		for _, it := range append(blobs, manifests...) {
			avail += it.size
		}
		if avail < need {
			_, need = e.excess(0)
		}
	}
	// Blobs first; manifests (small, and what lets an image come back
	// without the upstream's tag lookup) only when that was not enough.
	for _, it := range append(blobs, manifests...) {
		if need <= 0 || ctx.Err() != nil {
			break
		}
		n, removed := e.evictOne(ctx, it)
		need -= n
		if removed {
			res.Removed = append(res.Removed, Item{Kind: kindName(it.k.kind), Digest: it.k.d, Size: n})
			res.Bytes += n
		}
	}
	if len(res.Removed) > 0 || need > 0 {
		_, stillNeed := e.excess(extra)
		e.log.Info("evicted least recently used content", "objects", len(res.Removed), "bytes", res.Bytes,
			"used", e.used.Load(), "max_size", e.opts.MaxSize, "min_free", e.minFree(),
			"short_by", max(stillNeed, 0), "pinned_digests", len(pinned), "duration", time.Since(start))
	}
	return res, ctx.Err()
}

func compare(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// refs returns the digests manifest d refers to, read once and kept.
func (e *Evictor) refs(ctx context.Context, d digest.Digest, en *entry) ([]digest.Digest, error) {
	if en != nil && en.refsLoaded {
		return en.refs, nil
	}
	m, err := e.store.GetManifest(ctx, d)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		if en != nil {
			e.forget(key{kManifest, d})
		}
		return nil, nil
	case errors.Is(err, storage.ErrDigestMismatch), errors.Is(err, storage.ErrUnsupportedDigest):
		// Damaged: fsck's business. Its references are unknown.
	case err != nil:
		return nil, fmt.Errorf("evict: reading manifest %s: %w", d, err)
	}
	var out []digest.Digest
	if m != nil {
		descs, _ := manifest.References(m.Body)
		for _, r := range descs {
			out = append(out, r.Digest)
		}
	}
	if en != nil {
		en.refs, en.refsLoaded = out, true
	}
	return out, nil
}

// pinned returns the digests pins cover: the pinned manifests, their
// children, and their config and layer blobs.
func (e *Evictor) pinned(ctx context.Context, byDigest map[digest.Digest][]*item) (map[digest.Digest]bool, error) {
	pins := slices.Clone(e.opts.Pins)
	e.mu.Lock()
	sources := make(map[string]PinSource, len(e.sources))
	for n, f := range e.sources {
		sources[n] = f
	}
	e.mu.Unlock()
	for name, f := range sources {
		ps, err := f(ctx)
		e.mu.Lock()
		if err != nil {
			e.log.Warn("pin source failed; keeping what it pinned last", "source", name, "err", err)
			ps = e.lastPins[name]
		} else if _, still := e.sources[name]; still {
			e.lastPins[name] = ps
		}
		e.mu.Unlock()
		pins = append(pins, ps...)
	}
	out := map[digest.Digest]bool{}
	var walk func(d digest.Digest, depth int) error
	walk = func(d digest.Digest, depth int) error {
		if out[d] || depth > 8 {
			return nil
		}
		out[d] = true
		var en *entry
		isManifest := false
		for _, it := range byDigest[d] {
			if it.k.kind == kManifest {
				en, isManifest = it.en, true
			}
		}
		if !isManifest && depth > 0 {
			return nil // a blob (or a child manifest not cached)
		}
		refs, err := e.refs(ctx, d, en)
		if err != nil {
			return err
		}
		for _, r := range refs {
			if err := walk(r, depth+1); err != nil {
				return err
			}
		}
		return nil
	}
	for _, p := range pins {
		d := p.Digest
		if d == "" {
			reg := p.Registry
			if reg == "" {
				reg = e.opts.Registry
			}
			rec, err := e.store.GetTag(ctx, storage.Repo{Registry: reg, Name: p.Repository}, p.Tag)
			if errors.Is(err, storage.ErrNotFound) {
				continue // not cached: nothing to keep
			}
			if err != nil {
				return nil, fmt.Errorf("evict: resolving pin %s: %w", p, err)
			}
			d = rec.Digest
		}
		if err := walk(d, 0); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// evictOne removes one object unless it is leased, and returns the bytes
// that left the index and whether this pass removed them.
func (e *Evictor) evictOne(ctx context.Context, it *item) (int64, bool) {
	sh := e.shard(it.k.d)
	sh.mu.Lock()
	en := it.en
	if sh.m[it.k] != en || !en.present || en.leases > 0 || en.evicting != nil {
		if sh.m[it.k] == en && en.leases > 0 {
			en.skipped = true
		}
		sh.mu.Unlock()
		return 0, false
	}
	ch := make(chan struct{})
	en.evicting = ch
	size := en.size
	sh.mu.Unlock()

	var err error
	if it.k.kind == kBlob {
		_, err = e.store.RemoveBlob(ctx, it.k.d)
	} else {
		_, err = e.store.RemoveManifest(ctx, it.k.d)
	}

	sh.mu.Lock()
	en.evicting = nil
	close(ch)
	sh.dropLocked(it.k, en)
	sh.mu.Unlock()
	switch {
	case err == nil:
		// The store's Removed event took it out of the index.
		e.opts.Metrics.Evicted(string(kindName(it.k.kind)), size)
		e.log.Debug("evicted", "kind", kindName(it.k.kind), "digest", it.k.d, "size", size)
		return size, true
	case errors.Is(err, storage.ErrNotFound):
		e.forget(it.k) // removed by someone else (gc)
		return size, false
	}
	if ctx.Err() == nil {
		e.log.Warn("evicting failed", "kind", kindName(it.k.kind), "digest", it.k.d, "err", err)
	}
	return 0, false
}

// Unlimited is the budget of a cache without one (no cache.max_size or
// cache.min_free): it admits every blob and has nothing to track, lease,
// pin or evict. It offers the Evictor's methods that the fill group, the
// pull-through service and cmd/mirror call.
type Unlimited struct{}

// Admit admits every blob.
func (Unlimited) Admit(context.Context, digest.Digest, int64) (func(), error) { return func() {}, nil }

// Touch does nothing.
func (Unlimited) Touch(storage.Kind, digest.Digest) {}

// Lease does nothing and never fails.
func (Unlimited) Lease(context.Context, digest.Digest) (func(), error) { return func() {}, nil }

// SeedObjects does nothing.
func (Unlimited) SeedObjects([]storage.Object) {}

// SetPinSource does nothing: nothing is evicted.
func (Unlimited) SetPinSource(string, PinSource) {}

// Run returns at once: there are no passes.
func (Unlimited) Run(context.Context) {}
