package proxy

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/manifest"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/names"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/tracking"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// serveManifest answers GET and HEAD /v2/<name>/manifests/<reference>. HEAD
// resolves the manifest exactly as GET does (fetching it on a cold cache),
// so both carry the same Content-Type, Content-Length and
// Docker-Content-Digest; nvcr.io has answered 403 to manifest HEADs, so the
// mirror does not rely on them for a cold HEAD.
func (h *Handler) serveManifest(w http.ResponseWriter, r *http.Request, name, ref string) {
	var m *storage.Manifest
	var hit bool
	var err error
	if dgst, derr := digest.Parse(ref); derr == nil {
		m, hit, err = h.manifestByDigest(r.Context(), name, dgst)
	} else if strings.Contains(ref, ":") {
		writeError(w, newAPIError(errcode.ErrorCodeDigestInvalid, "invalid manifest digest"))
		return
	} else if !names.ValidTag(ref) {
		writeError(w, newAPIError(errcode.ErrorCodeTagInvalid, "invalid tag"))
		return
	} else {
		m, hit, err = h.manifestByTag(r.Context(), name, ref)
	}
	if err != nil {
		if errors.Is(err, r.Context().Err()) && r.Context().Err() != nil {
			return // the client went away
		}
		h.log.Debug("manifest request failed", "repository", name, "reference", ref, "err", err)
		writeError(w, toAPIError(err, kindManifest))
		return
	}
	if h.cache != nil {
		h.cache.Touch("manifest", m.Digest)
	}
	hd := w.Header()
	hd.Set("Content-Type", m.MediaType)
	hd.Set("Content-Length", strconv.Itoa(len(m.Body)))
	hd.Set("Docker-Content-Digest", m.Digest.String())
	hd.Set("Etag", `"`+m.Digest.String()+`"`)
	w.WriteHeader(http.StatusOK)
	var sent int64
	if r.Method != http.MethodHead {
		n, _ := w.Write(m.Body)
		sent = int64(n)
	}
	result := metrics.Miss
	if hit {
		result = metrics.Hit
	}
	h.metrics.CacheResult("manifest", result, sent)
	if h.opts.Pulls != nil {
		ev := tracking.ManifestServed{Repository: name, Reference: ref, Digest: m.Digest, MediaType: m.MediaType,
			Client: tracking.ClientOf(r, userOf(r)), Time: time.Now()}
		if r.Method != http.MethodHead {
			ev.Body = m.Body
		}
		h.opts.Pulls.Served(ev)
	}
}

// manifestByDigest serves a digest from the cache, which never goes stale,
// or fetches and caches it. Content-addressed: the digest is verified. hit
// reports whether the upstream was not asked.
func (h *Handler) manifestByDigest(ctx context.Context, name string, dgst digest.Digest) (m *storage.Manifest, hit bool, err error) {
	m, err = h.store.GetManifest(ctx, dgst)
	if err == nil {
		if err := h.ensureLink(ctx, name, dgst, kindManifest); err != nil {
			return nil, false, err
		}
		return m, true, nil
	}
	if !errors.Is(err, storage.ErrNotFound) {
		h.log.Warn("cached manifest unreadable; refetching", "digest", dgst, "err", err)
	}
	m, err = h.fetchManifest(ctx, name, dgst)
	return m, false, err
}

// fetchManifest gets manifest dgst of repository name from the upstream
// (one exchange however many ask at once) and caches and links it.
func (h *Handler) fetchManifest(ctx context.Context, name string, dgst digest.Digest) (*storage.Manifest, error) {
	v, err, _ := h.manifests.Do(name+"@"+dgst.String(), func() (any, error) {
		ctx, cancel := h.upstreamContext(ctx)
		defer cancel()
		um, err := h.up.GetManifest(ctx, name, dgst.String(), nil)
		if err != nil {
			return nil, err
		}
		return h.cacheManifest(ctx, name, um), nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*storage.Manifest), nil
}

// upstreamContext detaches an upstream exchange from one client's
// cancellation (others may share it) and bounds it.
func (h *Handler) upstreamContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), h.opts.ManifestTimeout)
}

// cacheManifest stores a verified manifest that the upstream served for
// repository name. With an access policy it also links the manifest and
// everything it refers to (config, layers, index children) to name, so that
// those are served under name from the cache, also offline. A storage
// failure is logged, not returned: the manifest is still served and the next
// request tries again.
func (h *Handler) cacheManifest(ctx context.Context, name string, um *upstream.Manifest) *storage.Manifest {
	m := &storage.Manifest{MediaType: um.MediaType, Digest: um.Digest, Body: um.Body}
	if err := h.store.PutManifest(ctx, m.MediaType, m.Digest, m.Body); err != nil {
		h.log.Warn("caching manifest failed", "digest", m.Digest, "err", err)
	}
	if h.access != nil {
		links := []digest.Digest{m.Digest}
		refs, _ := manifest.References(m.Body)
		for _, r := range refs {
			links = append(links, r.Digest)
		}
		if err := h.store.PutLinks(ctx, name, links...); err != nil {
			h.log.Warn("linking manifest content failed", "repository", name, "digest", m.Digest, "err", err)
		}
	}
	return m
}

// ensureLink makes sure content dgst, cached under some repository, may be
// served under name: a link recorded from one of name's manifests, or the
// upstream confirming that name holds dgst (a blob HEAD; a manifest is
// fetched from name and cached, which links it and its references).
// Without this, a client allowed on a public repository could read a
// private repository's cached blob by naming its digest. It does nothing
// without an access policy. Content name does not hold is reported as
// unknown, the same answer as for content that does not exist.
func (h *Handler) ensureLink(ctx context.Context, name string, dgst digest.Digest, k kind) error {
	if h.access == nil {
		return nil
	}
	if ok, err := h.store.HasLink(ctx, name, dgst); err == nil && ok {
		return nil
	}
	if k == kindManifest {
		// A GET, not a HEAD: nvcr.io has refused manifest HEADs (403),
		// and caching the manifest under name links what it refers to as
		// well, so its blobs need no HEAD each.
		_, err := h.fetchManifest(ctx, name, dgst)
		if err != nil && isAuthoritative(err) {
			return &upstream.Error{StatusCode: http.StatusNotFound}
		}
		return err
	}
	uctx, cancel := h.upstreamContext(ctx)
	defer cancel()
	_, err := h.up.HeadBlob(uctx, name, dgst)
	switch {
	case err == nil:
		if lerr := h.store.PutLinks(ctx, name, dgst); lerr != nil {
			h.log.Warn("recording link failed", "repository", name, "digest", dgst, "err", lerr)
		}
		return nil
	case isAuthoritative(err):
		return &upstream.Error{StatusCode: http.StatusNotFound}
	}
	return err
}

// manifestByTag serves name:tag. A tag confirmed by the upstream within
// TagFreshness is served from the cache. An older one is revalidated with a
// HEAD (a GET when the digest changed or HEAD is refused); when the upstream
// is unreachable, failing (5xx) or rate limiting, the cached manifest is
// served stale. A 404 from the upstream forgets the tag. hit reports whether
// the manifest bytes came from the cache (a revalidation may have asked the
// upstream for the digest only).
func (h *Handler) manifestByTag(ctx context.Context, name, tag string) (*storage.Manifest, bool, error) {
	rec, recErr := h.store.GetTag(ctx, name, tag)
	var cached *storage.Manifest
	if recErr == nil {
		if m, err := h.store.GetManifest(ctx, rec.Digest); err == nil {
			cached = m
			if time.Since(rec.ConfirmedAt) < h.opts.TagFreshness {
				return cached, true, nil
			}
		}
	}
	v, err, _ := h.manifests.Do(name+":"+tag, func() (any, error) {
		ctx, cancel := h.upstreamContext(ctx)
		defer cancel()
		if cached != nil {
			d, err := h.up.HeadManifest(ctx, name, tag, nil)
			if err == nil && d.Digest == cached.Digest {
				rec.ConfirmedAt = time.Now()
				if perr := h.store.PutTag(ctx, name, tag, rec); perr != nil {
					h.log.Warn("recording tag failed", "repository", name, "tag", tag, "err", perr)
				}
				return cached, nil
			}
			if err != nil && !errors.Is(err, upstream.ErrDenied) && !errors.Is(err, upstream.ErrInvalidContent) {
				return nil, err // GET would fail the same way
			}
		}
		um, err := h.up.GetManifest(ctx, name, tag, nil)
		if err != nil {
			return nil, err
		}
		m := h.cacheManifest(ctx, name, um)
		nrec := storage.TagRecord{Digest: m.Digest, MediaType: m.MediaType, Size: int64(len(m.Body)), ConfirmedAt: time.Now()}
		if perr := h.store.PutTag(ctx, name, tag, nrec); perr != nil {
			h.log.Warn("recording tag failed", "repository", name, "tag", tag, "err", perr)
		}
		return m, nil
	})
	if err == nil {
		m := v.(*storage.Manifest)
		return m, m == cached, nil
	}
	if cached != nil && !isAuthoritative(err) {
		h.log.Warn("upstream unavailable; serving cached tag", "repository", name, "tag", tag,
			"digest", cached.Digest, "confirmed_at", rec.ConfirmedAt, "err", err)
		return cached, true, nil
	}
	if errors.Is(err, upstream.ErrNotFound) && recErr == nil {
		if derr := h.store.DeleteTag(context.WithoutCancel(ctx), name, tag); derr != nil {
			h.log.Warn("forgetting deleted tag failed", "repository", name, "tag", tag, "err", derr)
		}
	}
	return nil, false, err
}

// userOf returns the authenticated user of r ("" when anonymous).
func userOf(r *http.Request) string {
	if ri, ok := r.Context().Value(routeKey{}).(*routeInfo); ok {
		return ri.user
	}
	return ""
}
