package proxy

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/distribution/distribution/v3/registry/api/errcode"

	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
)

// TestBusyNamesTheBound: the 503 of a full max_fills says which bound was
// reached (the global one or an upstream's), keeping UNAVAILABLE and
// Retry-After.
func TestBusyNamesTheBound(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&pull.BusyError{Bound: "limits.max_fills"}, "limits.max_fills"},
		{fmt.Errorf("x: %w", &pull.BusyError{Bound: "upstreams.docker.io.max_fills"}), "upstreams.docker.io.max_fills"},
		{&pull.BusyError{Bound: "upstream.max_fills"}, "upstream.max_fills"},
	} {
		e := toAPIError(tc.err, kindBlob)
		if e.code != errcode.ErrorCodeUnavailable || e.status != http.StatusServiceUnavailable || e.retryAfter == "" {
			t.Errorf("%v: %s %d Retry-After %q, want UNAVAILABLE 503 with Retry-After", tc.err, e.code, e.status, e.retryAfter)
		}
		if !strings.Contains(e.message, tc.want) {
			t.Errorf("%v: message %q does not name %s", tc.err, e.message, tc.want)
		}
	}
	// The fill group's own refusal (no bound known) is still a 503.
	if e := toAPIError(fill.ErrTooManyFills, kindBlob); e.status != http.StatusServiceUnavailable {
		t.Errorf("fill.ErrTooManyFills: %d", e.status)
	}
	if !errors.Is(&pull.BusyError{Bound: "limits.max_fills"}, pull.ErrBusy) {
		t.Error("a BusyError is not ErrBusy")
	}
}
