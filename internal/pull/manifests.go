package pull

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/auth"
	"github.com/ngc-mirror/ngc-mirror/internal/manifest"
	"github.com/ngc-mirror/ngc-mirror/internal/names"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// Manifest is a manifest as served: its exact upstream bytes and media
// type. Hit reports that the bytes came from the cache (a revalidation
// may still have asked the upstream for the tag's digest).
type Manifest struct {
	MediaType string
	Digest    digest.Digest
	Body      []byte
	Hit       bool
}

// ErrInvalidReference is returned for a reference that is neither a tag
// nor a digest.
var ErrInvalidReference = errors.New("pull: invalid reference: want a tag or a digest")

// Manifest returns repository repo's manifest for ref, a tag or a digest.
//
// A digest is served from the cache, where it never goes stale, or fetched
// (verified against the digest) and cached. A tag confirmed by the upstream
// within Options.TagFreshness is served from the cache; an older one is
// revalidated with a HEAD (a GET when the digest changed or HEAD is
// refused), and when the upstream is unreachable, failing (5xx) or rate
// limiting the cached manifest is served stale. A 404 from the upstream
// forgets the tag. Errors are the upstream's (*upstream.Error, token and
// network errors; see IsAuthoritative), ErrInvalidReference, or ctx's.
// Every manifest returned is reported to Options.Cache as accessed.
func (s *Service) Manifest(ctx context.Context, repo, ref string) (Manifest, error) {
	if _, _, err := s.ups.Split(repo); err != nil {
		return Manifest{}, err
	}
	var m *storage.Manifest
	var hit bool
	var err error
	if dgst, derr := digest.Parse(ref); derr == nil {
		m, hit, err = s.manifestByDigest(ctx, repo, dgst)
	} else if !names.ValidTag(ref) {
		return Manifest{}, fmt.Errorf("%w: %q", ErrInvalidReference, ref)
	} else {
		m, hit, err = s.manifestByTag(ctx, repo, ref)
	}
	if err != nil {
		return Manifest{}, err
	}
	s.cache.Touch(storage.KindManifest, m.Digest)
	return Manifest{MediaType: m.MediaType, Digest: m.Digest, Body: m.Body, Hit: hit}, nil
}

// CachedManifest returns manifest dgst if the cache holds it, without
// asking the upstream and without link checks (for the admin API's view
// of the cache), or an error wrapping storage.ErrNotFound.
func (s *Service) CachedManifest(ctx context.Context, dgst digest.Digest) (Manifest, error) {
	m, err := s.store.GetManifest(ctx, dgst)
	if err != nil {
		return Manifest{}, err
	}
	return Manifest{MediaType: m.MediaType, Digest: m.Digest, Body: m.Body, Hit: true}, nil
}

// manifestByDigest serves a digest from the cache, which never goes stale,
// or fetches and caches it. Content-addressed: the digest is verified. hit
// reports whether the upstream was not asked.
func (s *Service) manifestByDigest(ctx context.Context, repo string, dgst digest.Digest) (m *storage.Manifest, hit bool, err error) {
	m, err = s.store.GetManifest(ctx, dgst)
	if err == nil {
		if err := s.checkLink(ctx, repo, dgst, storage.KindManifest); err != nil {
			return nil, false, err
		}
		return m, true, nil
	}
	if !errors.Is(err, storage.ErrNotFound) {
		s.log.Warn("cached manifest unreadable; refetching", "digest", dgst, "err", err)
	}
	return s.fetchManifest(ctx, repo, dgst)
}

// fetchManifest gets manifest dgst of repository repo from the upstream
// (one exchange however many ask at once, across replicas sharing the
// cache with Options.Leases) and caches and links it. fromCache reports
// that another replica fetched it and this one read it from the cache.
func (s *Service) fetchManifest(ctx context.Context, repo string, dgst digest.Digest) (m *storage.Manifest, fromCache bool, err error) {
	key := repo + "@" + dgst.String()
	v, err, _ := s.manifests.Do(key, func() (any, error) {
		ready := func(ctx context.Context) (*storage.Manifest, bool) { return s.cachedDigest(ctx, repo, dgst) }
		m, waited, err := s.once(ctx, s.repo(repo).String()+"@"+dgst.String(), ready, func() (*storage.Manifest, error) {
			ctx, cancel := s.upstreamContext(ctx)
			defer cancel()
			um, err := s.client(repo).GetManifest(ctx, s.path(repo), dgst.String(), nil)
			if err != nil {
				return nil, err
			}
			return s.cacheManifest(ctx, repo, um), nil
		})
		return fetched{m, waited}, err
	})
	if err != nil {
		return nil, false, err
	}
	r := v.(fetched)
	return r.m, r.fromCache, nil
}

// cacheManifest stores a verified manifest that the upstream served for
// repository repo. With CheckLinks it also links the manifest and
// everything it refers to (config, layers, index children) to repo, so
// that those are served under repo from the cache, also offline. A storage
// failure is logged, not returned: the manifest is still served and the
// next request tries again.
func (s *Service) cacheManifest(ctx context.Context, repo string, um *upstream.Manifest) *storage.Manifest {
	m := &storage.Manifest{MediaType: um.MediaType, Digest: um.Digest, Body: um.Body}
	if err := s.store.PutManifest(ctx, m.MediaType, m.Digest, m.Body); err != nil {
		s.log.Warn("caching manifest failed", "digest", m.Digest, "err", err)
	}
	if s.opts.CheckLinks {
		links := []digest.Digest{m.Digest}
		refs, _ := manifest.References(m.Body)
		for _, r := range refs {
			links = append(links, r.Digest)
		}
		if err := s.store.PutLinks(ctx, s.repo(repo), links...); err != nil {
			s.log.Warn("linking manifest content failed", "repository", repo, "digest", m.Digest, "err", err)
		}
	}
	return m
}

// checkLink makes sure content dgst, cached under some repository, may be
// served under repo: a link recorded from one of repo's manifests, or the
// upstream confirming that repo holds dgst (a blob HEAD; a manifest is
// fetched from repo and cached, which links it and its references).
// Without this, a client allowed on a public repository could read a
// private repository's cached blob by naming its digest. It does nothing
// without Options.CheckLinks. Content repo does not hold is reported as
// unknown (an upstream 404), the same answer as for content that does not
// exist. A refusal of the mirror's own credentials (the upstream's 401 or
// 403, or its token realm's) is returned as it is: it says nothing of the
// content, and the client is told DENIED, as for a manifest by tag.
func (s *Service) checkLink(ctx context.Context, repo string, dgst digest.Digest, k storage.Kind) error {
	if !s.opts.CheckLinks {
		return nil
	}
	if ok, err := s.store.HasLink(ctx, s.repo(repo), dgst); err == nil && ok {
		return nil
	}
	if k == storage.KindManifest {
		// A GET, not a HEAD: nvcr.io has refused manifest HEADs (403),
		// and caching the manifest under repo links what it refers to as
		// well, so its blobs need no HEAD each.
		_, _, err := s.fetchManifest(ctx, repo, dgst)
		return notHeld(err)
	}
	uctx, cancel := s.upstreamContext(ctx)
	defer cancel()
	_, err := s.client(repo).HeadBlob(uctx, s.path(repo), dgst)
	if err == nil {
		if lerr := s.store.PutLinks(ctx, s.repo(repo), dgst); lerr != nil {
			s.log.Warn("recording link failed", "repository", repo, "digest", dgst, "err", lerr)
		}
	}
	return notHeld(err)
}

// notHeld turns a link check's authoritative upstream answer err into
// errNotHeld, except a refusal of the mirror's credentials (upstream 401,
// 403 or 451; a token realm's 401 or 403), which it returns unchanged, as
// it does an outage and nil.
func notHeld(err error) error {
	refused := errors.Is(err, upstream.ErrUnauthorized) || errors.Is(err, upstream.ErrDenied) || auth.Refused(err)
	if err != nil && !refused && IsAuthoritative(err) {
		return errNotHeld
	}
	return err
}

// fetched is a manifest and whether another replica fetched it (this one
// read it from the shared cache).
type fetched struct {
	m         *storage.Manifest
	fromCache bool
}

// manifestByTag serves repo:tag (see Manifest). hit reports whether the
// manifest bytes came from the cache.
func (s *Service) manifestByTag(ctx context.Context, repo, tag string) (*storage.Manifest, bool, error) {
	rec, recErr := s.store.GetTag(ctx, s.repo(repo), tag)
	var cached *storage.Manifest
	if recErr == nil {
		if m, err := s.store.GetManifest(ctx, rec.Digest); err == nil {
			cached = m
			if time.Since(rec.ConfirmedAt) < s.freshness(repo) {
				return cached, true, nil
			}
		}
	}
	key := repo + ":" + tag
	v, err, _ := s.manifests.Do(key, func() (any, error) {
		asked := rec.ConfirmedAt // another replica's fetch confirms it later
		ready := func(ctx context.Context) (*storage.Manifest, bool) { return s.freshTag(ctx, repo, tag, asked) }
		m, waited, err := s.once(ctx, s.repo(repo).String()+":"+tag, ready, func() (*storage.Manifest, error) { return s.fetchTag(ctx, repo, tag, rec, cached) })
		return fetched{m, waited}, err
	})
	if err == nil {
		r := v.(fetched)
		return r.m, r.m == cached || r.fromCache, nil
	}
	if cached != nil && !IsAuthoritative(err) {
		s.log.Warn("upstream unavailable; serving cached tag", "repository", repo, "tag", tag,
			"digest", cached.Digest, "confirmed_at", rec.ConfirmedAt, "err", err)
		return cached, true, nil
	}
	if errors.Is(err, upstream.ErrNotFound) && recErr == nil {
		if derr := s.store.DeleteTag(context.WithoutCancel(ctx), s.repo(repo), tag); derr != nil {
			s.log.Warn("forgetting deleted tag failed", "repository", repo, "tag", tag, "err", derr)
		}
	}
	return nil, false, err
}

// fetchTag asks the upstream for repo:tag: a HEAD when a manifest is
// cached (rec, cached), confirming it when the digest is unchanged, else a
// GET whose manifest it caches and records.
func (s *Service) fetchTag(ctx context.Context, repo, tag string, rec storage.TagRecord, cached *storage.Manifest) (*storage.Manifest, error) {
	ctx, cancel := s.upstreamContext(ctx)
	defer cancel()
	if cached != nil {
		d, err := s.client(repo).HeadManifest(ctx, s.path(repo), tag, nil)
		if err == nil && d.Digest == cached.Digest {
			rec.ConfirmedAt = time.Now()
			if perr := s.store.PutTag(ctx, s.repo(repo), tag, rec); perr != nil {
				s.log.Warn("recording tag failed", "repository", repo, "tag", tag, "err", perr)
			}
			return cached, nil
		}
		if err != nil && !errors.Is(err, upstream.ErrDenied) && !errors.Is(err, upstream.ErrInvalidContent) {
			return nil, err // GET would fail the same way
		}
	}
	um, err := s.client(repo).GetManifest(ctx, s.path(repo), tag, nil)
	if err != nil {
		return nil, err
	}
	m := s.cacheManifest(ctx, repo, um)
	nrec := storage.TagRecord{Digest: m.Digest, MediaType: m.MediaType, Size: int64(len(m.Body)), ConfirmedAt: time.Now()}
	if perr := s.store.PutTag(ctx, s.repo(repo), tag, nrec); perr != nil {
		s.log.Warn("recording tag failed", "repository", repo, "tag", tag, "err", perr)
	}
	return m, nil
}
