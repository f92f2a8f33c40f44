package proxy

import (
	"net/http"
	"strconv"
	"strings"

	"github.com/distribution/distribution/v3/registry/api/errcode"

	"github.com/ngc-mirror/ngc-mirror/internal/ocierr"
)

// RejectDotSegments answers 400 NAME_INVALID (BAD_REQUEST under /admin/,
// "not a job ID" under its jobs/), in the OCI error envelope,
// to any request whose path has a "." or ".." segment, written plainly or
// percent-encoded ("%2e%2e", "%2E."), or an empty segment ("//"), and
// passes every other request to next. Wrap the whole server with it (registry API, admin API, token
// endpoint): net/http's ServeMux otherwise cleans such a path and redirects
// to the result before any route sees it, so that
// /v2/nvidia/../pytorch/manifests/x would be answered with a redirect to
// another repository, /v2/pytorch. A repository name never has such a
// segment (distribution/reference grammar), and RFC 3986's dot-segment
// removal is for relative references, not for what a registry client sends.
// observe, when not nil, wraps the refusals (Handler.Observe: metrics and
// the access log), so that they are logged like every registry request.
func RejectDotSegments(next http.Handler, observe func(http.Handler) http.Handler) http.Handler {
	var refuse http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The admin API's paths hold job IDs and its own words, no
		// repository names: say so in its code (admin.Prefix).
		if rest, ok := strings.CutPrefix(r.URL.Path, "/admin/v1/jobs/"); ok {
			ocierr.Write(w, http.StatusBadRequest, ocierr.New("BAD_REQUEST",
				strconv.Quote(strings.TrimSuffix(rest, "/cancel"))+` is not a job ID (it has a "." or ".." or empty path segment)`))
			return
		}
		if strings.HasPrefix(r.URL.Path, "/admin/") {
			ocierr.Write(w, http.StatusBadRequest, ocierr.New("BAD_REQUEST", `a "." or ".." or empty path segment is not allowed in an admin API path`))
			return
		}
		w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
		if hasDotSegment(r.URL.Path) {
			writeError(w, newAPIError(errcode.ErrorCodeNameInvalid, `a path segment "." or ".." is not allowed in a repository name`))
			return
		}
		// ServeMux would redirect to the cleaned path, an HTML answer.
		writeError(w, newAPIError(errcode.ErrorCodeNameInvalid, `an empty path segment ("//") is not allowed in a repository name`))
	})
	if observe != nil {
		refuse = observe(refuse)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// URL.Path is decoded, so encoded dots (and an encoded '/' around
		// them) are seen as what they stand for.
		if hasDotSegment(r.URL.Path) || strings.Contains(r.URL.Path, "//") {
			refuse.ServeHTTP(w, r)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func hasDotSegment(p string) bool {
	for seg := range strings.SplitSeq(p, "/") {
		if seg == "." || seg == ".." {
			return true
		}
	}
	return false
}
