package proxy_test

import (
	"bytes"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// mustUnavailable fails unless r is a 502 UNAVAILABLE in the OCI error
// envelope (JSON, never the upstream's page).
func mustUnavailable(t *testing.T, what string, r result, wantBody bool) {
	t.Helper()
	if r.err != nil {
		t.Fatalf("%s: transfer broke (%v), want a clean 502", what, r.err)
	}
	if r.status != http.StatusBadGateway || !strings.HasPrefix(r.header.Get("Content-Type"), "application/json") {
		t.Fatalf("%s: %d %q %s, want 502 with the OCI error envelope", what, r.status, r.header.Get("Content-Type"), r.body)
	}
	if wantBody && errorCode(t, r) != "UNAVAILABLE" {
		t.Fatalf("%s: %s", what, r.body)
	}
	if bytes.Contains(r.body, []byte("<html")) {
		t.Fatalf("%s: the portal's page reached the client", what)
	}
}

// TestCaptivePortalUpstream: an uplink that answers everything with a 200
// HTML page gives clients a clear 502 in the OCI error envelope for blobs
// (GET and HEAD), manifests (by tag and digest) and tag lists; nothing is
// cached; a tag cached before is still served (stale, as in an outage).
func TestCaptivePortalUpstream(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{tagFreshness: time.Nanosecond})
	ctx := t.Context()
	warm := "/v2/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag
	mustServe(t, e, warm, e.fx.CUDA.Manifest.Body)
	e.up.SetFault(ngctest.CaptivePortal)

	child := e.fx.Pytorch.Child("linux/amd64")
	config, layer := child.Config, child.Layers[0]
	for _, tc := range []struct {
		method, path string
	}{
		{http.MethodGet, "/v2/nvidia/pytorch/blobs/" + config.Digest.String()},
		{http.MethodGet, "/v2/nvidia/pytorch/blobs/" + layer.Digest.String()},
		{http.MethodHead, "/v2/nvidia/pytorch/blobs/" + layer.Digest.String()},
		{http.MethodGet, "/v2/nvidia/pytorch/manifests/" + ngctest.PytorchTag},
		{http.MethodHead, "/v2/nvidia/pytorch/manifests/" + ngctest.PytorchTag},
		{http.MethodGet, "/v2/nvidia/pytorch/manifests/" + child.Manifest.Digest.String()},
		{http.MethodGet, "/v2/nvidia/pytorch/tags/list"},
	} {
		mustUnavailable(t, tc.method+" "+tc.path, e.do(t, tc.method, tc.path), tc.method == http.MethodGet)
	}
	assertNotCached(t, e, config)
	assertNotCached(t, e, layer)
	if _, err := e.store.GetManifest(ctx, child.Manifest.Digest); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("a manifest was cached through the portal: %v", err)
	}
	if _, err := e.store.GetTag(ctx, e.repo(ngctest.PytorchRepo), ngctest.PytorchTag); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("a tag was recorded through the portal: %v", err)
	}
	// Cached before the portal: served stale, as while the upstream is down.
	mustServe(t, e, warm, e.fx.CUDA.Manifest.Body)

	e.up.SetFault(nil) // the portal lets the mirror through again
	mustServe(t, e, "/v2/nvidia/pytorch/blobs/"+layer.Digest.String(), layer.Body)
}

// TestSmallBlobVerifiedBeforeStatus: a blob up to VerifyBeforeHeaders is
// verified whole before the status is sent, so corrupt bytes (with a
// plausible Content-Type) give a clean 502 instead of a 200 cut off at the
// end; a larger one keeps getting its headers first and the transfer is
// aborted. Nothing is cached either way; the next request refetches.
func TestSmallBlobVerifiedBeforeStatus(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name         string
		verifyBefore int64
		small        bool
	}{
		{"default threshold", 0, true},
		{"blob over the threshold", 1 << 10, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, envOpts{verifyBefore: tc.verifyBefore})
			layer := e.fx.CUDA.Layers[1]
			var corrupt atomic.Bool
			corrupt.Store(true)
			e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
				if !e.up.IsCDN(r) || !corrupt.Load() {
					return false
				}
				bad := bytes.Clone(layer.Body)
				bad[len(bad)-1] ^= 0xff
				w.Header().Set("Content-Type", "application/octet-stream")
				w.Header().Set("Content-Length", strconv.Itoa(len(bad)))
				_, _ = w.Write(bad)
				return true
			})
			path := "/v2/nvidia/cuda/blobs/" + layer.Digest.String()
			r := e.do(t, http.MethodGet, path)
			if tc.small {
				mustUnavailable(t, "corrupt small blob", r, true)
			} else if r.err == nil {
				t.Fatalf("corrupt large blob ended cleanly: %d, %d bytes", r.status, len(r.body))
			}
			assertNotCached(t, e, layer)
			corrupt.Store(false)
			mustServe(t, e, path, layer.Body)
		})
	}
}
