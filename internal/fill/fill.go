// Package fill coordinates blob cache fills: one upstream fetch per digest,
// however many clients ask and whenever they join, streamed to all of them
// while it is written to the cache.
//
// A fill writes the upstream bytes to a spool and publishes how many bytes
// it holds; each client reads the spool up to that offset and waits for
// more, so a late joiner or a Range reader starts at once from what is
// there. The bytes also go to a storage.BlobWriter, which verifies size and
// digest and only then makes the blob visible. On a local cache the upload
// file is the spool (each byte written once); otherwise the spool is an
// anonymous (already unlinked) local file. Each byte is hashed once, on a
// goroutine of its own behind the spool writes (see pipe), and the last
// byte is held back from clients until the digest is verified. The fill
// runs on its own context, bounded by an idle-read timeout rather than a total deadline, so a client disconnect does not
// abort it and a multi-gigabyte layer on a slow link can finish.
package fill

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// ErrIdle is the cause of a fill cancelled because the upstream sent nothing
// for the idle timeout.
var ErrIdle = errors.New("fill: upstream idle timeout")

// ErrUnknownSize is returned when the source could not tell the blob size.
var ErrUnknownSize = errors.New("fill: upstream did not give the blob size")

// ErrNoClients is the cause of a fill cancelled because its last client left
// (only with Options.StopWithoutClients).
var ErrNoClients = errors.New("fill: every client left")

// ErrTooManyFills is returned by Join when Options.MaxFills fills run
// already, or Options.MaxFillsPer[key] of the key asked, and none of them
// is for the digest asked. The error Join returns is a *LimitError naming
// the bound; it unwraps to ErrTooManyFills.
var ErrTooManyFills = errors.New("fill: too many downloads in progress")

// LimitError is ErrTooManyFills naming the bound that refused a new fill:
// Key is the key of Options.MaxFillsPer whose bound was reached, or ""
// for Options.MaxFills, the bound of all fills together.
type LimitError struct {
	Key string
}

func (e *LimitError) Error() string {
	if e.Key == "" {
		return ErrTooManyFills.Error()
	}
	return ErrTooManyFills.Error() + " (" + e.Key + ")"
}

// Unwrap makes a LimitError ErrTooManyFills.
func (e *LimitError) Unwrap() error { return ErrTooManyFills }

// ErrSpool wraps a failure to create or write a fill's spool file: the
// local disk, not the upstream, is at fault.
var ErrSpool = errors.New("fill: spool")

// ErrCacheFull is returned by Wait when Options.Budget refused the blob:
// the cache is at its budget and nothing could be evicted. Nothing is
// cached; the caller serves the client straight from the upstream.
var ErrCacheFull = errors.New("fill: cache budget full")

// ErrCached is returned by a Source on its first call (offset 0) when it
// finds the blob committed to the cache since the miss (by another replica
// sharing the cache): the fill looks it up again and its clients read it
// from the cache (Fill.Cached), nothing is fetched.
var ErrCached = errors.New("fill: blob committed to the cache meanwhile")

// Relay is called by a Source, with the context the fill passed it, when
// the body it returns comes from another replica that caches the blob
// itself (the blob's owner, on a cache the replicas share). The fill then
// keeps the bytes in a local spool only, streaming and verifying them as
// usual (nothing is written to the cache while they arrive), and once the
// blob is verified calls committed, which waits for the owner's commit and
// reports whether it succeeded. The fill commits the blob from its spool
// only when the last body came from a source that did not call Relay (a
// takeover from the upstream), committed reports false, or the cache does
// not hold the blob after all (replicas with caches of their own): a
// shared bucket receives each blob's bytes once.
func Relay(ctx context.Context, committed func(ctx context.Context) bool) {
	if st, ok := ctx.Value(relayKey{}).(*relayState); ok {
		st.committed = committed
	}
}

type relayKey struct{}

// relayState is what one Source call said through Relay.
type relayState struct{ committed func(context.Context) bool }

// call calls src with the offset, noting what it says through Relay.
func call(ctx context.Context, src Source, off int64) (io.ReadCloser, int64, *relayState, error) {
	st := &relayState{}
	body, size, err := src(context.WithValue(ctx, relayKey{}, st), off)
	return body, size, st, err
}

// Budget decides whether a blob may be cached (internal/evict.Evictor).
type Budget interface {
	// Admit reserves room for a blob of size bytes before it is written.
	// release is called once the blob is committed or abandoned. An error
	// means the blob is not to be cached.
	Admit(ctx context.Context, dgst digest.Digest, size int64) (release func(), err error)
}

// Source opens the upstream body of one blob from byte offset on. size is the
// full blob size in bytes (not the remaining length); it must not be
// negative. A Source is called again with the offset reached when the
// connection breaks, so it must fetch afresh (new token, new redirect).
type Source func(ctx context.Context, offset int64) (body io.ReadCloser, size int64, err error)

// Options tune a Group. Zero values take the defaults noted.
type Options struct {
	// SpoolDir holds the fills' spool files (default os.TempDir()). Put it on
	// a disk, not a tmpfs: a spool is as large as the blob.
	SpoolDir string
	// IdleTimeout aborts a fill when the upstream sends nothing for this
	// long (default 60 s).
	IdleTimeout time.Duration
	// MaxResumes bounds how often a broken upstream read is resumed with a
	// Range request from the offset reached (default 3).
	MaxResumes int
	// MaxFills bounds the fills running at once, all keys together (0: no
	// bound). A miss that would start one more gets ErrTooManyFills.
	MaxFills int
	// MaxFillsPer bounds the fills running at once per key (the key a
	// caller passes to Join: the upstream's registry name, "docker.io"),
	// beside MaxFills, so that one upstream's slow misses cannot take
	// every slot from the others. A key that is absent, "" or bound by 0
	// or less has MaxFills only. A miss beyond its key's bound gets
	// ErrTooManyFills (a *LimitError naming the key); that bound is
	// checked before MaxFills.
	MaxFillsPer map[string]int
	// StopWithoutClients cancels a fill when its last client leaves. By
	// default a fill outlives its clients and the blob is cached anyway.
	StopWithoutClients bool
	// Budget, when set, is asked for room once the blob size is known and
	// before anything is written; a refusal ends the fill with ErrCacheFull.
	Budget  Budget
	Log     *slog.Logger
	Metrics *metrics.Metrics // nil records nothing
}

// Store is what fills need of the cache (*storage.Store): whether a blob
// is there, and an upload that verifies and commits it.
type Store interface {
	StatBlob(ctx context.Context, dgst digest.Digest) (int64, error)
	CreateBlob(ctx context.Context, dgst digest.Digest, size int64) (*storage.BlobWriter, error)
}

// Group runs at most one fill per digest. It is safe for concurrent use.
type Group struct {
	store Store
	opts  Options

	mu    sync.Mutex
	fills map[digest.Digest]*Fill
	// perKey counts the fills in fills by the key they were started
	// with, for Options.MaxFillsPer (keys with a bound only).
	perKey map[string]int
	// commits counts the fills committed; recent holds the digests of the
	// last len(recent) of them (commit number i at recent[i%len]), so
	// JoinMissed can tell whether dgst was committed since a lookup.
	commits uint64
	recent  [64]digest.Digest

	bufs sync.Pool // the fills' pipe buffers (*[]byte of chunkSize bytes)
}

// Seq returns the number of fills committed so far: take it before a
// cache lookup that misses, and pass it to JoinMissed.
func (g *Group) Seq() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.commits
}

// committedSince reports whether a fill of dgst may have committed after
// Seq returned seq. g.mu is held.
func (g *Group) committedSince(dgst digest.Digest, seq uint64) bool {
	if g.commits-seq > uint64(len(g.recent)) {
		return true // too many since: the ring no longer tells
	}
	for i := seq; i < g.commits; i++ {
		if g.recent[i%uint64(len(g.recent))] == dgst {
			return true
		}
	}
	return false
}

func (g *Group) committed(dgst digest.Digest) {
	g.mu.Lock()
	g.recent[g.commits%uint64(len(g.recent))] = dgst
	g.commits++
	g.mu.Unlock()
}

// NewGroup returns a Group that commits fills to store.
func NewGroup(store Store, opts Options) *Group {
	if opts.SpoolDir == "" {
		opts.SpoolDir = os.TempDir()
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = 60 * time.Second
	}
	if opts.MaxResumes < 0 {
		opts.MaxResumes = 0
	} else if opts.MaxResumes == 0 {
		opts.MaxResumes = 3
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	g := &Group{store: store, opts: opts, fills: map[digest.Digest]*Fill{}, perKey: map[string]int{}}
	g.bufs.New = func() any { b := make([]byte, chunkSize); return &b }
	return g
}

// InFlight returns the number of fills running now.
func (g *Group) InFlight() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.fills)
}

// Size returns the blob size of a running fill of dgst whose size is
// known, so that a HEAD needs no upstream request while the blob is being
// fetched (or committed).
func (g *Group) Size(dgst digest.Digest) (int64, bool) {
	g.mu.Lock()
	f := g.fills[dgst]
	g.mu.Unlock()
	if f == nil {
		return 0, false
	}
	select {
	case <-f.ready:
	default:
		return 0, false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil || (f.spool == nil && !f.cached) {
		return 0, false
	}
	return f.size, true
}

// Join returns the running fill of dgst, or starts one that reads from src
// and counts against the bound of key (Options.MaxFillsPer: the upstream
// src fetches from; "" for none). The caller must call Release on the fill
// when done with it. started reports whether this call started the fill.
// A running fill is joined whatever the bounds; a new one that would
// exceed key's bound or Options.MaxFills is refused with a *LimitError
// naming it (ErrTooManyFills).
func (g *Group) Join(key string, dgst digest.Digest, src Source) (f *Fill, started bool, err error) {
	return g.join(key, dgst, src, true)
}

// JoinMissed is Join for a caller whose cache lookup of dgst, started
// after Seq returned seq, found it not cached (storage.ErrNotFound). A new
// fill then skips its own lookup (one existence check, a HEAD on S3,
// fewer) unless a fill of dgst committed since seq, in which case it looks
// again as Join does.
func (g *Group) JoinMissed(key string, dgst digest.Digest, seq uint64, src Source) (f *Fill, started bool, err error) {
	g.mu.Lock()
	check := g.committedSince(dgst, seq)
	g.mu.Unlock()
	return g.join(key, dgst, src, check)
}

func (g *Group) join(key string, dgst digest.Digest, src Source, check bool) (f *Fill, started bool, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if f := g.fills[dgst]; f != nil {
		f.refs++
		g.opts.Metrics.FillJoined()
		return f, false, nil
	}
	limit := 0 // key's bound; 0: none
	if key != "" {
		limit = g.opts.MaxFillsPer[key]
	}
	if limit > 0 && g.perKey[key] >= limit {
		return nil, false, &LimitError{Key: key}
	}
	if g.opts.MaxFills > 0 && len(g.fills) >= g.opts.MaxFills {
		return nil, false, &LimitError{}
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	f = &Fill{
		g:      g,
		dgst:   dgst,
		ready:  make(chan struct{}),
		wake:   make(chan struct{}),
		refs:   2, // the runner and the caller
		cancel: cancel,
		check:  check,
	}
	g.fills[dgst] = f
	if limit > 0 {
		f.key = key
		g.perKey[key]++
	}
	g.opts.Metrics.FillStarted()
	go f.run(ctx, src)
	return f, true, nil
}

// Running returns the running fill of dgst, joined (Release it when done),
// or nil when none runs. It never starts one: a peer replica's request is
// served from a fill this replica runs, never forwarded on.
func (g *Group) Running(dgst digest.Digest) *Fill {
	g.mu.Lock()
	defer g.mu.Unlock()
	f := g.fills[dgst]
	if f != nil {
		f.refs++
		g.opts.Metrics.FillJoined()
	}
	return f
}

// Wait blocks until no fill runs or ctx ends (graceful shutdown: fills in
// progress complete; what a cut-off one wrote is removed at the next start).
func (g *Group) Wait(ctx context.Context) error {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for g.InFlight() > 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// unlist removes f from the running fills, if it is still listed, and
// gives back its slot of Options.MaxFillsPer. g.mu is held.
func (g *Group) unlist(f *Fill) {
	if g.fills[f.dgst] != f {
		return
	}
	delete(g.fills, f.dgst)
	if f.key != "" {
		if g.perKey[f.key]--; g.perKey[f.key] <= 0 {
			delete(g.perKey, f.key)
		}
	}
}

// Fill is one blob being fetched and cached.
type Fill struct {
	g     *Group
	dgst  digest.Digest
	key   string        // the bound of Options.MaxFillsPer it counts against; "": none
	ready chan struct{} // closed when size is known or the fill failed

	check bool // look the blob up before fetching it (see JoinMissed)

	// Set before ready is closed, read-only after.
	size   int64
	cached bool // the blob was already cached: read it from the store
	spool  *os.File
	known  bool // the blob is not cached: see storage.BlobWriter.KnownNew

	mu       sync.Mutex
	written  int64         // bytes in the spool, readable
	err      error         // why the fill failed, once it has
	verified bool          // every byte is in and matches the digest: release the last one
	done     bool          // ended well (committed, or verified but refused by the cache)
	inCache  bool          // committed by this fill
	wake     chan struct{} // closed and replaced whenever the state changes
	refs     int           // guarded by g.mu
	cancel   context.CancelCauseFunc
}

// Wait blocks until the blob size is known. It returns the size in bytes, or
// the error that ended the fill before that, or ctx's error.
func (f *Fill) Wait(ctx context.Context) (int64, error) {
	select {
	case <-f.ready:
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.spool == nil && !f.cached {
		return 0, f.err
	}
	return f.size, nil
}

// Cached reports whether the blob turned out to be in the cache already, in
// which case the caller reads it from the store. Valid after Wait.
func (f *Fill) Cached() bool { return f.cached }

// Done blocks until the fill ends. It returns nil when the fill ended well:
// the blob was committed, or was verified and served but the cache refused
// it (counted by the metrics); otherwise why the fill failed.
func (f *Fill) Done(ctx context.Context) error {
	// The cached path ends with finish(nil) too.
	return f.await(ctx, func() bool { return f.done })
}

// await blocks until reached (called with f.mu held) is true (nil), the
// fill failed before that (its error), or ctx ends (ctx's error).
func (f *Fill) await(ctx context.Context, reached func() bool) error {
	for {
		f.mu.Lock()
		ok, err, wake := reached(), f.err, f.wake
		f.mu.Unlock()
		if ok {
			return nil
		}
		if err != nil {
			return err
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Verified blocks until every byte of the blob is in and matches its
// digest (nil), the fill failed before that (its error), or ctx ends
// (ctx's error). A caller answering a small blob waits for it before it
// sends a status, so that a mismatch becomes an error status rather than a
// cut-off 200. Call after Wait succeeded.
func (f *Fill) Verified(ctx context.Context) error {
	if f.cached {
		return nil
	}
	return f.await(ctx, func() bool { return f.verified })
}

// Committed reports whether the fill put the blob in the cache (or found it
// there: Cached). Valid after Done returned nil.
func (f *Fill) Committed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.inCache || f.cached
}

// Release drops the caller's reference; the spool file closes with the last.
func (f *Fill) Release() {
	f.mu.Lock()
	verified := f.verified
	f.mu.Unlock()
	f.g.mu.Lock()
	f.refs--
	refs := f.refs
	// Once verified there is nothing left to save by stopping: let the
	// commit finish and the blob be cached.
	stop := refs == 1 && f.g.opts.StopWithoutClients && !verified
	if stop {
		// Only the runner is left. Unlist the fill before cancelling it, so
		// that a client arriving now starts a new one instead of joining
		// one that is about to fail.
		f.g.unlist(f)
	}
	f.g.mu.Unlock()
	if stop {
		f.cancel(ErrNoClients) // a no-op once the fill has ended
	}
	if refs == 0 {
		f.mu.Lock()
		spool := f.spool
		f.mu.Unlock()
		if spool != nil {
			_ = spool.Close()
		}
	}
}

// NewReader reads bytes [off, end) of the blob as the fill makes them
// available. The blob's last byte is only released once the fill has
// verified size and digest of the whole blob. Read returns the fill's error
// if it fails before end, so a caller streaming to a client can abort the
// connection rather than end a short body cleanly. Call after Wait
// succeeded and Cached is false.
func (f *Fill) NewReader(ctx context.Context, off, end int64) io.Reader {
	return &reader{f: f, ctx: ctx, off: off, end: end}
}

type reader struct {
	f        *Fill
	ctx      context.Context
	off, end int64
}

// available waits until bytes past r.off are readable and returns the end
// of what is (at most r.end), or the fill's error, or ctx's.
func (r *reader) available() (int64, error) {
	for {
		r.f.mu.Lock()
		written, verified, err, wake := r.f.written, r.f.verified, r.f.err, r.f.wake
		r.f.mu.Unlock()
		if !verified && written == r.f.size && written > 0 {
			// Hold the last byte back until size and digest are verified,
			// so no client ever receives a complete but corrupt blob.
			written--
		}
		if r.off < written {
			return min(written, r.end), nil
		}
		if err != nil {
			return 0, err
		}
		select {
		case <-wake:
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
	}
}

// atEnd returns io.EOF once the reader is done, but for an empty blob
// only after the fill verified it: there is no last byte to hold back.
func (r *reader) atEnd() error {
	if r.f.size == 0 {
		for {
			r.f.mu.Lock()
			verified, err, wake := r.f.verified, r.f.err, r.f.wake
			r.f.mu.Unlock()
			if verified {
				break
			}
			if err != nil {
				return err
			}
			select {
			case <-wake:
			case <-r.ctx.Done():
				return r.ctx.Err()
			}
		}
	}
	return io.EOF
}

func (r *reader) Read(p []byte) (int, error) {
	if r.off >= r.end {
		return 0, r.atEnd()
	}
	upto, err := r.available()
	if err != nil {
		return 0, err
	}
	n := min(int64(len(p)), upto-r.off)
	m, rerr := r.f.spool.ReadAt(p[:n], r.off)
	r.off += int64(m)
	if m > 0 {
		return m, nil
	}
	return 0, fmt.Errorf("fill: reading spool: %w", rerr)
}

// WriteTo sends the reader's bytes to w as they become available. Each
// stretch goes through its own file handle on the spool as an
// io.LimitedReader of an *os.File, so that a network connection takes it
// with sendfile(2) instead of copying through user space (io.Copy uses
// WriteTo). Where that handle cannot be had it falls back to Read.
func (r *reader) WriteTo(w io.Writer) (int64, error) {
	// Linux: a new handle on the same open file, renamed or unlinked alike.
	fh, err := os.Open(fmt.Sprintf("/proc/self/fd/%d", r.f.spool.Fd()))
	if err != nil {
		return io.Copy(w, struct{ io.Reader }{r})
	}
	defer fh.Close()
	var total int64
	if r.off >= r.end {
		if err := r.atEnd(); err != io.EOF {
			return 0, err
		}
	}
	// fh is this reader's own handle, and each copy moves its offset by
	// exactly what it copied: one seek keeps it at r.off.
	if _, err := fh.Seek(r.off, io.SeekStart); err != nil {
		return 0, fmt.Errorf("fill: reading spool: %w", err)
	}
	for r.off < r.end {
		upto, err := r.available()
		if err != nil {
			return total, err
		}
		n, err := io.Copy(w, io.LimitReader(fh, upto-r.off))
		r.off += n
		total += n
		if err != nil {
			return total, err
		}
		if n == 0 { // the spool is shorter than published: never loop on it
			return total, fmt.Errorf("fill: reading spool: %w", io.ErrUnexpectedEOF)
		}
	}
	return total, nil
}

// publish makes n more bytes readable.
func (f *Fill) publish(n int) {
	f.mu.Lock()
	f.written += int64(n)
	close(f.wake)
	f.wake = make(chan struct{})
	f.mu.Unlock()
}

// finish records the outcome, wakes every reader and removes the fill from
// the group so that the next request sees the cache (or starts over).
func (f *Fill) finish(err error) {
	// Unlist first: a client arriving from now on starts afresh (or finds
	// the blob cached) instead of joining a fill that has just failed.
	f.g.mu.Lock()
	f.g.unlist(f)
	f.g.mu.Unlock()
	f.mu.Lock()
	if err != nil {
		f.err = err
	} else {
		f.done, f.verified = true, true
	}
	close(f.wake)
	f.wake = make(chan struct{})
	f.mu.Unlock()
}

func (f *Fill) run(ctx context.Context, src Source) {
	defer f.Release()
	log := f.g.opts.Log.With("digest", f.dgst)
	readyOnce := sync.OnceFunc(func() { close(f.ready) })
	defer readyOnce()
	defer f.cancel(nil)
	idle := time.AfterFunc(f.g.opts.IdleTimeout, func() { f.cancel(ErrIdle) })
	defer idle.Stop()

	// The blob is known not to be cached (no other fill of it runs here)
	// when the caller's lookup missed and nothing committed it since, or
	// when this lookup misses: the commit then needs no existence check.
	known := !f.check
	if f.check {
		size, err := f.g.store.StatBlob(ctx, f.dgst)
		if err == nil {
			// Committed between the caller's cache check and this fill.
			f.size, f.cached = size, true
			f.finish(nil)
			f.g.opts.Metrics.FillEnded("")
			return
		}
		known = errors.Is(err, storage.ErrNotFound)
	}
	f.known = known

	err := f.fetch(ctx, src, idle, readyOnce, log)
	if errors.Is(err, ErrCached) {
		// Another replica committed it since the miss: read it from the
		// cache like a blob found by the lookup above.
		size, serr := f.g.store.StatBlob(ctx, f.dgst)
		if serr == nil {
			f.size, f.cached = size, true
			f.finish(nil)
			f.g.opts.Metrics.FillEnded("")
			return
		}
		err = fmt.Errorf("fill: source said the blob is cached, the cache says: %w", serr)
	}
	if errors.Is(err, ErrCacheFull) {
		// Not a failure: the budget (which counts and logs it) declined
		// the blob, and each client is served from the upstream.
		log.Debug("cache full; blob not cached", "err", err)
		f.g.opts.Metrics.FillEnded("")
		f.finish(err)
		return
	}
	if err != nil && errors.Is(err, storage.ErrNotCached) {
		// Verified and streamed to every client, but the cache refused it.
		log.Warn("blob served but not cached", "err", err, "size", f.size)
		f.g.opts.Metrics.FillUncached()
		err = nil
	}
	if err != nil {
		if cause := context.Cause(ctx); cause != nil && errors.Is(err, context.Canceled) {
			err = fmt.Errorf("%w (%w)", cause, err)
		}
		log.Warn("blob fill failed; nothing cached", "err", err, "bytes", f.written, "size", f.size)
		f.g.opts.Metrics.FillEnded(reason(err))
	} else {
		log.Debug("blob fill complete", "size", f.size)
		f.g.opts.Metrics.FillEnded("")
	}
	f.finish(err)
}

// reason classifies a fill failure for the failures metric.
func reason(err error) string {
	switch {
	case errors.Is(err, storage.ErrDigestMismatch):
		return metrics.ReasonDigestMismatch
	case errors.Is(err, storage.ErrSizeMismatch), errors.Is(err, ErrUnknownSize):
		return metrics.ReasonSizeMismatch
	case errors.Is(err, ErrIdle):
		return metrics.ReasonIdle
	case errors.Is(err, ErrNoClients):
		return metrics.ReasonNoClients
	case errors.Is(err, ErrSpool):
		return metrics.ReasonDisk
	case errors.Is(err, upstream.ErrNotRegistry):
		return metrics.ReasonNotRegistry
	}
	return metrics.ReasonUpstream
}

func (f *Fill) fetch(ctx context.Context, src Source, idle *time.Timer, ready func(), log *slog.Logger) error {
	body, size, last, err := call(ctx, src, 0)
	if err != nil {
		return err
	}
	defer func() { _ = body.Close() }()
	if size < 0 {
		return ErrUnknownSize
	}
	// A relayed blob is cached by its owner: no budget, no upload now (see
	// Relay and settle).
	relay := last.committed != nil
	if b := f.g.opts.Budget; b != nil && !relay {
		// An eviction pass may run meanwhile: not an upstream stall.
		idle.Stop()
		release, err := b.Admit(ctx, f.dgst, size)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrCacheFull, err)
		}
		defer release()
	}
	idle.Reset(f.g.opts.IdleTimeout)

	// sink takes every byte, behind the spool (see pipe): it hashes them,
	// and writes the upload unless that is the spool itself; verify checks
	// size and digest at the end.
	var sink func([]byte)
	var verify func() error
	var w *storage.BlobWriter
	local := false
	if relay {
		hv := &hashVerifier{want: f.dgst, size: size, h: f.dgst.Algorithm().Hash()}
		sink, verify = func(b []byte) { _, _ = hv.Write(b) }, hv.Verify
	} else {
		// The s3-aws writer keeps the context it is created with for its
		// Commit: a cancelled fill context (idle timeout firing late, the
		// last client leaving) must not fail the commit of a verified
		// blob. Upstream reads still stop with ctx.
		w, err = f.g.store.CreateBlob(context.WithoutCancel(ctx), f.dgst, size)
		if err != nil {
			return fmt.Errorf("%w: creating the cache upload: %w", ErrSpool, err)
		}
		defer func() { _ = w.Cancel(context.WithoutCancel(ctx)) }() // no-op after Commit
		if f.known {
			w.KnownNew()
		}
		verify = w.Verify
		// On a local cache the upload itself is the spool: clients read
		// the file the cache is writing, and every byte is written once.
		local = w.LocalPath() != ""
		if local {
			sink = w.Hash // this goroutine Appends
		} else {
			sink = func(b []byte) { _, _ = w.Write(b) } // a storage error surfaces at Commit
		}
	}
	// Elsewhere (S3, a relay) an anonymous local file is the spool.
	var spool *os.File
	if local {
		spool, err = os.Open(w.LocalPath()) // this handle outlives rename and removal
	} else if spool, err = os.CreateTemp(f.g.opts.SpoolDir, "fill-*"); err == nil {
		_ = os.Remove(spool.Name()) // anonymous: a crash leaves nothing behind
	}
	if err != nil {
		return fmt.Errorf("%w: creating: %w", ErrSpool, err)
	}
	f.mu.Lock()
	f.size, f.spool = size, spool
	f.mu.Unlock()
	ready()

	// Registered after w.Cancel, so it runs first: the sink is done with w
	// before the upload is cancelled.
	p := newPipe(&f.g.bufs, sink)
	defer p.close()
	var off int64
	resumes := 0
	for off < size {
		buf := p.buffer()
		n, rerr := body.Read(buf)
		if n > 0 {
			idle.Reset(f.g.opts.IdleTimeout)
			if off+int64(n) > size {
				return fmt.Errorf("%w: upstream sent more than %d bytes", storage.ErrSizeMismatch, size)
			}
			// The bytes must be in the spool before they are published.
			if local {
				w.Append(buf[:n])
				if err := w.StorageErr(); err != nil {
					return fmt.Errorf("%w: writing: %w", ErrSpool, err)
				}
			} else if _, err := spool.WriteAt(buf[:n], off); err != nil {
				return fmt.Errorf("%w: writing: %w", ErrSpool, err)
			}
			off += int64(n)
			f.publish(n)
			p.send(buf[:n])
		} else {
			p.recycle(buf)
		}
		if rerr == nil {
			continue
		}
		if rerr == io.EOF {
			if off < size {
				rerr = io.ErrUnexpectedEOF
			} else {
				break
			}
		}
		if ctx.Err() != nil || resumes >= f.g.opts.MaxResumes {
			return fmt.Errorf("fill: reading upstream at byte %d: %w", off, rerr)
		}
		resumes++
		f.g.opts.Metrics.FillResumed()
		log.Info("resuming broken blob download", "offset", off, "err", rerr, "try", resumes)
		_ = body.Close()
		var rsize int64
		body, rsize, last, err = call(ctx, src, off)
		if err != nil {
			body = io.NopCloser(nil)
			return fmt.Errorf("fill: resuming at byte %d: %w", off, err)
		}
		if rsize != size {
			return fmt.Errorf("%w: size changed from %d to %d on resume", storage.ErrSizeMismatch, size, rsize)
		}
	}
	// Every byte is in the spool and published but the last; the sink
	// finishes hashing the last buffers before the verdict.
	p.close()
	// The upstream is done: the idle timeout must not cut a slow commit (a
	// server-side copy of a large blob on S3).
	idle.Stop()
	if err := verify(); err != nil {
		return err
	}
	// Verified: clients get the last byte now rather than after the
	// commit's fsync and rename. A commit the cache refuses
	// (storage.ErrNotCached) does not change what they received.
	f.mu.Lock()
	f.verified = true
	close(f.wake)
	f.wake = make(chan struct{})
	f.mu.Unlock()
	if relay {
		return f.settle(ctx, last, spool, size)
	}
	if err := w.Commit(context.WithoutCancel(ctx)); err != nil {
		return err
	}
	f.cachedNow()
	return nil
}

// cachedNow records that the cache holds the blob thanks to this fill.
func (f *Fill) cachedNow() {
	f.g.committed(f.dgst)
	f.mu.Lock()
	f.inCache = true
	f.mu.Unlock()
}

// settle ends a relayed fill whose bytes are verified in spool: when the
// last source was a relay whose owner committed the blob and the cache
// holds it, nothing is written; otherwise the blob is committed from the
// spool (an owner that died, replicas with caches of their own).
func (f *Fill) settle(ctx context.Context, last *relayState, spool *os.File, size int64) error {
	ctx = context.WithoutCancel(ctx) // the blob is verified: finish caching it
	if last.committed != nil && !last.committed(ctx) {
		f.g.opts.Log.Debug("the blob's owner did not confirm its commit; caching it from the spool", "digest", f.dgst)
	}
	_, serr := f.g.store.StatBlob(ctx, f.dgst)
	if serr == nil {
		f.cachedNow()
		return nil
	}
	if b := f.g.opts.Budget; b != nil {
		release, err := b.Admit(ctx, f.dgst, size)
		if err != nil {
			return fmt.Errorf("%w: %w", storage.ErrNotCached, err)
		}
		defer release()
	}
	w, err := f.g.store.CreateBlob(ctx, f.dgst, size)
	if err != nil {
		return fmt.Errorf("%w: creating the cache upload: %w", storage.ErrNotCached, err)
	}
	defer func() { _ = w.Cancel(ctx) }()
	if errors.Is(serr, storage.ErrNotFound) {
		w.KnownNew()
	}
	if _, err := io.Copy(w, io.NewSectionReader(spool, 0, size)); err != nil {
		return fmt.Errorf("%w: reading the spool: %w", storage.ErrNotCached, err)
	}
	if err := w.Commit(ctx); err != nil {
		return err
	}
	f.cachedNow()
	return nil
}

// Ring sizes of a fill's pipe: enough for the hash of one buffer to overlap
// the upstream read and spool write of the next, and flat memory per fill
// (ringBuffers × chunkSize bytes).
const (
	chunkSize   = 256 << 10
	ringBuffers = 3
)

// pipe runs a fill's sink (the hash, and the upload off a local cache) on
// its own goroutine, behind the spool writes: the fill reads the upstream
// into one buffer and writes it to the spool while the sink takes the
// buffer before. A ring of at most ringBuffers buffers, taken from the
// group's pool as they are first needed (a small blob uses one) and given
// back at close, bounds it: when the sink falls behind, buffer waits for
// it. The fill goroutine alone calls buffer, recycle, send and close.
type pipe struct {
	pool *sync.Pool  // of *[]byte, chunkSize bytes each
	free chan []byte // empty buffers, full capacity
	full chan []byte // buffers in the spool, for the sink
	done chan struct{}
	made int // buffers taken from the pool
	once sync.Once
}

func newPipe(pool *sync.Pool, sink func([]byte)) *pipe {
	p := &pipe{pool: pool, free: make(chan []byte, ringBuffers), full: make(chan []byte, ringBuffers), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for b := range p.full {
			sink(b)
			p.free <- b[:cap(b)]
		}
	}()
	return p
}

// buffer returns an empty buffer of chunkSize bytes: a free one, a new one
// while the ring is not full, else the first the sink is done with.
func (p *pipe) buffer() []byte {
	select {
	case b := <-p.free:
		return b
	default:
	}
	if p.made < ringBuffers {
		p.made++
		return *p.pool.Get().(*[]byte)
	}
	return <-p.free
}

// recycle returns a buffer from buffer unused.
func (p *pipe) recycle(b []byte) { p.free <- b[:cap(b)] }

// send hands b, a buffer from buffer holding the next bytes of the blob, to
// the sink.
func (p *pipe) send(b []byte) { p.full <- b }

// close waits until the sink took every buffer sent and gives the free
// buffers back to the pool (one the fill held when it failed is left to the
// garbage collector). Later calls return at once.
func (p *pipe) close() {
	p.once.Do(func() {
		close(p.full)
		<-p.done
		for {
			select {
			case b := <-p.free:
				p.pool.Put(&b)
			default:
				return
			}
		}
	})
}

// hashVerifier hashes a relayed blob, which has no cache upload to do it.
type hashVerifier struct {
	want digest.Digest
	size int64
	h    hash.Hash
	n    int64
}

func (v *hashVerifier) Write(p []byte) (int, error) {
	v.h.Write(p)
	v.n += int64(len(p))
	return len(p), nil
}

// Verify checks size and digest as storage.BlobWriter.Verify does.
func (v *hashVerifier) Verify() error {
	if v.n != v.size {
		return fmt.Errorf("%w: received %d bytes, want %d", storage.ErrSizeMismatch, v.n, v.size)
	}
	if got := digest.NewDigest(v.want.Algorithm(), v.h); got != v.want {
		return fmt.Errorf("%w: content hashes to %s, want %s", storage.ErrDigestMismatch, got, v.want)
	}
	return nil
}

// Clients returns how many callers hold the running fill of dgst (0 when
// none runs). A prefetch throttles its fill only while it is the only
// caller, so a client that joins gets the upstream's full speed.
func (g *Group) Clients(dgst digest.Digest) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	if f := g.fills[dgst]; f != nil {
		return f.refs - 1 // the runner holds one
	}
	return 0
}
