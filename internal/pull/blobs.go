package pull

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// Blob is one blob being read, from the cache, from the fill that is
// downloading it, or (when the cache cannot take it) straight from the
// upstream. Its size is known; pick the bytes to read with Open. A Blob
// holds a lease on the digest (eviction leaves it alone) and, on a miss, a
// place in the fill: Close it when done.
type Blob struct {
	Digest digest.Digest
	Size   int64 // bytes

	s        *Service
	ctx      context.Context
	repo     string
	hit      bool                // read from the cache
	fill     *fill.Fill          // read from a running fill
	direct   io.ReadCloser       // streamed from the upstream, not cached
	held     []byte              // all of direct, read and verified (WaitVerified)
	cached   *storage.CachedBlob // the cache's blob on a hit (nil: look it up in Open)
	release  func()              // the lease
	closers  []io.Closer
	attempts int    // fills joined
	retried  bool   // joined again after another repository's source failed
	missed   bool   // the first lookup found the blob not cached
	seq      uint64 // fills committed before that lookup (fill.Group.JoinMissed)
}

// Blob opens blob dgst of repository repo for a GET. With
// Options.CheckLinks, a blob cached under another repository is served
// only once the upstream confirmed (a HEAD) that repo holds it; otherwise
// the answer is an upstream 404.
//
// On a miss it joins the running fill of dgst or starts one, and returns
// once the size is known (the body streams as the fill goes). When the
// cache refuses the blob (budget full, local disk trouble) the blob is
// streamed from the upstream to this caller only, still verified. Errors:
// the upstream's (see IsAuthoritative), ErrBusy (too many downloads at
// once; retry shortly), verification errors (storage.ErrDigestMismatch,
// storage.ErrSizeMismatch, fill.ErrUnknownSize), fill.ErrIdle, or ctx's.
func (s *Service) Blob(ctx context.Context, repo string, dgst digest.Digest) (*Blob, error) {
	if _, _, err := s.ups.Split(repo); err != nil {
		return nil, err
	}
	if err := s.checkLink(ctx, repo, dgst, storage.KindBlob); err != nil {
		return nil, err
	}
	// Before the lookup: eviction then either removed the blob already
	// (a miss) or leaves it until the blob is closed.
	release, err := s.cache.Lease(ctx, dgst)
	if err != nil {
		return nil, err // ctx ended
	}
	b := &Blob{Digest: dgst, s: s, ctx: ctx, repo: repo, release: release}
	b.seq = s.fills.Seq() // before the lookup: see fill.Group.JoinMissed
	// On a local disk the lookup opens the blob (its size from the open
	// file: gc or eviction after it cannot turn the hit into a miss); on S3
	// it is one HEAD, and a redirect needs no more.
	cb, err := s.store.LookupBlob(ctx, dgst)
	if err == nil {
		b.cached, b.Size, b.hit = cb, cb.Size, true
		return b, nil
	}
	b.missed = errors.Is(err, storage.ErrNotFound) // what JoinMissed trusts
	if !b.missed {
		s.log.Warn("blob cache lookup failed; treating as a miss", "digest", dgst, "err", err)
	}
	if err := b.fetch(); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

// StatBlob returns the size in bytes of blob dgst of repository repo, for a
// HEAD, and whether the cache holds it: from the cache, a running fill, or
// an upstream HEAD (nothing is fetched). Link checks and errors as for
// Blob.
func (s *Service) StatBlob(ctx context.Context, repo string, dgst digest.Digest) (size int64, hit bool, err error) {
	if _, _, err := s.ups.Split(repo); err != nil {
		return 0, false, err
	}
	if err := s.checkLink(ctx, repo, dgst, storage.KindBlob); err != nil {
		return 0, false, err
	}
	size, err = s.store.StatBlob(ctx, dgst)
	if err == nil {
		s.cache.Touch(storage.KindBlob, dgst)
		return size, true, nil
	}
	if !errors.Is(err, storage.ErrNotFound) {
		s.log.Warn("blob cache lookup failed; treating as a miss", "digest", dgst, "err", err)
	}
	if size, ok := s.fills.Size(dgst); ok { // being fetched right now
		return size, false, nil
	}
	uctx, cancel := s.upstreamContext(ctx)
	defer cancel()
	size, err = s.client(repo).HeadBlob(uctx, s.path(repo), dgst)
	return size, false, err
}

// fetch joins (or starts) the fill of the blob and waits for its size.
func (b *Blob) fetch() error {
	s := b.s
	b.attempts++
	// The lookup missed: a new fill skips its own existence check unless
	// a fill of the digest committed since. A retry looks again.
	f, err := s.join(b.repo, b.Digest, s.source(b.repo, b.Digest), b.missed && b.attempts == 1, b.seq)
	if err != nil {
		return err // ErrBusy
	}
	size, err := f.Wait(b.ctx)
	switch {
	case errors.Is(err, fill.ErrCacheFull), errors.Is(err, fill.ErrSpool):
		f.Release()
		if errors.Is(err, fill.ErrSpool) {
			s.log.Warn("cannot spool blob; serving it straight from the upstream", "digest", b.Digest, "err", err)
		} // a full budget was logged and counted by the evictor
		body, size, err := s.upstreamSource(b.repo, b.Digest)(b.ctx, 0)
		if err != nil {
			return err
		}
		b.direct, b.Size = body, size
		return nil
	case err != nil:
		f.Release()
		if b.retryOthers(err) {
			// The fill was another repository's: its failure may not be
			// ours. Once, with our own source (or the fill another
			// client started since).
			return b.fetch()
		}
		return err
	}
	if f.Cached() { // committed meanwhile: read it from the cache
		f.Release()
		b.Size, b.hit = size, true
		return nil
	}
	b.fill, b.Size = f, size
	return nil
}

// Hit reports whether the blob is read from the cache (valid after Open,
// which can turn a hit into a miss when the blob was removed meanwhile).
func (b *Blob) Hit() bool { return b.hit }

// RedirectURL returns a URL the client can fetch the cached blob from
// itself (a presigned URL on S3, valid for storage.RedirectLifetime), or ""
// when there is none: Options.Redirect is off, the blob is not read from
// the cache, the storage offers no such URL (the filesystem), or
// maxRedirectHolds blobs are held for redirects already. With a URL, the
// Blob's eviction lease passes to the service, which keeps it until the
// URL expires: the client's GET to the store comes after this response,
// and eviction must not remove the blob in between. The URL is a
// credential: never log it.
func (b *Blob) RedirectURL(r *http.Request) (string, error) {
	if !b.s.opts.Redirect || !b.hit {
		return "", nil
	}
	u, err := b.s.store.BlobURL(r, b.Digest)
	if err != nil || u == "" {
		return u, err
	}
	if b.release != nil {
		if !b.s.redirects.keep(b.Digest, b.release) {
			return "", nil // too many held: serve it
		}
		b.release = nil
	}
	b.s.cache.Touch(storage.KindBlob, b.Digest)
	return u, nil
}

// Open returns a reader of bytes [start, end) of the blob (0 <= start <=
// end <= Size). The reader fails rather than end early: a fill that fails,
// or upstream content that does not verify, is a Read error, never a short
// clean EOF, and the blob's last byte is only released once the whole blob
// is verified. On a local disk cache the reader is a file (sendfile). Open
// fails with ErrGone when the blob kept disappearing from the cache before
// it could be opened, or with the error of a new fill it had to join.
func (b *Blob) Open(start, end int64) (io.Reader, error) {
	switch {
	case b.held != nil:
		return bytes.NewReader(b.held[start:end]), nil
	case b.direct != nil:
		return newVerifier(b.direct, b.Digest, b.Size, start, end), nil
	case b.fill != nil:
		return b.fill.NewReader(b.ctx, start, end), nil
	}
	cb := b.cached
	b.cached = nil
	var err error
	if cb == nil { // the fill found the blob committed: look it up now
		cb, err = b.s.store.LookupBlob(b.ctx, b.Digest)
	}
	var rd io.Reader
	if err == nil {
		b.closers = append(b.closers, cb)
		rd, err = cb.Reader(b.ctx, start)
	}
	if errors.Is(err, storage.ErrNotFound) {
		// Removed (gc, eviction elsewhere) after the lookup (on S3, or
		// before a fill's commit was looked up): a miss after all. Its
		// size is its digest's, so the caller's headers hold.
		b.hit = false
		if b.attempts >= 3 {
			return nil, ErrGone
		}
		if err := b.fetch(); err != nil {
			return nil, err
		}
		return b.Open(start, end)
	}
	if err != nil {
		return nil, err
	}
	b.s.cache.Touch(storage.KindBlob, b.Digest)
	// An io.LimitedReader of an *os.File, which net/http still sends
	// with sendfile(2).
	return io.LimitReader(rd, end-start), nil
}

// WaitVerified blocks until the whole blob is in and matches its digest
// (nil at once for a cached blob), the download failed (its error), or
// ctx ends (ctx's error). A caller that wants to answer a small blob's
// errors with a status rather than a cut-off body waits for it before it
// sends anything. A joined fill of another repository that fails at its
// source (othersFailure) is retried once with this repository's own, as
// fetch does. A blob streamed from the upstream without caching is
// read into memory here (Size bytes: only for small blobs) and verified
// (an error wrapping storage.ErrDigestMismatch or ErrSizeMismatch); ctx
// does not bound that read, the Blob's own context does.
func (b *Blob) WaitVerified(ctx context.Context) error {
	switch {
	case b.fill != nil:
		err := b.fill.Verified(ctx)
		if err != nil && ctx.Err() == nil && b.retryOthers(err) {
			// A joined fill of another repository broke after its size
			// was known (mid-stream): nothing was sent to this client
			// yet, so, as in fetch, once more with its own source.
			b.fill.Release()
			b.fill = nil
			if err := b.fetch(); err != nil {
				return err
			}
			return b.WaitVerified(ctx)
		}
		return err
	case b.direct != nil && b.held == nil:
		buf, err := io.ReadAll(io.LimitReader(b.direct, b.Size+1))
		if err != nil {
			return err
		}
		if int64(len(buf)) != b.Size {
			return fmt.Errorf("%w: upstream sent %d bytes, want %d", storage.ErrSizeMismatch, len(buf), b.Size)
		}
		if got := b.Digest.Algorithm().FromBytes(buf); got != b.Digest {
			return fmt.Errorf("%w: upstream blob hashes to %s", storage.ErrDigestMismatch, got)
		}
		b.held = buf
	}
	return nil
}

// Close releases the lease, the fill and any open file.
func (b *Blob) Close() {
	if b.cached != nil {
		_ = b.cached.Close()
		b.cached = nil
	}
	for _, c := range b.closers {
		_ = c.Close()
	}
	b.closers = nil
	if b.fill != nil {
		b.fill.Release()
		b.fill = nil
	}
	if b.direct != nil {
		_ = b.direct.Close()
		b.direct = nil
	}
	if b.release != nil {
		b.release()
		b.release = nil
	}
}

// join joins the running fill of dgst or starts one that reads from src,
// the source of repository repo, counted against the fill bound of repo's
// upstream (fill.Options.MaxFillsPer, keyed by its registry name) and the
// global one (fill.Options.MaxFills). missed says the caller's cache
// lookup, started after fills.Seq returned seq, found dgst not cached
// (fill.Group.JoinMissed). A bound reached is a *BusyError naming it as
// the configuration does.
func (s *Service) join(repo string, dgst digest.Digest, src fill.Source, missed bool, seq uint64) (*fill.Fill, error) {
	r, _ := s.at(repo)
	var f *fill.Fill
	var err error
	if missed {
		f, _, err = s.fills.JoinMissed(r.Name, dgst, seq, src)
	} else {
		f, _, err = s.fills.Join(r.Name, dgst, src)
	}
	var le *fill.LimitError
	if errors.As(err, &le) {
		return nil, &BusyError{Bound: s.bound(le.Key)}
	}
	return f, err
}

// bound is the configuration's name of the fill bound of key, an
// upstream's registry name ("": limits.max_fills, all upstreams together).
func (s *Service) bound(key string) string {
	switch key {
	case "":
		return "limits.max_fills"
	case s.ups.Default().Name:
		return "upstream.max_fills"
	}
	return "upstreams." + key + ".max_fills"
}

// source is where a fill of dgst from repository repo gets its bytes: the
// upstream, or with Options.Cluster the replica owning the blob. Its
// errors are *sourceError naming repo, so that a client that joined the
// fill for another repository can tell the failure was not its own.
func (s *Service) source(repo string, dgst digest.Digest) fill.Source {
	src := s.upstreamSource(repo, dgst)
	if s.opts.Cluster != nil {
		src = s.opts.Cluster.Source(dgst, src)
	}
	return func(ctx context.Context, off int64) (io.ReadCloser, int64, error) {
		body, size, err := src(ctx, off)
		if err != nil {
			return nil, 0, &sourceError{repo: repo, err: err}
		}
		return body, size, nil
	}
}

// sourceError is a failure of the source of a fill started for repository
// repo (qualified name). It unwraps to the source's error.
type sourceError struct {
	repo string
	err  error
}

func (e *sourceError) Error() string { return e.err.Error() }
func (e *sourceError) Unwrap() error { return e.err }

// othersFailure reports whether err, why a joined fill failed, came from
// the source of another repository than repo and may not hold for repo:
// any failure of another upstream (its 404 or 401, its outage), or an
// authoritative answer (IsAuthoritative: not found, refused) about another
// repository of repo's own upstream, which answers per repository. An
// outage of repo's own upstream would only fail again: not retried.
// Fills are shared by digest, and the same digest is the same bytes, so a
// fill that succeeds serves every repository; one that fails must not
// fail clients whose own source has the blob.
func (s *Service) othersFailure(repo string, err error) bool {
	var se *sourceError
	if !errors.As(err, &se) || se.repo == repo {
		return false
	}
	mine, _ := s.at(repo)
	theirs, _ := s.at(se.repo)
	return mine.Name != theirs.Name || IsAuthoritative(err)
}

// retryOthers reports whether a joined fill of dgst that failed with err
// is to be tried again for repository repo (othersFailure), and logs it.
func (s *Service) retryOthers(repo string, dgst digest.Digest, err error) bool {
	if err == nil || !s.othersFailure(repo, err) {
		return false
	}
	s.log.Info("a shared blob fill failed at another repository's source; fetching from this one's", "digest", dgst,
		"repository", repo, "err", err)
	return true
}

// retryOthers is Service.retryOthers for the Blob, once per Blob.
func (b *Blob) retryOthers(err error) bool {
	if b.retried || !b.s.retryOthers(b.repo, b.Digest, err) {
		return false
	}
	b.retried = true
	return true
}

// upstreamSource fetches dgst from repository repo; when the upstream
// streams without Content-Length the size comes from a HEAD.
func (s *Service) upstreamSource(repo string, dgst digest.Digest) fill.Source {
	return func(ctx context.Context, off int64) (io.ReadCloser, int64, error) {
		b, err := s.client(repo).GetBlob(ctx, s.path(repo), dgst, off)
		if err != nil {
			return nil, 0, err
		}
		if b.Size < 0 {
			hctx, cancel := s.upstreamContext(ctx)
			defer cancel()
			size, herr := s.client(repo).HeadBlob(hctx, s.path(repo), dgst)
			if herr != nil {
				_ = b.Body.Close()
				return nil, 0, herr
			}
			b.Size = size
		}
		return b.Body, b.Size, nil
	}
}

// CacheBlob caches blob dgst of repository repo, joining a running fill of
// it or starting one whose upstream source wrap (when not nil) wraps (a
// prefetch's bandwidth cap and progress). It returns once the blob is
// committed; fetched reports whether it was not cached before this call.
// Errors: the fill's, ErrBusy, ErrNotCached (verified but the cache could
// not keep it), or ctx's. A joined fill of another repository that fails
// at its source is tried again once, as for Blob.
func (s *Service) CacheBlob(ctx context.Context, repo string, dgst digest.Digest, wrap func(fill.Source) fill.Source) (fetched bool, err error) {
	if _, _, err := s.ups.Split(repo); err != nil {
		return false, err
	}
	fetched, err = s.cacheBlob(ctx, repo, dgst, wrap)
	if s.retryOthers(repo, dgst, err) {
		fetched, err = s.cacheBlob(ctx, repo, dgst, wrap)
	}
	return fetched, err
}

// cacheBlob is one attempt of CacheBlob.
func (s *Service) cacheBlob(ctx context.Context, repo string, dgst digest.Digest, wrap func(fill.Source) fill.Source) (fetched bool, err error) {
	seq := s.fills.Seq() // before the lookup: see fill.Group.JoinMissed
	_, lerr := s.store.StatBlob(ctx, dgst)
	if lerr == nil {
		return false, nil
	}
	src := s.source(repo, dgst)
	if wrap != nil {
		src = wrap(src)
	}
	f, err := s.join(repo, dgst, src, errors.Is(lerr, storage.ErrNotFound), seq)
	if err != nil {
		return false, err
	}
	defer f.Release()
	if _, err := f.Wait(ctx); err != nil {
		return false, err
	}
	if f.Cached() {
		return false, nil
	}
	if err := f.Done(ctx); err != nil {
		return false, err
	}
	if !f.Committed() {
		return false, ErrNotCached
	}
	return true, nil
}

// BlobCached reports whether blob dgst is in the cache.
func (s *Service) BlobCached(ctx context.Context, dgst digest.Digest) bool {
	_, err := s.store.StatBlob(ctx, dgst)
	return err == nil
}

// FillClients reports how many callers wait on a running fill of dgst.
func (s *Service) FillClients(dgst digest.Digest) int { return s.fills.Clients(dgst) }
