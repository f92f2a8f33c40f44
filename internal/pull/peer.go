package pull

import (
	"context"
	"fmt"
	"io"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// Cluster decides where a fill's bytes come from when replicas share the
// cache (*cluster.Node): it wraps the upstream source of a blob so that a
// replica that does not own the blob streams it from the one that does.
type Cluster interface {
	Source(dgst digest.Digest, upstream fill.Source) fill.Source
}

// PeerBlob opens blob dgst from byte offset on for another replica's fill
// (the peer endpoint, internal/cluster): from the fill of it this replica
// runs, late joiners and offsets as for clients, or from the cache. It
// never starts a fetch, so a peer request is never forwarded on, and it
// checks no repository: the asking replica authorised its client's
// request and checked the repository's link before it missed. committed
// waits for the fill to end and reports whether the blob is in the cache.
// Errors: one wrapping storage.ErrNotFound when neither a fill nor the
// cache has the blob; the fill's; ctx's.
func (s *Service) PeerBlob(ctx context.Context, dgst digest.Digest, offset int64) (io.ReadCloser, int64, func(context.Context) bool, error) {
	release, err := s.cache.Lease(ctx, dgst)
	if err != nil {
		return nil, 0, nil, err
	}
	if f := s.fills.Running(dgst); f != nil {
		size, err := f.Wait(ctx)
		switch {
		case err != nil:
			f.Release()
			release()
			return nil, 0, nil, err
		case !f.Cached():
			if offset > size {
				offset = size
			}
			rc := &readCloser{Reader: f.NewReader(ctx, offset, size), close: func() { f.Release(); release() }}
			return rc, size, func(ctx context.Context) bool { return f.Done(ctx) == nil && f.Committed() }, nil
		}
		f.Release() // committed meanwhile: the cache has it
	}
	cb, err := s.store.LookupBlob(ctx, dgst)
	if err != nil {
		release()
		return nil, 0, nil, fmt.Errorf("pull: peer blob: %w", err)
	}
	off := min(offset, cb.Size)
	rd, err := cb.Reader(ctx, off)
	if err != nil {
		_ = cb.Close()
		release()
		return nil, 0, nil, fmt.Errorf("pull: peer blob: %w", err)
	}
	s.cache.Touch(storage.KindBlob, dgst)
	rc := &readCloser{Reader: io.LimitReader(rd, cb.Size-off), close: func() { _ = cb.Close(); release() }}
	return rc, cb.Size, func(context.Context) bool { return true }, nil
}

type readCloser struct {
	io.Reader
	close func()
}

func (r *readCloser) Close() error { r.close(); return nil }
