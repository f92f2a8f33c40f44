package storage

import (
	"context"
	"errors"

	"github.com/opencontainers/go-digest"
)

// maxKnownLinks bounds Store.links (about 100 bytes each).
const maxKnownLinks = 100_000

func (s *Store) knownLink(repo Repo, d digest.Digest) bool {
	s.linksMu.Lock()
	defer s.linksMu.Unlock()
	_, ok := s.links[repo.String()+"@"+string(d)]
	return ok
}

func (s *Store) rememberLink(repo Repo, d digest.Digest) {
	s.linksMu.Lock()
	defer s.linksMu.Unlock()
	if s.links == nil || len(s.links) >= maxKnownLinks {
		s.links = map[string]struct{}{}
	}
	s.links[repo.String()+"@"+string(d)] = struct{}{}
}

// PutLinks records that repository repo holds each of dgsts: content is
// cached once by digest, but is served under a repository only when it is
// known to belong to it.
func (s *Store) PutLinks(ctx context.Context, repo Repo, dgsts ...digest.Digest) error {
	for _, d := range dgsts {
		p, err := Path(LinkPath{repo, d})
		if err != nil {
			return err
		}
		if s.knownLink(repo, d) {
			continue
		}
		if _, err := s.d.Stat(ctx, p); err != nil {
			if err := s.putContent(ctx, p, nil); err != nil {
				return translate(err)
			}
		}
		s.rememberLink(repo, d)
	}
	return nil
}

// HasLink reports whether PutLinks recorded dgst for repo.
func (s *Store) HasLink(ctx context.Context, repo Repo, dgst digest.Digest) (bool, error) {
	p, err := Path(LinkPath{repo, dgst})
	if err != nil {
		return false, err
	}
	if s.knownLink(repo, dgst) {
		return true, nil
	}
	_, err = s.d.Stat(ctx, p)
	if err == nil {
		s.rememberLink(repo, dgst)
		return true, nil
	}
	if err = translate(err); errors.Is(err, ErrNotFound) {
		return false, nil
	}
	return false, err
}
