package proxy_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

func tagList(t *testing.T, r result) []string {
	t.Helper()
	mustOK(t, r, 200)
	var body struct {
		Name string
		Tags []string
	}
	if err := json.Unmarshal(r.body, &body); err != nil || body.Tags == nil {
		t.Fatalf("tag list %s: %v", r.body, err)
	}
	return body.Tags
}

// TestCompleteTagList: a repository with more tags than the upstream's page
// (nvcr.io: 100) is listed whole without n, merged from the upstream's Link
// pages; last works on the whole list; the merged list is served from the
// cache within the tag freshness and stale when the upstream fails; with n
// the answer is paged as before.
func TestCompleteTagList(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{tagFreshness: time.Hour})
	want := []string{ngctest.CUDATag}
	for i := range 250 {
		tag := fmt.Sprintf("t%03d", i)
		e.up.AddTag(ngctest.CUDARepo, tag, e.fx.CUDA.Manifest.Digest)
		want = append(want, tag)
	}
	sort.Strings(want)
	path := "/v2/" + ngctest.CUDARepo + "/tags/list"
	count := func() int { // answered pages (not the first 401 of each token)
		n := 0
		for _, r := range e.up.Requests() {
			if r.Host == "registry" && r.Path == path && r.Auth == "Bearer" {
				n++
			}
		}
		return n
	}

	r := e.do(t, http.MethodGet, path)
	if got := tagList(t, r); !slices.Equal(got, want) || r.header.Get("Link") != "" {
		t.Fatalf("without n: %d tags (Link %q), want all %d", len(got), r.header.Get("Link"), len(want))
	}
	if n := count(); n != 3 {
		t.Fatalf("upstream pages asked: %d, want 3 (100 a page)", n)
	}
	// Within the freshness: from the cache, last applied to the whole list.
	if got := tagList(t, e.do(t, http.MethodGet, path+"?last=t199")); !slices.Equal(got, want[slices.Index(want, "t199")+1:]) {
		t.Fatalf("last=t199: %v", got)
	}
	if n := count(); n != 3 {
		t.Fatalf("a fresh tag list was asked again: %d upstream requests", n)
	}
	// With n: paged by the upstream, as before, Link to the mirror.
	r = e.do(t, http.MethodGet, path+"?n=10")
	if got := tagList(t, r); !slices.Equal(got, want[:10]) || r.header.Get("Link") != `</v2/nvidia/cuda/tags/list?last=t008&n=10>; rel="next"` {
		t.Fatalf("n=10: %v, Link %q", got, r.header.Get("Link"))
	}
	// Stale: the upstream fails, the cached merged list is served.
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		w.WriteHeader(http.StatusServiceUnavailable)
		return true
	})
	tl, err := e.store.GetTagList(t.Context(), e.repo(ngctest.CUDARepo))
	if err != nil || !tl.Complete || len(tl.Tags) != len(want) {
		t.Fatalf("cached tag list: %+v %v", tl, err)
	}
	tl.ConfirmedAt = time.Now().Add(-2 * time.Hour) // past the freshness
	if err := e.store.PutTagList(t.Context(), e.repo(ngctest.CUDARepo), tl); err != nil {
		t.Fatal(err)
	}
	if got := tagList(t, e.do(t, http.MethodGet, path)); !slices.Equal(got, want) {
		t.Fatalf("stale: %d tags, want %d", len(got), len(want))
	}
	if n := count(); n != 5 { // 3 pages, n=10, the failed revalidation
		t.Fatalf("the stale list was not revalidated first: %d upstream requests", n)
	}
}

// TestTagListPageBound: a list longer than Options.TagListMaxPages pages is
// cut there, with a Link (on the mirror) to the rest.
func TestTagListPageBound(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{tagListMaxPages: 2})
	for i := range 250 {
		e.up.AddTag(ngctest.CUDARepo, fmt.Sprintf("t%03d", i), e.fx.CUDA.Manifest.Digest)
	}
	r := e.do(t, http.MethodGet, "/v2/"+ngctest.CUDARepo+"/tags/list")
	got := tagList(t, r)
	if len(got) != 2*ngctest.TagPageSize || r.header.Get("Link") != `</v2/nvidia/cuda/tags/list?last=`+got[len(got)-1]+`>; rel="next"` {
		t.Fatalf("bounded list: %d tags, Link %q", len(got), r.header.Get("Link"))
	}
	// Following the Link gets the rest.
	r = e.do(t, http.MethodGet, "/v2/"+ngctest.CUDARepo+"/tags/list?last="+got[len(got)-1])
	rest := tagList(t, r)
	if all := append(got, rest...); len(all) != 251 || !sort.StringsAreSorted(all) || r.header.Get("Link") != "" {
		t.Fatalf("after the Link: %d more tags (Link %q), want the remaining %d", len(rest), r.header.Get("Link"), 251-len(got))
	}
}
