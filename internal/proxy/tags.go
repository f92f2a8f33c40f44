package proxy

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strconv"

	"github.com/distribution/distribution/v3/registry/api/errcode"

	"github.com/ngc-mirror/ngc-mirror/internal/pull"
)

// maxTagPage caps n on tag lists, as CNCF Distribution does.
const maxTagPage = 10000

// serveTags answers GET /v2/<name>/tags/list[?n=N&last=T] (OCI distribution
// spec, "Listing Tags"). With n it is that page of the upstream's list (or
// of the tags this cache has seen while the upstream is down:
// pull.Service.Tags); without n the complete list (pull.Service.AllTags),
// the spec's "all tags", which nvcr.io would cut at its first page of 100.
// A next page is announced with a Link header that points at this mirror,
// never at the upstream. name is the repository as the request named it
// (the answer's name and Link), repo its qualified name (upstream.Set.Route).
func (h *Handler) serveTags(w http.ResponseWriter, r *http.Request, name, repo string) {
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

	var page pull.TagPage
	var err error
	if n == 0 {
		page, err = h.pull.AllTags(r.Context(), repo, last)
	} else {
		page, err = h.pull.Tags(r.Context(), repo, n, last)
	}
	if err != nil {
		if errors.Is(err, r.Context().Err()) && r.Context().Err() != nil {
			return // the client went away
		}
		writeError(w, toAPIError(err, kindTags))
		return
	}
	writeTagList(w, name, page.Tags, nextLink(name, page.Tags, page.More, n, q.Get("ns")))
}

// nextLink is the Link header announcing the page after tags, on this
// mirror ("" when there is none). It keeps the request's ns, which selects
// the upstream.
func nextLink(name string, tags []string, more bool, n int, ns string) string {
	if !more || len(tags) == 0 {
		return ""
	}
	next := url.Values{"last": {tags[len(tags)-1]}}
	if ns != "" {
		next.Set("ns", ns)
	}
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
