package proxy_test

import (
	"net/http"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/access"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

// TestBaseWithoutSlash: /v2 is answered as distribution answers it (its
// router's StrictSlash): 301 to /v2/, the query kept, with the API version
// header, for GET and HEAD, before any authentication; following it gets
// /v2/'s answer.
func TestBaseWithoutSlash(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	for _, m := range []string{http.MethodGet, http.MethodHead} {
		for _, q := range []string{"", "?ns=nvcr.io"} {
			req, _ := http.NewRequestWithContext(t.Context(), m, e.mirror.URL+"/v2"+q, nil)
			resp, err := noFollow.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusMovedPermanently || resp.Header.Get("Location") != "/v2/"+q ||
				resp.Header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
				t.Fatalf("%s /v2%s: %d %v", m, q, resp.StatusCode, resp.Header)
			}
		}
	}
	r := e.do(t, http.MethodGet, "/v2")
	mustOK(t, r, 200)
	if string(r.body) != "{}" || r.header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
		t.Fatalf("/v2 followed: %q %v", r.body, r.header)
	}
	// With client authentication on, the redirect still comes first, and
	// /v2/ then challenges.
	auth := newEnv(t, envOpts{access: policy(t, access.Config{Mode: access.ModeHtpasswd, HtpasswdFile: ngctest.WriteHtpasswd(t, "alice", "alice-pw")}, nil)})
	r = auth.do(t, http.MethodGet, "/v2")
	if r.status != http.StatusUnauthorized || r.header.Get("Www-Authenticate") == "" || r.header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
		t.Fatalf("/v2 followed, authentication on: %d %v", r.status, r.header)
	}
}
