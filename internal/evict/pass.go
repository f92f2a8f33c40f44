package evict

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/manifest"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// Eviction passes: the effective access time of each object, and removal
// in that order down to the low-water mark.

// Run keeps the cache within budget until ctx ends: a pass every
// Options.Interval and whenever a commit takes the cache over budget. Seed
// the index first (Seed or SeedObjects).
func (e *Evictor) Run(ctx context.Context) {
	if e.sh != nil {
		done := make(chan struct{})
		go func() { defer close(done); e.Share(ctx) }()
		defer func() { <-done }()
	}
	t := time.NewTicker(e.opts.Interval)
	defer t.Stop()
	for {
		var err error
		if e.sh != nil {
			// Room another replica asked for (the leader's pass makes it).
			if w := e.sh.want.Swap(0); w > 0 && e.opts.Enabled() {
				_, err = e.pass(ctx, w)
			} else {
				_, err = e.Evict(ctx)
			}
		} else {
			_, err = e.Evict(ctx)
		}
		if err != nil && ctx.Err() == nil {
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
	eff  int64 // effective access time: its own, or a later one of a manifest referring to it
}

// maxDepth bounds how deep manifests refer to manifests (an index → its
// images is one level) for effective times and pins.
const maxDepth = 8

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
	if e.sh != nil && !e.sh.leader.Load() {
		return res, nil // the shared budget's leader evicts
	}
	over, need := e.excess(extra)
	if !over || need <= 0 {
		return res, nil
	}
	start := time.Now()

	// Snapshot the index: one slice of values and one map from key to
	// position (no allocation per object beyond them).
	n := 0
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.RLock()
		n += len(sh.m)
		sh.mu.RUnlock()
	}
	items := make([]item, 0, n)
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.RLock()
		for k, en := range sh.m {
			if en.present {
				items = append(items, item{k: k, en: en, size: en.size, eff: en.last.Load()})
			}
		}
		sh.mu.RUnlock()
	}
	at := make(map[key]int32, len(items))
	var mans []int32
	for i := range items {
		at[items[i].k] = int32(i)
		if items[i].k.kind == kManifest {
			mans = append(mans, int32(i))
		}
	}
	// What each cached manifest refers to (read once per manifest: they
	// are immutable).
	refs := make([][]digest.Digest, len(mans))
	for j, i := range mans {
		r, err := e.refs(ctx, items[i].k.d, items[i].en)
		if err != nil {
			return res, err
		}
		refs[j] = r
	}
	pinned, err := e.pinned(ctx, func(d digest.Digest) (*entry, bool) {
		if i, ok := at[key{kManifest, d}]; ok {
			return items[i].en, true
		}
		return nil, false
	})
	if err != nil {
		return res, err
	}
	// Effective times flow from a manifest to what it refers to: first
	// among manifests (an index to its images; a few rounds at most),
	// then to blobs.
	for range maxDepth {
		changed := false
		for j, i := range mans {
			for _, r := range refs[j] {
				if c, ok := at[key{kManifest, r}]; ok && items[c].eff < items[i].eff {
					items[c].eff, changed = items[i].eff, true
				}
			}
		}
		if !changed {
			break
		}
	}
	for j, i := range mans {
		for _, r := range refs[j] {
			if b, ok := at[key{kBlob, r}]; ok && items[b].eff < items[i].eff {
				items[b].eff = items[i].eff
			}
		}
	}
	blobs, manifests := ordered(items, pinned)
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
	if e.sh != nil {
		var serr error
		need, serr = e.removeShared(ctx, append(blobs, manifests...), need, &res)
		e.setFull(ctx, need > 0 && len(res.Removed) == 0 && serr == nil)
		if serr != nil && ctx.Err() == nil {
			return res, fmt.Errorf("evict: shared budget: %w", serr)
		}
	} else {
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
	}
	if len(res.Removed) > 0 || need > 0 {
		_, stillNeed := e.excess(extra)
		// used is cached content; reserved the room of fills still
		// running and admitting the blob a fill asks room for (0: a pass
		// for the budget itself): used+reserved+admitting is what the
		// budget holds once they commit.
		e.log.Info("evicted least recently used content", "objects", len(res.Removed), "bytes", res.Bytes,
			"used", e.used.Load(), "reserved", e.Reserved(), "admitting", extra, "max_size", e.opts.MaxSize, "min_free", e.minFree(),
			"short_by", max(stillNeed, 0), "pinned_digests", len(pinned), "duration", time.Since(start))
	}
	return res, ctx.Err()
}

// rank is an item's place in the eviction order: effective time, then
// digest. The sort runs over these compact values rather than over
// pointers into the snapshot: at 200,000 objects a comparison that follows
// two pointers to scattered items and their digest strings costs cache
// misses, and most comparisons are ties on time (the blobs of one image
// share their manifest's time), decided by the digest. w0 and w1 are the
// digest's first 16 bytes, big-endian (zero-padded; digests hold no NUL),
// so comparing them orders as strings.Compare does; the whole digest is
// compared only when they are equal.
type rank struct {
	eff    int64
	w0, w1 uint64
	i      int32 // position in the snapshot
}

func newRank(it *item, i int) rank {
	var b [16]byte
	copy(b[:], it.k.d)
	return rank{eff: it.eff, w0: binary.BigEndian.Uint64(b[:8]), w1: binary.BigEndian.Uint64(b[8:]), i: int32(i)}
}

// ordered returns the unpinned blobs and manifests of the snapshot, each
// oldest effective time first, ties by digest.
func ordered(items []item, pinned map[digest.Digest]bool) (blobs, manifests []*item) {
	var br, mr []rank
	for i := range items {
		it := &items[i]
		if pinned[it.k.d] {
			continue
		}
		if it.k.kind == kBlob {
			br = append(br, newRank(it, i))
		} else {
			mr = append(mr, newRank(it, i))
		}
	}
	order := func(a, b rank) int {
		if c := cmp.Compare(a.eff, b.eff); c != 0 {
			return c
		}
		if c := cmp.Compare(a.w0, b.w0); c != 0 {
			return c
		}
		if c := cmp.Compare(a.w1, b.w1); c != 0 {
			return c
		}
		return strings.Compare(string(items[a.i].k.d), string(items[b.i].k.d))
	}
	slices.SortFunc(br, order)
	slices.SortFunc(mr, order)
	out := func(rs []rank) []*item {
		ps := make([]*item, len(rs))
		for j, r := range rs {
			ps[j] = &items[r.i]
		}
		return ps
	}
	return out(br), out(mr)
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

// evictOne removes one object unless it is leased, and returns the bytes
// that left the index and whether this pass removed them.
// removeTimeout bounds one removal of an evicted object (a DELETE on S3).
const removeTimeout = time.Minute

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

	// The removal runs to its end whatever the pass's context (an
	// admission gives up after Options.AdmitTimeout): a request abandoned
	// half way may still be carried out by the store (an S3 DELETE the
	// server completes after the client hung up), and leases wait on
	// evicting only until it is cleared below. Clearing it while the
	// removal can still land would let a lease be granted on a blob that
	// then disappears under the response.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), removeTimeout)
	var err error
	if it.k.kind == kBlob {
		_, err = e.store.RemoveBlob(rctx, it.k.d)
	} else {
		_, err = e.store.RemoveManifest(rctx, it.k.d)
	}
	cancel()

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
