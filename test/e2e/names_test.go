//go:build e2e

package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

// rawRequest writes "GET target" exactly as given (curl --path-as-is), with
// extra header lines, and returns the status, Location and body.
func rawRequest(t *testing.T, addr, target string, header ...string) (int, string, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n", target, addr)
	for _, h := range header {
		fmt.Fprintf(c, "%s\r\n", h)
	}
	fmt.Fprint(c, "\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("GET %s: %v", target, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("Location"), string(body)
}

// TestDotSegmentsNameInvalid: the binary answers a name with "." or ".."
// segments, plain or percent-encoded, with 400 NAME_INVALID (BAD_REQUEST in
// the admin API's paths) on every route family (registry API, admin API,
// token endpoint, the others) instead of
// redirecting to the cleaned path (another repository), and asks the
// upstream nothing for it.
func TestDotSegmentsNameInvalid(t *testing.T) {
	up, fx := newUpstream(t)
	const token = "e2e-admin-token"
	m := startMirror(t, up.URL(), "MIRROR_ADMIN_TOKEN="+token, "MIRROR_ACCESS_MODE=token", "MIRROR_HTPASSWD_FILE="+ngctest.WriteHtpasswd(t, "u", "p"))
	blob := fx.CUDA.Layers[0].Digest.String()
	auth := "Authorization: Bearer " + token
	for _, tc := range []struct {
		target string
		header []string
		code   string // NAME_INVALID when ""
	}{
		{target: "/v2/nvidia/../pytorch/manifests/17.12"},
		{target: "/v2/nvidia/%2e%2e/pytorch/manifests/17.12"},
		{target: "/v2/nvidia/%2E./pytorch/manifests/17.12"},
		{target: "/v2/nvidia/pytorch/./manifests/17.12"},
		{target: "/v2/nvidia/../cuda/blobs/" + blob},
		{target: "/v2/nvidia/cuda/%2e%2e/cuda/blobs/" + blob},
		{target: "/v2/nvidia/../pytorch/tags/list"},
		{target: "/v2/nvidia/.%2e/pytorch/tags/list?n=1"},
		// Admin API paths hold no repository names: BAD_REQUEST.
		{target: "/admin/v1/jobs/../rules", header: []string{auth}, code: "BAD_REQUEST"},
		{target: "/admin/v1/%2e%2e/v1/repositories", header: []string{auth}, code: "BAD_REQUEST"},
		{target: "/admin/v1/tags?repository=nvidia/../pytorch", header: []string{auth}},
		{target: "/admin/v1/tags?repository=nvidia/%2e%2e/pytorch", header: []string{auth}},
		{target: "/auth/token/../token?scope=repository:nvidia/pytorch:pull"},
		{target: "/metrics/../v2/"},
		{target: "/healthz/.."},
	} {
		if tc.code == "" {
			tc.code = "NAME_INVALID"
		}
		status, loc, body := rawRequest(t, m.addr, tc.target, tc.header...)
		if status != http.StatusBadRequest || !strings.Contains(body, `"`+tc.code+`"`) {
			t.Errorf("GET %s: %d (Location %q) %s, want 400 %s", tc.target, status, loc, body, tc.code)
		}
	}
	// Only the start-up ping (GET /v2/ and its token) may have reached it.
	for _, r := range up.Requests() {
		if r.Path != "/v2/" && r.Path != "/proxy_auth" {
			t.Errorf("a dot-segment request reached the upstream: %s %s", r.Method, r.Path)
		}
	}
}
