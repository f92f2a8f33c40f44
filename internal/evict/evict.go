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
// so that it does not run on every commit. Usage counts cached content
// plus the room admitted to fills still running (Admit); a fill's commit
// turns its room into cached content in one step, so a new blob never
// counts twice. When nothing more can be evicted
// Admit refuses the blob with ErrFull: the fill then serves it straight
// from the upstream without caching it (internal/fill, internal/proxy).
//
// Without Options.Shared the index is this process's view. Content
// another process adds to a shared bucket is not counted until the next
// start; content it removes is forgotten when eviction finds it gone.
//
// # Shared budget
//
// Replicas whose caches are one bucket and that share Redis
// (Options.Shared, *state.Redis; cmd/mirror turns it on for storage.driver
// s3 with state.redis_url) keep one budget for the bucket:
//
//   - Every replica's index holds the whole bucket: seeded from a listing
//     at start, then kept current by the changes the others publish
//     (commits, removals and access times; state.BudgetBus). A replica
//     publishes in batches, every SyncInterval (2 s), never on a request:
//     Touch only marks the entry. Bytes other replicas admitted for fills
//     still running count against the budget too.
//   - One replica, the holder of the "budget:<scope>" lock in the state
//     store, runs the passes for all. The others never evict: when a blob
//     does not fit, Admit asks the leader for a pass and waits for the
//     room (AdmitTimeout), and refuses at once while the leader's last
//     pass found nothing to evict.
//   - A pass never removes a blob another replica is serving. The leader
//     first dooms a batch of candidates in Redis; at its next exchange
//     every live replica stops granting leases on the doomed blobs it is
//     not serving (a new request waits until the batch is done, then
//     misses) and reports those it is serving. Once every live replica
//     has answered, the leader removes the rest. A blob being filled is
//     not in the cache yet, so it cannot be removed.
//
// Share runs the exchanges and the election; start it with serving,
// before the listing that seeds the index.
//
// Pins are the leader's (cache.pin and its prefetch rules): give every
// replica the same configuration. While Redis is unreachable, nothing is
// evicted (a leader cannot learn what the others serve), a replica's
// changes wait to be published, and a replica that cannot answer is not
// waited for once its presence expires (3 × SyncInterval): its clients
// reading a blob the leader then removes are cut off (never wrong bytes).
package evict

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// ErrFull is returned by Admit when a blob does not fit the budget and
// nothing evictable is left (everything is pinned or being served).
var ErrFull = errors.New("evict: the cache is full and nothing can be evicted")

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

	// Shared makes this budget one with the other replicas whose caches
	// are the same bucket (see "Shared budget"); nil: this process's
	// alone. Scope names the bucket (and prefix) on Shared; Owner this
	// replica (default host-pid-random).
	Shared Shared
	Scope  string
	Owner  string
	// SyncInterval is how often a shared budget exchanges changes,
	// access times and presence (default 2 s): other replicas count a
	// commit, and see a use, within about that long.
	SyncInterval time.Duration
	// LockTTL is the expiry of the shared budget's leader lock (default
	// 15 s): a leader that dies is replaced within it.
	LockTTL time.Duration
}

// Enabled reports whether o sets a budget at all.
func (o Options) Enabled() bool {
	return o.MaxSize > 0 || o.MinFree > 0 || o.MinFreePercent > 0
}

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
	reserved    int64                            // bytes admitted but not committed yet
	fills       map[digest.Digest][]*reservation // the reservations making up reserved, by blob
	sources     map[string]PinSource
	lastPins    map[string][]Pin // each source's last good answer
	refused     int              // refusals since the last warning
	lastWarning time.Time

	passSem chan struct{} // one pass at a time
	kick    chan struct{}

	sh *sharing // nil: a budget of this process alone
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
		fills:    map[digest.Digest][]*reservation{},
		lastPins: map[string][]Pin{},
		passSem:  make(chan struct{}, 1),
		kick:     make(chan struct{}, 1),
	}
	for i := range e.shards {
		e.shards[i].m = map[key]*entry{}
	}
	if opts.Shared != nil {
		e.sh = newSharing(opts)
	}
	e.fruitless.Store(^uint64(0))
	e.opts.Metrics.SetBudget(opts.MaxSize, e.minFree())
	store.Notify(e.observe)
	return e
}

func (e *Evictor) now() int64 { return e.opts.Now().UnixNano() }
