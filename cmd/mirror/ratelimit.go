package main

import (
	"net/http"
	"time"

	"github.com/go-chi/httprate"

	"github.com/ngc-mirror/ngc-mirror/internal/clientip"
	"github.com/ngc-mirror/ngc-mirror/internal/ocierr"
)

// rateLimited wraps next with limits.requests_per_second: perSecond
// requests per client address (IPv6 by /64), as clientip resolved it
// (behind a balancer in server.trusted_proxies, the X-Forwarded-For
// client). A request over the limit gets 429 with Retry-After and the
// OCI error envelope (code TOOMANYREQUESTS, the code of the distribution
// spec's error table), like every other error of the registry API.
//
// The operational endpoints (/healthz, /readyz, /metrics) are not counted
// nor limited: a container health check, a balancer's readiness probe or a
// Prometheus scrape must not fail because clients from the same address
// (all of them, behind a balancer not in trusted_proxies) are busy.
//
// observe wraps the 429 answer (proxy.Handler.Observe): a limited request
// is counted and gets its access-log line, so an operator sees who is
// throttled.
func rateLimited(perSecond int, observe func(http.Handler) http.Handler, next http.Handler) http.Handler {
	tooMany := observe(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		// httprate has set Retry-After (seconds) already.
		ocierr.Write(w, http.StatusTooManyRequests, ocierr.New("TOOMANYREQUESTS",
			"too many requests from this client; retry after the Retry-After seconds (limits.requests_per_second)"))
	}))
	limited := httprate.Limit(perSecond, time.Second,
		httprate.WithKeyFuncs(func(r *http.Request) (string, error) {
			return httprate.CanonicalizeIP(clientip.Of(r)), nil
		}),
		httprate.WithLimitHandler(tooMany.ServeHTTP),
	)(next)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/healthz", "/readyz", "/metrics":
			next.ServeHTTP(w, r)
		default:
			limited.ServeHTTP(w, r)
		}
	})
}
