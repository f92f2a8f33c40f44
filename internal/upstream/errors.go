package upstream

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Sentinel errors that an *Error matches with errors.Is, by HTTP status.
var (
	ErrNotFound        = errors.New("upstream: not found")         // 404
	ErrUnauthorized    = errors.New("upstream: unauthorized")      // 401
	ErrDenied          = errors.New("upstream: denied")            // 403, 451
	ErrTooManyRequests = errors.New("upstream: too many requests") // 429
	ErrUnavailable     = errors.New("upstream: unavailable")       // 5xx
	// ErrInvalidContent means the upstream answered 2xx with content that
	// does not match what was asked for (wrong digest, size or type).
	ErrInvalidContent = errors.New("upstream: invalid content")
	// ErrNotRegistry means that what answered is not a registry: a 2xx
	// HTML page where a manifest, blob or tag list should be (a captive
	// portal or a misconfigured proxy on the uplink answers every request
	// that way), or a GET /v2/ without the Docker-Distribution-API-Version
	// header that every registry sends (OCI distribution spec, "Determining
	// Support"; Docker registry API v2).
	ErrNotRegistry = errors.New("upstream: not a registry (HTML or no registry API version); a captive portal or proxy may be in the way")
)

// maxErrorBody caps how much of an error response is read (bytes).
const maxErrorBody = 64 << 10

// ErrorInfo is one entry of the OCI error envelope {"errors":[...]}.
type ErrorInfo struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Error is a non-success answer from the upstream registry. It carries the
// status, the parsed OCI error entries (if the body had them) and the
// Retry-After delay of a 429 or 503 (zero when absent).
type Error struct {
	Method     string
	Path       string // request path, never the query (signed URLs carry secrets there)
	StatusCode int
	Errors     []ErrorInfo
	RetryAfter time.Duration
}

func (e *Error) Error() string {
	msg := fmt.Sprintf("upstream %s %s: %d %s", e.Method, e.Path, e.StatusCode, http.StatusText(e.StatusCode))
	if len(e.Errors) > 0 {
		msg += ": " + e.Errors[0].Code
	}
	return msg
}

// Is maps the status to this package's sentinels.
func (e *Error) Is(target error) bool {
	switch target {
	case ErrNotFound:
		return e.StatusCode == http.StatusNotFound
	case ErrUnauthorized:
		return e.StatusCode == http.StatusUnauthorized
	case ErrDenied:
		return e.StatusCode == http.StatusForbidden || e.StatusCode == http.StatusUnavailableForLegalReasons
	case ErrTooManyRequests:
		return e.StatusCode == http.StatusTooManyRequests
	case ErrUnavailable:
		return e.StatusCode >= 500
	}
	return false
}

// checkResponse returns nil for 2xx, otherwise an *Error built from resp
// (whose body it drains and closes).
func checkResponse(resp *http.Response, now time.Time) error {
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return nil
	}
	defer resp.Body.Close()
	e := &Error{Method: resp.Request.Method, Path: resp.Request.URL.Path, StatusCode: resp.StatusCode}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	var env struct {
		Errors []ErrorInfo `json:"errors"`
	}
	if json.Unmarshal(body, &env) == nil {
		e.Errors = env.Errors
	}
	e.RetryAfter = parseRetryAfter(resp.Header.Get("Retry-After"), now)
	if e.RetryAfter == 0 && resp.StatusCode == http.StatusTooManyRequests {
		// Without Retry-After, the RateLimit-Reset header of the IETF
		// httpapi draft (draft-ietf-httpapi-ratelimit-headers: seconds
		// until the quota resets), which some registries send instead.
		e.RetryAfter = parseRetryAfter(strings.TrimSpace(resp.Header.Get("RateLimit-Reset")), now)
	}
	return e
}

// parseRetryAfter reads a Retry-After value in seconds or as an HTTP date
// (RFC 9110 section 10.2.3). It returns 0 when absent or unparseable.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil && s >= 0 {
		// Clamp (to a year) before multiplying: a huge value would
		// overflow Duration. The client's own backoff is capped lower.
		return time.Duration(min(s, 365*24*3600)) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// StatusNotRegistry is the status Client.OnRequest receives for an answer
// that was not a registry's (an HTML page, whatever its HTTP status; see
// ErrNotRegistry). It equals metrics.StatusNotRegistry.
const StatusNotRegistry = -2
