package pull

import (
	"context"
	"sort"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// TagPage is one page of a repository's tag list.
type TagPage struct {
	Tags []string // in the upstream's order (lexical from the cache)
	More bool     // a next page exists: ask again with last = the last tag
}

// Tags lists at most n (> 0) tags of repository repo after last
// (exclusive; "" from the start): one page of the upstream's. When the
// upstream is unreachable, failing or rate limiting it answers from the
// tags this cache has recorded. Errors are the upstream's (see
// IsAuthoritative) when the cache has no tags of repo.
func (s *Service) Tags(ctx context.Context, repo string, n int, last string) (TagPage, error) {
	if _, _, err := s.ups.Split(repo); err != nil {
		return TagPage{}, err
	}
	uctx, cancel := s.upstreamContext(ctx)
	defer cancel()
	page, err := s.client(repo).ListTags(uctx, s.path(repo), n, last)
	if err == nil {
		p := TagPage{Tags: page.Tags, More: page.More}
		if len(p.Tags) > n { // an upstream that ignores n
			p.Tags, p.More = p.Tags[:n], true
		}
		return p, nil
	}
	if IsAuthoritative(err) {
		return TagPage{}, err
	}
	cached, cerr := s.store.ListTags(ctx, s.repo(repo))
	if cerr != nil {
		return TagPage{}, err
	}
	s.log.Warn("upstream unavailable; listing cached tags", "repository", repo, "err", err)
	p := TagPage{Tags: after(cached, last)}
	if len(p.Tags) > n {
		p.Tags, p.More = p.Tags[:n], true
	}
	return p, nil
}

// AllTags lists every tag of repository repo after last (the OCI spec's
// list without n, which nvcr.io would cut at its first page of 100), from
// the complete list (completeTags). More reports a list cut at
// Options.TagListMaxPages: asking again after its last tag lists the next
// upstream pages from there (uncached).
func (s *Service) AllTags(ctx context.Context, repo, last string) (TagPage, error) {
	if _, _, err := s.ups.Split(repo); err != nil {
		return TagPage{}, err
	}
	tl, err := s.completeTags(ctx, repo)
	if err != nil {
		return TagPage{}, err
	}
	tags := after(tl.Tags, last)
	if !tl.Complete && len(tags) == 0 && last != "" {
		// Past the end of a list cut at the page bound (a client following
		// the next-page link): the next pages from the upstream.
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 4*s.opts.UpstreamTimeout)
		defer cancel()
		if tags, tl.Complete, err = s.client(repo).ListAllTags(uctx, s.path(repo), last, s.opts.TagListMaxPages); err != nil {
			return TagPage{}, err
		}
	}
	return TagPage{Tags: tags, More: !tl.Complete}, nil
}

// completeTags returns repository repo's complete tag list: from the cache
// while the upstream confirmed it within TagFreshness, else merged from
// all of the upstream's Link pages (at most Options.TagListMaxPages; one
// exchange however many ask at once) and cached. When the upstream is
// unreachable, failing or rate limiting, the cached list is served stale,
// or, without one, the tags this cache holds records of; an authoritative
// answer (404, denied) is returned as the error.
func (s *Service) completeTags(ctx context.Context, repo string) (storage.TagList, error) {
	cached, cerr := s.store.GetTagList(ctx, s.repo(repo))
	if cerr == nil && time.Since(cached.ConfirmedAt) < s.freshness(repo) {
		return cached, nil
	}
	// The key cannot collide with a manifest's (no name has a space).
	v, err, _ := s.manifests.Do(repo+" tags", func() (any, error) {
		// Once across replicas sharing the cache, as manifests.
		ready := func(ctx context.Context) (storage.TagList, bool) {
			return s.freshTagList(ctx, repo, cached.ConfirmedAt)
		}
		tl, _, err := onceAcross(ctx, s, s.repo(repo).String()+" tags", ready, func() (storage.TagList, error) { return s.listTags(ctx, repo) })
		return tl, err
	})
	if err == nil {
		return v.(storage.TagList), nil
	}
	if IsAuthoritative(err) {
		return storage.TagList{}, err
	}
	if cerr == nil {
		s.log.Warn("upstream unavailable; serving cached tag list", "repository", repo, "confirmed_at", cached.ConfirmedAt, "err", err)
		return cached, nil
	}
	if known, kerr := s.store.ListTags(ctx, s.repo(repo)); kerr == nil {
		s.log.Warn("upstream unavailable; listing cached tags", "repository", repo, "err", err)
		return storage.TagList{Tags: known, Complete: true}, nil
	}
	return storage.TagList{}, err
}

// listTags merges repo's tag list from the upstream's pages and caches it.
func (s *Service) listTags(ctx context.Context, repo string) (storage.TagList, error) {
	// Shared by every caller; a listing of many pages gets four times one
	// manifest exchange's bound.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 4*s.opts.UpstreamTimeout)
	defer cancel()
	tags, complete, err := s.client(repo).ListAllTags(ctx, s.path(repo), "", s.opts.TagListMaxPages)
	if err != nil {
		return storage.TagList{}, err
	}
	if tags == nil {
		tags = []string{}
	}
	tl := storage.TagList{Tags: tags, Complete: complete, ConfirmedAt: time.Now()}
	if !complete {
		s.log.Warn("tag list cut at the page bound", "repository", repo, "tags", len(tags), "pages", s.opts.TagListMaxPages)
	}
	if perr := s.store.PutTagList(ctx, s.repo(repo), tl); perr != nil {
		s.log.Warn("caching tag list failed", "repository", repo, "err", perr)
	}
	return tl, nil
}

// after returns the tags of sorted list that come after last in lexical
// order (all of them when last is "").
func after(sorted []string, last string) []string {
	if last == "" {
		return sorted
	}
	i := sort.SearchStrings(sorted, last)
	if i < len(sorted) && sorted[i] == last {
		i++
	}
	return sorted[i:]
}
