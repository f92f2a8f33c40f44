package evict

import (
	"context"
	"hash/maphash"
	"sync"
	"sync/atomic"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/state"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// The in-memory index: every cached object's size, last access and leases
// (see "Access times" in the package doc).

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
	blocked  chan struct{} // non-nil while another replica's pass may remove it (shared budget)
	dirty    atomic.Bool   // used since the last exchange (shared budget)

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
	if !en.present && en.leases == 0 && en.evicting == nil && en.blocked == nil && sh.m[k] == en {
		delete(sh.m, k)
	}
}

// observe follows the store's changes.
func (e *Evictor) observe(ev storage.Event) {
	kind, ok := kindOf(ev.Kind)
	if !ok {
		return
	}
	k := key{kind, ev.Digest}
	e.gen.Add(1)
	c := state.BudgetChange{Op: state.BudgetAdded, Kind: kindByte(kind), Digest: string(ev.Digest), Size: ev.Size, Time: e.now()}
	if ev.Removed {
		if e.sh != nil {
			c.Op = state.BudgetRemoved
			e.sh.enqueue(c)
		}
		e.forget(k)
		return
	}
	sh := e.shard(k.d)
	sh.mu.Lock()
	en := sh.getLocked(k)
	// One step under e.mu: the blob's bytes become used as its fill's
	// reservation ends, and a shared budget's exchange publishes the
	// commit with the reservations that are left (never both, never
	// neither).
	e.mu.Lock()
	if !en.present {
		en.present, en.size = true, ev.Size
		e.committedLocked(k, ev.Size)
	}
	if e.sh != nil {
		e.sh.enqueue(c)
	}
	e.mu.Unlock()
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

// Reserved returns the bytes admitted for fills that have not committed
// yet: this process's, and on a shared budget those the other replicas
// published at the last exchange for blobs the index does not hold yet.
func (e *Evictor) Reserved() int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.reserved + e.othersReserved()
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
		en = sh.getLocked(k)
		en.last.Store(now)
		sh.mu.Unlock()
	}
	if e.sh != nil {
		e.sh.touched(k, en) // published at the next exchange, not now
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
	for en.evicting != nil || en.blocked != nil {
		ch := en.evicting
		if ch == nil {
			ch = en.blocked // another replica is about to remove it
		}
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
