package proxy

import (
	"net/http"
	"strings"

	"github.com/distribution/distribution/v3/registry/api/errcode"
)

// RejectDotSegments answers 400 NAME_INVALID, in the OCI error envelope,
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
