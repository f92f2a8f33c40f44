package evict

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/lease"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
)

// The shared budget: replicas whose caches are one bucket keep one budget
// (see "Shared budget" in the package doc).

// Shared is what a shared budget needs of the state store (*state.Redis):
// the budget's channel and a lock to elect the replica that evicts.
type Shared interface {
	state.BudgetBus
	lease.Locker
}

// Bounds of the shared budget's exchanges.
const (
	maxPending = 200_000 // changes kept for publishing while Redis is unreachable
	maxDoom    = 1000    // objects doomed at once
	pollMax    = 100     // stream entries read per call (each one exchange's batch)
)

type sharing struct {
	bus      Shared
	scope    string
	owner    string
	interval time.Duration
	lockTTL  time.Duration
	doomTTL  time.Duration

	started atomic.Bool  // Share is running
	want    atomic.Int64 // bytes other replicas asked room for (leader)
	leader  atomic.Bool
	others  atomic.Int64 // bytes other replicas reserved, at the last exchange, for blobs not cached yet
	// otherFills is others by blob (guarded by Evictor.mu; written by
	// exchanges only): a commit applied from the stream ends its blob's
	// reservations in the same step as it counts the blob.
	otherFills map[digest.Digest]int64
	full       atomic.Bool // the leader's last pass freed nothing

	mu      sync.Mutex
	pending []state.BudgetChange // own commits and removals to publish
	dropped int                  // changes not kept (maxPending)
	dirty   []key                // touched since the last exchange (entry.dirty set)
	synced  chan struct{}        // closed after each exchange
	mine    map[digest.Digest]bool

	// Guarded by syncMu (one exchange at a time).
	syncMu  sync.Mutex
	cursor  string
	blocked map[key]*entry
	failing bool
	wake    chan struct{}
}

func newSharing(o Options) *sharing {
	owner := o.Owner
	if owner == "" {
		host, _ := os.Hostname()
		var b [4]byte
		_, _ = rand.Read(b[:])
		owner = fmt.Sprintf("%s-%d-%x", host, os.Getpid(), b)
	}
	iv := o.SyncInterval
	if iv <= 0 {
		iv = 2 * time.Second
	}
	ttl := o.LockTTL
	if ttl <= 0 {
		ttl = 15 * time.Second
	}
	return &sharing{bus: o.Shared, scope: o.Scope, owner: owner, interval: iv, lockTTL: ttl,
		doomTTL: 30 * time.Second, synced: make(chan struct{}), mine: map[digest.Digest]bool{}, otherFills: map[digest.Digest]int64{},
		blocked: map[key]*entry{}, wake: make(chan struct{}, 1)}
}

func kindByte(k uint8) byte {
	if k == kManifest {
		return state.BudgetMeta
	}
	return state.BudgetBlob
}

// Leader reports whether this replica evicts for the shared budget (always
// true for a budget of its own).
func (e *Evictor) Leader() bool { return e.sh == nil || e.sh.leader.Load() }

// Owner names this replica on the shared budget ("" when not shared).
func (e *Evictor) Owner() string {
	if e.sh == nil {
		return ""
	}
	return e.sh.owner
}

// enqueue records an own commit or removal for the next exchange.
func (s *sharing) enqueue(c state.BudgetChange) {
	s.mu.Lock()
	if len(s.pending) < maxPending {
		s.pending = append(s.pending, c)
	} else {
		s.dropped++
	}
	s.mu.Unlock()
}

// touched records that en (of k) was used since the last exchange.
func (s *sharing) touched(k key, en *entry) {
	if en.dirty.Swap(true) {
		return
	}
	s.mu.Lock()
	s.dirty = append(s.dirty, k)
	s.mu.Unlock()
}

// applyRemote applies another replica's change to the index.
func (e *Evictor) applyRemote(c state.BudgetChange) {
	d := digest.Digest(c.Digest)
	if d.Validate() != nil {
		return
	}
	kd := kBlob
	if c.Kind == state.BudgetMeta {
		kd = kManifest
	}
	k := key{kd, d}
	switch c.Op {
	case state.BudgetRemoved:
		e.gen.Add(1)
		e.forget(k)
		return
	case state.BudgetAdded, state.BudgetTouched:
	default:
		return
	}
	sh := e.shard(d)
	sh.mu.Lock()
	en := sh.getLocked(k)
	if c.Op == state.BudgetAdded && !en.present {
		en.present, en.size = true, c.Size
		e.mu.Lock()
		e.used.Add(c.Size)
		if n, ok := e.sh.otherFills[d]; ok && kd == kBlob {
			// The fill that reserved it is done: counted once, as cached.
			delete(e.sh.otherFills, d)
			e.sh.others.Add(-n)
		}
		e.mu.Unlock()
	}
	if en.last.Load() < c.Time {
		en.last.Store(c.Time)
	}
	sh.mu.Unlock()
	if c.Op == state.BudgetAdded && e.sh.leader.Load() {
		if over, _ := e.excess(0); over {
			e.kickPass()
		}
	}
}

func (e *Evictor) kickPass() {
	select {
	case e.kick <- struct{}{}:
	default:
	}
}

// Share takes part in the shared budget until ctx ends: it exchanges with
// the other replicas every SyncInterval (their changes into the index,
// this replica's out, doomed blobs blocked or vetoed) and runs for the
// leader's lock. It does nothing without Options.Shared, or when already
// running. Start it before the cache serves, ahead of Seed: until its
// first exchange, the leader does not know this replica and its responses
// are not protected. Run starts it if it is not running.
func (e *Evictor) Share(ctx context.Context) {
	if e.sh == nil || !e.sh.started.CompareAndSwap(false, true) {
		return
	}
	e.runShared(ctx)
}

// runShared exchanges with the other replicas every SyncInterval and
// elects the leader, until ctx ends.
func (e *Evictor) runShared(ctx context.Context) {
	s := e.sh
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(s.lockTTL / 3)
		defer t.Stop()
		for {
			lctx, cancel := context.WithTimeout(ctx, s.lockTTL/3)
			ok, err := s.bus.Lock(lctx, "budget:"+s.scope, s.owner, s.lockTTL)
			cancel()
			lead := ok && err == nil
			if was := s.leader.Swap(lead); was != lead {
				if lead {
					e.log.Info("leading the shared cache budget: this replica evicts for all replicas on the bucket", "owner", s.owner)
					e.kickPass()
				} else {
					e.log.Info("no longer leading the shared cache budget", "owner", s.owner, "err", err)
				}
			}
			select {
			case <-ctx.Done():
				uctx, cancel := context.WithTimeout(context.Background(), time.Second)
				_ = s.bus.Unlock(uctx, "budget:"+s.scope, s.owner)
				cancel()
				s.leader.Store(false)
				return
			case <-t.C:
			}
		}
	}()
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		xctx, cancel := context.WithTimeout(ctx, s.interval+5*time.Second)
		err := e.exchange(xctx)
		cancel()
		switch {
		case err != nil && ctx.Err() == nil && !s.failing:
			s.failing = true
			e.log.Warn("shared cache budget: state store unreachable; nothing is evicted and access times are kept here until it answers", "err", err)
		case err == nil && s.failing:
			s.failing = false
			e.log.Info("shared cache budget: state store reachable again")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.wake:
		}
	}
}

// exchange reads what the other replicas published, acts on the doom set,
// and publishes this replica's changes and presence.
func (e *Evictor) exchange(ctx context.Context) error {
	s := e.sh
	s.syncMu.Lock()
	defer s.syncMu.Unlock()
	defer func() {
		s.mu.Lock()
		close(s.synced)
		s.synced = make(chan struct{})
		s.mu.Unlock()
	}()
	lead := s.leader.Load()
	var v state.BudgetView
	for {
		var err error
		v, err = s.bus.BudgetPoll(ctx, s.scope, s.owner, s.cursor, pollMax, lead)
		if err != nil {
			return err
		}
		for _, c := range v.Changes {
			e.applyRemote(c)
		}
		s.cursor = v.Cursor
		if !v.More {
			break
		}
	}
	vetoes := e.block(v.Doomed)
	e.countOthers(v.Replicas)
	s.full.Store(v.Full && !lead)
	if v.Kicked > 0 && lead {
		for {
			w := s.want.Load()
			if v.Kicked <= w || s.want.CompareAndSwap(w, v.Kicked) {
				break
			}
		}
		e.kickPass()
	}

	// Own commits and reservations in one step (a commit ends its
	// reservation under e.mu, see observe): the others see a blob either
	// reserved or committed, never both nor neither.
	e.mu.Lock()
	s.mu.Lock()
	changes := s.pending
	s.pending = nil
	dirty := s.dirty
	s.dirty = nil
	dropped := s.dropped
	s.dropped = 0
	s.mu.Unlock()
	reserved := e.reserved
	fills := make(map[string]int64, len(e.fills))
	for d, rs := range e.fills {
		for _, r := range rs {
			fills[string(d)] += r.size
		}
	}
	e.mu.Unlock()
	if dropped > 0 {
		e.log.Warn("shared cache budget: changes not published (the state store was unreachable too long); other replicas learn of them at their next start", "changes", dropped)
	}
	nOwn := len(changes)
	for _, k := range dirty {
		sh := e.shard(k.d)
		sh.mu.RLock()
		en := sh.m[k]
		sh.mu.RUnlock()
		if en == nil {
			continue
		}
		en.dirty.Store(false)
		changes = append(changes, state.BudgetChange{Op: state.BudgetTouched, Kind: kindByte(k.kind), Digest: string(k.d), Time: en.last.Load()})
	}
	err := s.bus.BudgetPublish(ctx, s.scope, state.BudgetReplica{Owner: s.owner, Seen: v.Gen, Leases: vetoes, Reserved: reserved, Fills: fills},
		changes, 3*s.interval)
	if err != nil {
		// Commits and removals are published later; access times are
		// still in the index (and published with the next use).
		s.mu.Lock()
		s.pending = append(changes[:nOwn:nOwn], s.pending...)
		s.mu.Unlock()
	}
	return err
}

// countOthers sets the bytes the other live replicas reserved for fills
// of blobs the index does not hold yet (a blob whose commit this exchange
// applied is counted as cached, not again as reserved).
func (e *Evictor) countOthers(rs []state.BudgetReplica) {
	s := e.sh
	var total int64
	fills := map[digest.Digest]int64{}
	for _, r := range rs {
		if r.Owner == s.owner {
			continue
		}
		if r.Fills == nil {
			total += r.Reserved
			continue
		}
		for ds, n := range r.Fills {
			d := digest.Digest(ds)
			if d.Validate() != nil {
				continue
			}
			sh := e.shard(d)
			sh.mu.RLock()
			en := sh.m[key{kBlob, d}]
			cached := en != nil && en.present
			sh.mu.RUnlock()
			if !cached {
				fills[d] += n
				total += n
			}
		}
	}
	e.mu.Lock()
	s.otherFills = fills
	s.others.Store(total)
	e.mu.Unlock()
}

// block stops new leases on the doomed blobs that this replica is not
// serving (it waits until they leave the doom set) and returns those it
// is serving: the leader must not remove them. Blobs no longer doomed are
// released.
func (e *Evictor) block(doomed []string) (vetoes []string) {
	s := e.sh
	s.mu.Lock()
	mine := make(map[digest.Digest]bool, len(s.mine))
	for d := range s.mine {
		mine[d] = true
	}
	s.mu.Unlock()
	now := make(map[key]bool, len(doomed))
	for _, ds := range doomed {
		d := digest.Digest(ds)
		if mine[d] || d.Validate() != nil {
			continue // this replica's own doom: its passes check leases themselves
		}
		k := key{kBlob, d}
		now[k] = true
		sh := e.shard(d)
		sh.mu.Lock()
		en := sh.getLocked(k)
		switch {
		case en.leases > 0:
			vetoes = append(vetoes, ds)
		case en.blocked == nil:
			en.blocked = make(chan struct{})
			s.blocked[k] = en
		}
		sh.mu.Unlock()
	}
	for k, en := range s.blocked {
		if now[k] {
			continue
		}
		sh := e.shard(k.d)
		sh.mu.Lock()
		close(en.blocked)
		en.blocked = nil
		sh.dropLocked(k, en)
		sh.mu.Unlock()
		delete(s.blocked, k)
	}
	return vetoes
}

// errUnconfirmed: a live replica did not confirm a doom in time.
var errUnconfirmed = errors.New("evict: a replica did not confirm the objects to evict in time")

// awaitVetoes waits until every other live replica has seen doom
// generation gen and returns the digests they are serving.
func (e *Evictor) awaitVetoes(ctx context.Context, gen int64) (map[digest.Digest]bool, error) {
	s := e.sh
	deadline := time.Now().Add(3*s.interval + 2*time.Second)
	for {
		rs, err := s.bus.BudgetReplicas(ctx, s.scope)
		if err != nil {
			return nil, err
		}
		vetoes := map[digest.Digest]bool{}
		var waiting []string
		for _, r := range rs {
			if r.Owner == s.owner {
				continue
			}
			if r.Seen < gen {
				waiting = append(waiting, r.Owner)
				continue
			}
			for _, d := range r.Leases {
				vetoes[digest.Digest(d)] = true
			}
		}
		if len(waiting) == 0 {
			return vetoes, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%w: %v", errUnconfirmed, waiting)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(s.interval / 4):
		}
	}
}

// removeShared removes cands in order until need bytes are freed, in
// batches that every other replica first confirms (see BudgetBus): a blob
// another replica is serving stays.
func (e *Evictor) removeShared(ctx context.Context, cands []*item, need int64, res *Result) (int64, error) {
	s := e.sh
	i := 0
	for need > 0 && i < len(cands) && ctx.Err() == nil {
		var batch []*item
		var sum int64
		for ; i < len(cands) && sum < need && len(batch) < maxDoom; i++ {
			batch = append(batch, cands[i])
			sum += cands[i].size
		}
		ds := make([]string, 0, len(batch))
		s.mu.Lock()
		for _, it := range batch {
			if !s.mine[it.k.d] {
				s.mine[it.k.d] = true
				ds = append(ds, string(it.k.d))
			}
		}
		s.mu.Unlock()
		release := func() {
			uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			_ = s.bus.BudgetUndoom(uctx, s.scope, ds)
			cancel()
			s.mu.Lock()
			for _, d := range ds {
				delete(s.mine, digest.Digest(d))
			}
			s.mu.Unlock()
		}
		gen, err := s.bus.BudgetDoom(ctx, s.scope, ds, s.doomTTL)
		if err != nil {
			release()
			return need, err
		}
		vetoes, err := e.awaitVetoes(ctx, gen)
		if err != nil {
			release()
			return need, err
		}
		renewed := time.Now()
		for _, it := range batch {
			if need <= 0 || ctx.Err() != nil {
				break
			}
			if vetoes[it.k.d] {
				e.gen.Add(1) // served elsewhere: its end can make room
				continue
			}
			if time.Since(renewed) > s.doomTTL/4 {
				// Renew while removing: the others keep their leases
				// blocked only while the doom set lives (a leader that
				// dies leaves it to expire).
				if _, err := s.bus.BudgetDoom(ctx, s.scope, nil, s.doomTTL); err != nil {
					break // the others may unblock soon: stop removing
				}
				renewed = time.Now()
			}
			freed, removed := e.evictOne(ctx, it)
			need -= freed
			if removed {
				res.Removed = append(res.Removed, Item{Kind: kindName(it.k.kind), Digest: it.k.d, Size: freed})
				res.Bytes += freed
			}
		}
		release()
	}
	if len(res.Removed) > 0 {
		s.kickSync() // tell the others soon
	}
	return need, ctx.Err()
}

func (s *sharing) kickSync() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// admitShared waits for the leader to make room for size bytes (this
// replica does not lead, so it does not evict), at most AdmitTimeout.
func (e *Evictor) admitShared(ctx context.Context, d digest.Digest, size int64) (func(), error) {
	s := e.sh
	if s.full.Load() {
		return nil, nil
	}
	kctx, cancel := context.WithTimeout(ctx, time.Second)
	err := s.bus.BudgetKick(kctx, s.scope, size, 2*e.opts.Interval)
	cancel()
	if err != nil {
		return nil, err
	}
	t := time.NewTimer(e.opts.AdmitTimeout)
	defer t.Stop()
	for {
		s.mu.Lock()
		ch := s.synced
		s.mu.Unlock()
		select {
		case <-ch:
		case <-t.C:
			return nil, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if r := e.reserve(d, size); r != nil {
			return r, nil
		}
		if s.full.Load() || s.leader.Load() {
			return nil, nil
		}
	}
}

// setFull tells the other replicas whether the leader's pass could free
// nothing (they then refuse new blobs at once instead of waiting).
func (e *Evictor) setFull(ctx context.Context, full bool) {
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	defer cancel()
	_ = e.sh.bus.BudgetSetFull(fctx, e.sh.scope, full, e.opts.Interval+e.sh.interval)
}
