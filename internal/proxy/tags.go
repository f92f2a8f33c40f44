package proxy

import (
	"encoding/json"
	"net/http"
	"net/url"
	"sort"
	"strconv"

	"github.com/distribution/distribution/v3/registry/api/errcode"
)

// maxTagPage caps n on tag lists, as CNCF Distribution does.
const maxTagPage = 10000

// serveTags answers GET /v2/<name>/tags/list[?n=N&last=T] (OCI distribution
// spec, "Listing Tags"). It asks the upstream; when the upstream is down it
// answers from the tags this cache has seen. A next page is announced with a
// Link header that points at this mirror, never at the upstream.
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

	var tags []string
	more := false
	ctx, cancel := h.upstreamContext(r.Context())
	defer cancel()
	page, err := h.up.ListTags(ctx, name, n, last)
	switch {
	case err == nil:
		tags, more = page.Tags, page.More
		if n > 0 && len(tags) > n { // an upstream that ignores n
			tags, more = tags[:n], true
		}
	case !isAuthoritative(err):
		cached, cerr := h.store.ListTags(r.Context(), name)
		if cerr != nil {
			writeError(w, toAPIError(err, kindTags))
			return
		}
		h.log.Warn("upstream unavailable; listing cached tags", "repository", name, "err", err)
		i := sort.SearchStrings(cached, last)
		if last != "" && i < len(cached) && cached[i] == last {
			i++
		}
		tags = cached[i:]
		if n > 0 && len(tags) > n {
			tags, more = tags[:n], true
		}
	default:
		writeError(w, toAPIError(err, kindTags))
		return
	}
	if tags == nil {
		tags = []string{}
	}
	link := ""
	if more && len(tags) > 0 {
		next := url.Values{"last": {tags[len(tags)-1]}}
		if n > 0 {
			next.Set("n", strconv.Itoa(n))
		}
		link = `</v2/` + name + `/tags/list?` + next.Encode() + `>; rel="next"`
	}
	writeTagList(w, name, tags, link)
}

func writeTagList(w http.ResponseWriter, name string, tags []string, link string) {
	if link != "" {
		w.Header().Set("Link", link)
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
