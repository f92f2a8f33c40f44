package pull

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/lease"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// Manifest fetches once across replicas: replicas that share a cache (one
// bucket) and a state store (Redis) take a short lease per manifest (and
// per complete tag list) before asking the upstream, so that a cold tag or
// digest asked of all of them at once is fetched by one; the others wait
// for it to land in the shared cache and read it from there.

// Leases is what the service needs of the state store to coordinate
// manifest fetches with other replicas (*state.Redis): named leases.
type Leases = lease.Locker

// Bounds of a manifest lease.
const (
	// manifestLeaseTTL is how long a lease lasts unless its holder ends
	// it: a replica that dies holding one delays the others at most this
	// long, and one slower than this shares the fetch with a second.
	manifestLeaseTTL = 15 * time.Second
	leaseTimeout     = time.Second // one Lock or Unlock call
)

// replicaOwner names this process in manifest leases.
func replicaOwner() string {
	host, _ := os.Hostname()
	var b [4]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%s-%d-%x", host, os.Getpid(), b)
}

// once runs fetch as the only replica fetching key, or waits for the
// replica that is: every poll, ready looks for what it put in the shared
// cache (returning ok when it is there); when the holder gives the lease
// up (it failed) or its lease expires, this replica takes it and
// fetches itself. Without Options.Leases, or when the state store does not
// answer, it fetches at once.
func (s *Service) once(ctx context.Context, key string, ready func(ctx context.Context) (*storage.Manifest, bool),
	fetch func() (*storage.Manifest, error)) (m *storage.Manifest, waited bool, err error) {
	return onceAcross(ctx, s, key, ready, fetch)
}

// onceAcross is once for any result: ready looks for it in the shared
// cache.
func onceAcross[T any](ctx context.Context, s *Service, key string, ready func(ctx context.Context) (T, bool),
	fetch func() (T, error)) (v T, waited bool, err error) {
	if s.opts.Leases == nil {
		v, err = fetch()
		return v, false, err
	}
	// Like the fetch, the wait serves every caller joined to it: not
	// cut short by the first one leaving.
	ctx, cancel := s.upstreamContext(ctx)
	defer cancel()
	name := "manifest:" + s.opts.LeaseScope + ":" + key
	wait := 20 * time.Millisecond
	for {
		lctx, cancel := context.WithTimeout(ctx, leaseTimeout)
		ok, err := s.opts.Leases.Lock(lctx, name, s.owner, manifestLeaseTTL)
		cancel()
		if err != nil || ok {
			if err != nil && ctx.Err() == nil {
				s.log.Debug("manifest lease not available; fetching without it", "key", key, "err", err)
			}
			v, err = fetch()
			if ok {
				uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), leaseTimeout)
				_ = s.opts.Leases.Unlock(uctx, name, s.owner)
				cancel()
			}
			return v, false, err
		}
		// Another replica is fetching it.
		select {
		case <-ctx.Done():
			return v, false, ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, 250*time.Millisecond)
		if got, ok := ready(ctx); ok {
			return got, true, nil
		}
	}
}

// freshTag reports the cached manifest of repo:tag when its record was
// confirmed since after (by another replica's fetch) and within the
// freshness window.
func (s *Service) freshTag(ctx context.Context, repo, tag string, after time.Time) (*storage.Manifest, bool) {
	rec, err := s.store.GetTag(ctx, s.repo(repo), tag)
	if err != nil || !rec.ConfirmedAt.After(after) || time.Since(rec.ConfirmedAt) >= s.freshness(repo) {
		return nil, false
	}
	m, err := s.store.GetManifest(ctx, rec.Digest)
	if err != nil {
		return nil, false
	}
	return m, true
}

// freshTagList reports repo's cached tag list when it was confirmed since
// after (by another replica's listing) and within the freshness window.
func (s *Service) freshTagList(ctx context.Context, repo string, after time.Time) (storage.TagList, bool) {
	tl, err := s.store.GetTagList(ctx, s.repo(repo))
	if err != nil || !tl.ConfirmedAt.After(after) || time.Since(tl.ConfirmedAt) >= s.freshness(repo) {
		return storage.TagList{}, false
	}
	return tl, true
}

// cachedDigest reports manifest dgst once another replica cached it (and,
// with CheckLinks, linked it to repo).
func (s *Service) cachedDigest(ctx context.Context, repo string, dgst digest.Digest) (*storage.Manifest, bool) {
	m, err := s.store.GetManifest(ctx, dgst)
	if err != nil {
		return nil, false
	}
	if s.opts.CheckLinks {
		if ok, err := s.store.HasLink(ctx, s.repo(repo), dgst); err != nil || !ok {
			return nil, false
		}
	}
	return m, true
}
