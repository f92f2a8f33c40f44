package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/ocierr"
)

// TestPeerErrorsAreOCI: every error answer of the peer endpoint is the OCI
// error envelope (JSON) at its code's status, and none echoes the secret
// or the signature sent.
func TestPeerErrorsAreOCI(t *testing.T) {
	t.Parallel()
	data := []byte("peer blob bytes")
	dgst := digest.FromBytes(data)
	var served atomic.Int32
	blobs := serveBlob(data, true, &served)
	failing := digest.FromString("failing")
	srv := httptest.NewServer(NewServer([]byte(secret), blobsFunc(func(ctx context.Context, d digest.Digest, off int64) (io.ReadCloser, int64, func(context.Context) bool, error) {
		switch {
		case d == failing:
			return nil, 0, nil, errors.New("test: the fill's source failed")
		case d == dgst && off > int64(len(data)): // as a fill of the blob would answer
			served.Add(1)
			return io.NopCloser(strings.NewReader("")), int64(len(data)), func(context.Context) bool { return true }, nil
		}
		return blobs.PeerBlob(ctx, d, off)
	}), nil, nil))
	defer srv.Close()
	now := time.Now().Unix()
	signed := func(method, path string) string {
		return fmt.Sprintf("%s %d:%s", authScheme, now, sign([]byte(secret), method, path, now))
	}
	blob := PeerPrefix + dgst.String()
	for _, c := range []struct {
		name, method, path, auth, rng string
		status                        int
		code                          string
	}{
		{"unsigned", "GET", blob, "", "", 401, "UNAUTHORIZED"},
		{"a bearer of the secret", "GET", blob, "Bearer " + secret, "", 401, "UNAUTHORIZED"},
		{"wrong secret", "GET", blob, fmt.Sprintf("%s %d:%s", authScheme, now, sign([]byte("another-secret-0123"), "GET", blob, now)), "", 401, "UNAUTHORIZED"},
		{"stale", "GET", blob, fmt.Sprintf("%s %d:%s", authScheme, now-120, sign([]byte(secret), "GET", blob, now-120)), "", 401, "UNAUTHORIZED"},
		{"signed for another path", "GET", blob, signed("GET", PeerPrefix+digest.FromString("y").String()), "", 401, "UNAUTHORIZED"},
		{"unsigned, another path", "GET", "/other", "", "", 401, "UNAUTHORIZED"},
		{"another path", "GET", "/peer/v2/x", signed("GET", "/peer/v2/x"), "", 404, "NOT_FOUND"},
		{"another method", "DELETE", blob, signed("DELETE", blob), "", 405, "UNSUPPORTED"},
		{"invalid digest", "GET", PeerPrefix + "sha256:zz", signed("GET", PeerPrefix+"sha256:zz"), "", 400, "DIGEST_INVALID"},
		{"a closed range", "GET", blob, signed("GET", blob), "bytes=0-3", 416, "RANGE_INVALID"},
		{"past the end", "GET", blob, signed("GET", blob), "bytes=100-", 416, "RANGE_INVALID"},
		{"not served", "GET", PeerPrefix + digest.FromString("absent").String(), signed("GET", PeerPrefix+digest.FromString("absent").String()), "", 404, "BLOB_UNKNOWN"},
		{"cannot serve", "GET", PeerPrefix + failing.String(), signed("GET", PeerPrefix+failing.String()), "", 503, "UNAVAILABLE"},
	} {
		req, _ := http.NewRequest(c.method, srv.URL+c.path, nil)
		if c.auth != "" {
			req.Header.Set("Authorization", c.auth)
		}
		if c.rng != "" {
			req.Header.Set("Range", c.rng)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		env, ok := ocierr.Decode(b)
		if resp.StatusCode != c.status || !ok || env.Errors[0].Code != c.code || env.Errors[0].Message == "" ||
			!strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
			t.Errorf("%s: %d %s %q, want %d with the OCI error %s", c.name, resp.StatusCode, resp.Header.Get("Content-Type"), b, c.status, c.code)
		}
		_, sig, _ := strings.Cut(c.auth, ":")
		for _, leak := range []string{secret, sig, string(data)} {
			if leak != "" && strings.Contains(string(b)+fmt.Sprint(resp.Header), leak) {
				t.Errorf("%s: the answer holds %q: %s", c.name, leak, b)
			}
		}
	}
	// A replica with another secret is told why in its error.
	if _, _, _, err := NewPeer([]byte("another-secret-0123"), nil, nil).Get(t.Context(), srv.URL, dgst, 0); err == nil ||
		!strings.Contains(err.Error(), "401 (UNAUTHORIZED: ") || strings.Contains(err.Error(), secret) {
		t.Errorf("Get with another secret: %v, want the peer's 401 UNAUTHORIZED", err)
	}
	if n := served.Load(); n != 1 { // the offset past the end only: opened, then refused
		t.Errorf("the blob was opened %d times, want 1", n)
	}
}
