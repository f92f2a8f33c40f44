package ngctest

import (
	"net/http"
	"strconv"
	"time"
)

// Faults for SetFault. Each answers every request on every listener of a
// fake (registry, CDN, token realm); combine with IsCDN or IsAuth to aim
// at one. The requests are still recorded (Requests, Count).

// FailWith returns a fault that answers with status and an OCI error body
// whose code fits it: TOOMANYREQUESTS for 429 (without Retry-After: see
// RateLimited), UNAVAILABLE for 503, UNAUTHORIZED, DENIED, NAME_UNKNOWN for
// 401, 403, 404, else UNKNOWN.
func FailWith(status int) func(http.ResponseWriter, *http.Request) bool {
	code := "UNKNOWN"
	switch status {
	case http.StatusTooManyRequests:
		code = "TOOMANYREQUESTS"
	case http.StatusServiceUnavailable:
		code = "UNAVAILABLE"
	case http.StatusUnauthorized:
		code = "UNAUTHORIZED"
	case http.StatusForbidden:
		code = "DENIED"
	case http.StatusNotFound:
		code = "NAME_UNKNOWN"
	}
	return func(w http.ResponseWriter, r *http.Request) bool {
		writeErr(w, status, code, http.StatusText(status)+" (ngctest fault)")
		return true
	}
}

// RateLimited returns a fault that answers 429 TOOMANYREQUESTS with
// Retry-After in whole seconds (none when retryAfter is under a second).
func RateLimited(retryAfter time.Duration) func(http.ResponseWriter, *http.Request) bool {
	return func(w http.ResponseWriter, r *http.Request) bool {
		if s := int(retryAfter / time.Second); s > 0 {
			w.Header().Set("Retry-After", strconv.Itoa(s))
		}
		writeErr(w, http.StatusTooManyRequests, "TOOMANYREQUESTS", "too many requests (ngctest fault)")
		return true
	}
}

// DockerHubAbuseLimit imitates Docker Hub's overall (anti-abuse) rate limit,
// which, unlike the pull limit, answers 429 with a text/plain body
// "Too Many Requests (HAP429)." and Retry-After: 60 (as reported in
// docker/hub-feedback#1907).
func DockerHubAbuseLimit(w http.ResponseWriter, r *http.Request) bool {
	w.Header().Set("Content-Type", "text/plain")
	w.Header().Set("Retry-After", "60")
	w.WriteHeader(http.StatusTooManyRequests)
	_, _ = w.Write([]byte("Too Many Requests (HAP429).\n"))
	return true
}

// Offline is a fault that closes each connection without answering, as a
// host that is down or unreachable looks to a client (connection reset,
// EOF). Unlike Close, the listeners stay, so SetFault(nil) brings the fake
// back with its content and counters.
func Offline(w http.ResponseWriter, r *http.Request) bool {
	if hj, ok := w.(http.Hijacker); ok {
		if conn, _, err := hj.Hijack(); err == nil {
			_ = conn.Close()
			return true
		}
	}
	// No hijacking (HTTP/2): the best imitation left is a bare 502.
	w.WriteHeader(http.StatusBadGateway)
	return true
}
