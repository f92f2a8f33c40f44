package proxy_test

import (
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/access"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

// TestBlobUpstreamRefusesMirror: when the upstream refuses the mirror's own
// credentials (its token exchange answers 401, or the blob request itself
// 401), a blob HEAD and GET are 403 DENIED, as a manifest is, not 404
// BLOB_UNKNOWN; a blob the upstream does not have is still 404. The key is
// in neither the answer nor the log. With and without link checks (an
// access policy), which ask the upstream first.
func TestBlobUpstreamRefusesMirror(t *testing.T) {
	t.Parallel()
	const badKey = "nvapi-revoked-0123456789"
	for _, tc := range []struct {
		name  string
		key   string
		fault bool // the registry answers blob requests 401 (a good key)
	}{{"token exchange refused", badKey, false}, {"blob request refused", ngctest.APIKey, true}} {
		for _, checkLinks := range []bool{false, true} {
			t.Run(tc.name+map[bool]string{false: "", true: ", link checks"}[checkLinks], func(t *testing.T) {
				t.Parallel()
				var logs lockedBuffer
				o := envOpts{key: tc.key, log: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}
				if checkLinks {
					o.access = policy(t, access.Config{PublicNamespaces: []string{"nvidia"}}, nil)
				}
				e := newEnv(t, o)
				if tc.fault {
					e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
						return strings.Contains(r.URL.Path, "/blobs/") && ngctest.FailWith(http.StatusUnauthorized)(w, r)
					})
				}
				blob := "/v2/nvidia/cuda/blobs/" + e.fx.CUDA.Layers[0].Digest.String()
				for _, m := range []string{http.MethodHead, http.MethodGet} {
					r := e.do(t, m, blob)
					if r.status != http.StatusForbidden {
						t.Fatalf("%s refused blob: %d %s, want 403 DENIED", m, r.status, r.body)
					}
					if m == http.MethodGet && (errorCode(t, r) != "DENIED" || strings.Contains(string(r.body), tc.key)) {
						t.Fatalf("%s refused blob: %s", m, r.body)
					}
				}
				if strings.Contains(logs.String(), tc.key) {
					t.Fatal("the key is in the log")
				}
			})
		}
	}
	// The upstream accepts the mirror but has no such blob: still 404.
	e := newEnv(t, envOpts{key: ngctest.APIKey, access: policy(t, access.Config{PublicNamespaces: []string{"nvidia"}}, nil)})
	missing := "/v2/nvidia/cuda/blobs/" + digest.FromString("nothing").String()
	for _, m := range []string{http.MethodHead, http.MethodGet} {
		r := e.do(t, m, missing)
		if r.status != http.StatusNotFound || (m == http.MethodGet && errorCode(t, r) != "BLOB_UNKNOWN") {
			t.Fatalf("%s missing blob: %d %s", m, r.status, r.body)
		}
	}
}
