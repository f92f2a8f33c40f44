package proxy

import (
	"context"
	"errors"
	"fmt"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/names"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// The methods below let prefetch jobs (internal/prefetch.Warmer) use the
// same pull-through path as clients: the manifest cache with its tag
// records and repository links, and the fill group, so that a prefetch and
// a client pull of the same blob make one upstream fetch.

// WarmManifest returns repo's manifest for ref (a tag or a digest) from the
// cache, or fetches and caches it. Errors are the upstream's
// (*upstream.Error) or, for a malformed digest, a plain error.
func (h *Handler) WarmManifest(ctx context.Context, repo, ref string) (mediaType string, body []byte, dgst digest.Digest, err error) {
	var m *storage.Manifest
	if d, derr := digest.Parse(ref); derr == nil {
		m, _, err = h.manifestByDigest(ctx, repo, d)
	} else if !names.ValidTag(ref) {
		return "", nil, "", fmt.Errorf("invalid reference %q", ref)
	} else {
		m, _, err = h.manifestByTag(ctx, repo, ref)
	}
	if err != nil {
		return "", nil, "", err
	}
	return m.MediaType, m.Body, m.Digest, nil
}

// ErrNotCached is returned by WarmBlob when the blob was fetched and
// verified but the cache could not keep it (disk trouble, budget full).
var ErrNotCached = errors.New("proxy: blob could not be cached")

// WarmBlob caches blob dgst of repo, joining a running fill of it or
// starting one whose upstream source wrap (when not nil) wraps. It returns
// once the blob is committed. fetched reports whether the blob was not
// cached before this call.
func (h *Handler) WarmBlob(ctx context.Context, repo string, dgst digest.Digest, wrap func(fill.Source) fill.Source) (fetched bool, err error) {
	if h.BlobCached(ctx, dgst) {
		return false, nil
	}
	src := fill.Source(h.blobSource(repo, dgst))
	if wrap != nil {
		src = wrap(src)
	}
	f, _, err := h.fills.Join(dgst, src)
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
	if !h.BlobCached(ctx, dgst) {
		return false, ErrNotCached
	}
	return true, nil
}

// BlobCached reports whether blob dgst is in the cache.
func (h *Handler) BlobCached(ctx context.Context, dgst digest.Digest) bool {
	_, err := h.store.StatBlob(ctx, dgst)
	return err == nil
}

// FillClients reports how many callers wait on a running fill of dgst.
func (h *Handler) FillClients(dgst digest.Digest) int { return h.fills.Clients(dgst) }
