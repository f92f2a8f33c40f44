package proxy_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/proxy"
)

// rawGet writes a request line exactly as given (as curl --path-as-is
// does: Go's client would send the path as is too, but a raw write shows
// that nothing in between cleans it) and returns the response.
func rawGet(t *testing.T, addr, target string) (*http.Response, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", target, addr)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("GET %s: %v", target, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

// TestRejectDotSegments: in front of a ServeMux (as cmd/mirror serves the
// registry API, the admin API and the token endpoint), a path with a "." or
// ".." segment, plain or percent-encoded, is answered 400 NAME_INVALID and
// reaches no route; without it the mux redirects to another repository.
func TestRejectDotSegments(t *testing.T) {
	t.Parallel()
	var reached []string
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		reached = append(reached, r.URL.Path)
		w.WriteHeader(http.StatusNoContent)
	})
	srv := httptest.NewServer(proxy.RejectDotSegments(mux, nil))
	t.Cleanup(srv.Close)
	addr := strings.TrimPrefix(srv.URL, "http://")
	for _, target := range []string{
		"/v2/nvidia/../pytorch/manifests/x",
		"/v2/nvidia/%2e%2e/pytorch/manifests/x",
		"/v2/nvidia/%2E./pytorch/manifests/x",
		"/v2/nvidia/.%2E/pytorch/blobs/sha256:" + strings.Repeat("a", 64),
		"/v2/./nvidia/pytorch/tags/list",
		"/v2/nvidia/pytorch/%2e/tags/list",
		"/v2/nvidia%2f..%2fpytorch/manifests/x",
		"/v2/nvidia/pytorch/manifests/..",
		"/v2/..",
		"/auth/token/..",
		"/metrics/..",
		"/v2/nvidia//pytorch/tags/list", // empty segments: the mux would redirect too
		"//v2/",
		"/v2//nvidia/pytorch/manifests/x",
		"http://" + addr + "/v2/nvidia/../pytorch/manifests/x", // absolute form
	} {
		resp, body := rawGet(t, addr, target)
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, `"code":"NAME_INVALID"`) {
			t.Errorf("GET %s: %d %s (Location %q), want 400 NAME_INVALID", target, resp.StatusCode, body, resp.Header.Get("Location"))
		}
	}
	// Admin API paths are no repository names: a job ID with dot segments
	// (mirror jobs --follow ../../x) is not a job ID, 400 BAD_REQUEST.
	for _, tc := range []struct{ target, want string }{
		{"/admin/v1/jobs/..%2F..%2Fx", "not a job ID"},
		{"/admin/v1/jobs/../rules", "not a job ID"},
		{"/admin/v1/jobs/a//cancel", "not a job ID"},
		{"/admin/v1/%2e%2e/tags", "not allowed in an admin API path"},
	} {
		resp, body := rawGet(t, addr, tc.target)
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, `"code":"BAD_REQUEST"`) || !strings.Contains(body, tc.want) || strings.Contains(body, "repository") {
			t.Errorf("GET %s: %d %s, want 400 BAD_REQUEST saying %q", tc.target, resp.StatusCode, body, tc.want)
		}
	}
	if len(reached) != 0 {
		t.Fatalf("dot segments reached a route: %q", reached)
	}
	// Dots inside a segment are names and tags, not dot segments.
	for _, target := range []string{"/v2/nvidia/pytorch/manifests/24.05-py3", "/v2/nvidia/pytorch.x/manifests/..a", "/admin/v1/tags?repository=a/../b"} {
		if resp, body := rawGet(t, addr, target); resp.StatusCode != http.StatusNoContent {
			t.Errorf("GET %s: %d %s, want it passed on", target, resp.StatusCode, body)
		}
	}
}
