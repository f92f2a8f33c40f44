package proxy

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strconv"

	"github.com/distribution/distribution/v3/registry/api/errcode"

	"github.com/ngc-mirror/ngc-mirror/internal/auth"
	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/ocierr"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// apiError is an error with the OCI error code and HTTP status to answer it
// with. Its message is ours, written for the client; it never carries
// internal or upstream text.
type apiError struct {
	code       errcode.ErrorCode
	status     int
	message    string
	retryAfter string // Retry-After header value, if any
}

func (e *apiError) Error() string { return e.code.String() + ": " + e.message }

func newAPIError(code errcode.ErrorCode, message string) *apiError {
	return &apiError{code: code, status: code.Descriptor().HTTPStatusCode, message: message}
}

// kind says what a request asked for, to pick the "unknown" code.
type kind int

const (
	kindManifest kind = iota + 1
	kindBlob
	kindTags
)

// toAPIError maps an internal error to what the client is told:
//
//	upstream 404                      → MANIFEST_UNKNOWN / BLOB_UNKNOWN / NAME_UNKNOWN 404
//	upstream 401/403/451, token refusal → DENIED 403 (the mirror's upstream credentials do not grant access)
//	upstream 429                      → TOOMANYREQUESTS 429 with the upstream's Retry-After
//	upstream 5xx, bad content, network → UNAVAILABLE 502 (503 if the upstream said 503, 504 on timeouts)
//	an HTML page instead of content    → UNAVAILABLE 502 (a captive portal or proxy on the uplink)
//	no configured upstream serves it  → NAME_UNKNOWN 404 (upstream.ErrNameUnknown)
//	anything else                     → UNKNOWN 500
func toAPIError(err error, k kind) *apiError {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae
	}
	var ue *upstream.Error
	errors.As(err, &ue)
	var te *auth.TokenError
	var ne net.Error
	switch {
	case errors.Is(err, pull.ErrBusy):
		msg := "too many blob downloads in progress; retry shortly"
		var be *pull.BusyError
		if errors.As(err, &be) {
			msg = "too many blob downloads in progress (the mirror's " + be.Bound + "); retry shortly"
		}
		e := newAPIError(errcode.ErrorCodeUnavailable, msg)
		e.retryAfter = "5"
		return e
	case errors.Is(err, pull.ErrGone):
		return newAPIError(errcode.ErrorCodeUnavailable, "the blob was removed while being served; retry")
	case errors.Is(err, upstream.ErrNameUnknown):
		return newAPIError(errcode.ErrorCodeNameUnknown, "no upstream of this mirror serves this repository")
	case errors.Is(err, upstream.ErrNotFound):
		switch k {
		case kindManifest:
			return newAPIError(errcode.ErrorCodeManifestUnknown, "manifest unknown to the upstream registry")
		case kindBlob:
			return newAPIError(errcode.ErrorCodeBlobUnknown, "blob unknown to the upstream registry")
		default:
			return newAPIError(errcode.ErrorCodeNameUnknown, "repository unknown to the upstream registry")
		}
	case errors.Is(err, upstream.ErrUnauthorized), errors.Is(err, upstream.ErrDenied):
		return newAPIError(errcode.ErrorCodeDenied, "the upstream registry refused the mirror access to this repository ("+strconv.Itoa(ue.StatusCode)+")")
	case errors.As(err, &te) && (te.StatusCode == http.StatusUnauthorized || te.StatusCode == http.StatusForbidden):
		return newAPIError(errcode.ErrorCodeDenied, "the upstream token service refused the mirror's credentials")
	case errors.Is(err, upstream.ErrTooManyRequests):
		e := newAPIError(errcode.ErrorCodeTooManyRequests, "the upstream registry is rate limiting the mirror")
		if ue.RetryAfter > 0 {
			e.retryAfter = strconv.Itoa(int((ue.RetryAfter + 999_999_999) / 1_000_000_000))
		}
		return e
	case errors.Is(err, upstream.ErrUnavailable):
		e := newAPIError(errcode.ErrorCodeUnavailable, "the upstream registry failed ("+strconv.Itoa(ue.StatusCode)+")")
		if ue.StatusCode != http.StatusServiceUnavailable {
			e.status = http.StatusBadGateway
		}
		return e
	case errors.Is(err, upstream.ErrNotRegistry):
		e := newAPIError(errcode.ErrorCodeUnavailable, "the upstream answered with an HTML page, not registry content: a captive portal or proxy on the mirror's uplink is in the way")
		e.status = http.StatusBadGateway
		return e
	case errors.Is(err, upstream.ErrInvalidContent), errors.Is(err, storage.ErrDigestMismatch),
		errors.Is(err, storage.ErrSizeMismatch), errors.Is(err, fill.ErrUnknownSize):
		e := newAPIError(errcode.ErrorCodeUnavailable, "the upstream registry sent content that failed verification")
		e.status = http.StatusBadGateway
		return e
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, fill.ErrIdle), errors.As(err, &ne) && ne.Timeout():
		e := newAPIError(errcode.ErrorCodeUnavailable, "the upstream registry timed out")
		e.status = http.StatusGatewayTimeout
		return e
	case errors.As(err, &ne), errors.Is(err, auth.ErrTokenExchange):
		e := newAPIError(errcode.ErrorCodeUnavailable, "the upstream registry is unreachable")
		e.status = http.StatusBadGateway
		return e
	}
	return newAPIError(errcode.ErrorCodeUnknown, "internal error")
}

// writeError answers with the OCI error envelope {"errors":[{code,message}]}
// (OCI distribution spec, "Error Codes"). Bodies are left out of HEAD
// responses by net/http.
func writeError(w http.ResponseWriter, e *apiError) {
	h := w.Header()
	for _, k := range []string{"Docker-Content-Digest", "Etag", "Cache-Control"} {
		h.Del(k)
	}
	if e.retryAfter != "" {
		h.Set("Retry-After", e.retryAfter)
	}
	ocierr.Write(w, e.status, ocierr.New(e.code.String(), e.message))
}
