package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// maxTagPage caps n on tag lists, as CNCF Distribution does.
const maxTagPage = 10000

// serveTags answers GET /v2/<name>/tags/list[?n=N&last=T] (OCI distribution
// spec, "Listing Tags"). With n it asks the upstream for that page; when
// the upstream is down it answers from the tags this cache has seen.
// Without n it answers the complete list (completeTags): the spec's "all
// tags", which nvcr.io would cut at its first page of 100. A next page is
// announced with a Link header that points at this mirror, never at the
// upstream.
func (h *Handler) serveTags(w http.ResponseWriter, r *http.Request, name string) {
	q := r.URL.Query()
	n := 0
	if v := q.Get("n"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 0 || n > maxTagPage {
			writeError(w, newAPIError(errcode.ErrorCodePaginationNumberInvalid, "n must be an integer from 0 to "+strconv.Itoa(maxTagPage)))
			return
		}
	}
	last := q.Get("last")
	if q.Has("n") && n == 0 {
		// n=0 asks for no tags (OCI distribution spec, "Listing Tags").
		writeTagList(w, name, []string{}, "")
		return
	}
	if n == 0 {
		h.serveAllTags(w, r, name, last)
		return
	}

	var tags []string
	more := false
	ctx, cancel := h.upstreamContext(r.Context())
	defer cancel()
	page, err := h.up.ListTags(ctx, name, n, last)
	switch {
	case err == nil:
		tags, more = page.Tags, page.More
		if len(tags) > n { // an upstream that ignores n
			tags, more = tags[:n], true
		}
	case !isAuthoritative(err):
		cached, cerr := h.store.ListTags(r.Context(), name)
		if cerr != nil {
			writeError(w, toAPIError(err, kindTags))
			return
		}
		h.log.Warn("upstream unavailable; listing cached tags", "repository", name, "err", err)
		tags = after(cached, last)
		if len(tags) > n {
			tags, more = tags[:n], true
		}
	default:
		writeError(w, toAPIError(err, kindTags))
		return
	}
	writeTagList(w, name, tags, nextLink(name, tags, more, n))
}

// serveAllTags answers a tag list request without n: every tag after last.
func (h *Handler) serveAllTags(w http.ResponseWriter, r *http.Request, name, last string) {
	tl, err := h.completeTags(r.Context(), name)
	if err != nil {
		if errors.Is(err, r.Context().Err()) && r.Context().Err() != nil {
			return // the client went away
		}
		writeError(w, toAPIError(err, kindTags))
		return
	}
	tags := after(tl.Tags, last)
	if !tl.Complete && len(tags) == 0 && last != "" {
		// Past the end of a list cut at the page bound (a client following
		// the Link below): the next pages from the upstream, uncached.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 4*h.opts.ManifestTimeout)
		defer cancel()
		if tags, tl.Complete, err = h.up.ListAllTags(ctx, name, last, h.opts.TagListMaxPages); err != nil {
			writeError(w, toAPIError(err, kindTags))
			return
		}
	}
	// Cut at the page bound: the rest is one request away, from here.
	writeTagList(w, name, tags, nextLink(name, tags, !tl.Complete, 0))
}

// completeTags returns repository name's complete tag list: from the cache
// while the upstream confirmed it within TagFreshness, else merged from
// all of the upstream's Link pages (at most Options.TagListMaxPages; one
// exchange however many ask at once) and cached. When the upstream is
// unreachable, failing or rate limiting, the cached list is served stale,
// or, without one, the tags this cache holds records of; an authoritative
// answer (404, denied) is returned as the error.
func (h *Handler) completeTags(ctx context.Context, name string) (storage.TagList, error) {
	cached, cerr := h.store.GetTagList(ctx, name)
	if cerr == nil && time.Since(cached.ConfirmedAt) < h.opts.TagFreshness {
		return cached, nil
	}
	// The key cannot collide with a manifest's (no name has a space).
	v, err, _ := h.manifests.Do(name+" tags", func() (any, error) {
		// Shared by every client asking; a listing of many pages gets four
		// times one manifest exchange's bound.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 4*h.opts.ManifestTimeout)
		defer cancel()
		tags, complete, err := h.up.ListAllTags(ctx, name, "", h.opts.TagListMaxPages)
		if err != nil {
			return nil, err
		}
		if tags == nil {
			tags = []string{}
		}
		tl := storage.TagList{Tags: tags, Complete: complete, ConfirmedAt: time.Now()}
		if !complete {
			h.log.Warn("tag list cut at the page bound", "repository", name, "tags", len(tags), "pages", h.opts.TagListMaxPages)
		}
		if perr := h.store.PutTagList(ctx, name, tl); perr != nil {
			h.log.Warn("caching tag list failed", "repository", name, "err", perr)
		}
		return tl, nil
	})
	if err == nil {
		return v.(storage.TagList), nil
	}
	if isAuthoritative(err) {
		return storage.TagList{}, err
	}
	if cerr == nil {
		h.log.Warn("upstream unavailable; serving cached tag list", "repository", name, "confirmed_at", cached.ConfirmedAt, "err", err)
		return cached, nil
	}
	if known, kerr := h.store.ListTags(ctx, name); kerr == nil {
		h.log.Warn("upstream unavailable; listing cached tags", "repository", name, "err", err)
		return storage.TagList{Tags: known, Complete: true}, nil
	}
	return storage.TagList{}, err
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

// nextLink is the Link header announcing the page after tags, on this
// mirror ("" when there is none).
func nextLink(name string, tags []string, more bool, n int) string {
	if !more || len(tags) == 0 {
		return ""
	}
	next := url.Values{"last": {tags[len(tags)-1]}}
	if n > 0 {
		next.Set("n", strconv.Itoa(n))
	}
	return `</v2/` + name + `/tags/list?` + next.Encode() + `>; rel="next"`
}

func writeTagList(w http.ResponseWriter, name string, tags []string, link string) {
	if link != "" {
		w.Header().Set("Link", link)
	}
	if tags == nil {
		tags = []string{}
	}
	body, _ := json.Marshal(struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}{name, tags})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}
