package evict

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
)

// Admission: whether a blob fits the budget, and making room for it.

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
	used := e.used.Load() + e.reserved + e.othersReserved() + extra
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
// blob is committed or abandoned, or an error wrapping ErrFull when the
// blob cannot be cached: the caller serves it without caching. The room
// counts against the budget until the store's commit event of d
// (storage.Event), which turns it into cached content at once, or until
// release gives it back (a release after the commit does nothing more):
// the blob never counts twice.
func (e *Evictor) Admit(ctx context.Context, d digest.Digest, size int64) (release func(), err error) {
	if !e.opts.Enabled() {
		return func() {}, nil
	}
	if r := e.reserve(d, size); r != nil {
		return r, nil
	}
	if e.opts.MaxSize > 0 && size > e.opts.MaxSize {
		e.refuse(d, size, nil) // would never fit: evict nothing for it
		return nil, fmt.Errorf("%w: blob %s of %d bytes is larger than the budget", ErrFull, d, size)
	}
	if e.sh != nil && !e.sh.leader.Load() {
		// Only the leader evicts: ask it for room and wait.
		r, err := e.admitShared(ctx, d, size)
		if r != nil {
			return r, nil
		}
		if cerr := ctx.Err(); cerr != nil {
			return nil, cerr
		}
		e.refuse(d, size, err)
		return nil, fmt.Errorf("%w (blob %s, %d bytes)", ErrFull, d, size)
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
	if r := e.reserve(d, size); r != nil {
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

// othersReserved returns the bytes other replicas on a shared budget
// admitted and have not committed yet.
func (e *Evictor) othersReserved() int64 {
	if e.sh == nil {
		return 0
	}
	return e.sh.others.Load()
}

// reservation is room Admit gave a fill of blob d: counted in
// Evictor.reserved until the blob's commit or the fill's release.
type reservation struct {
	d    digest.Digest
	size int64 // bytes
	done bool
}

// reserve counts size bytes of blob d as on their way into the cache if
// they fit, and returns the function giving them back; nil when they do
// not fit.
func (e *Evictor) reserve(d digest.Digest, size int64) func() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if max := e.opts.MaxSize; max > 0 && e.used.Load()+e.reserved+e.othersReserved()+size > max {
		return nil
	}
	if mf := e.minFree(); mf > 0 {
		// Space a running fill reserved (fallocate) is already gone from
		// free.
		if free, _, err := e.opts.FreeSpace(); err == nil && free-size < mf {
			return nil
		}
	}
	r := &reservation{d: d, size: size}
	e.reserved += size
	e.fills[d] = append(e.fills[d], r)
	return sync.OnceFunc(func() {
		e.mu.Lock()
		e.settleLocked(r)
		e.mu.Unlock()
		e.gen.Add(1)
	})
}

// settleLocked ends reservation r (no longer counted; later calls do
// nothing). e.mu is held.
func (e *Evictor) settleLocked(r *reservation) {
	if r.done {
		return
	}
	r.done = true
	e.reserved -= r.size
	rs := e.fills[r.d]
	for i, x := range rs {
		if x == r {
			rs = append(rs[:i], rs[i+1:]...)
			break
		}
	}
	if len(rs) == 0 {
		delete(e.fills, r.d)
	} else {
		e.fills[r.d] = rs
	}
}

// committedLocked counts a newly cached object of size bytes and, for a
// blob, ends the oldest reservation of its digest: the same bytes are now
// cached content, so they stop counting as reserved in the same step.
// e.mu is held.
func (e *Evictor) committedLocked(k key, size int64) {
	if k.kind == kBlob {
		if rs := e.fills[k.d]; len(rs) > 0 {
			e.settleLocked(rs[0])
		}
	}
	e.used.Add(size)
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
