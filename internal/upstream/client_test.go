package upstream

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/auth"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

func TestParseRetryAfter(t *testing.T) {
	t.Parallel()
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name string
		v    string
		want time.Duration
	}{
		{"empty", "", 0},
		{"seconds", "30", 30 * time.Second},
		{"huge seconds clamped, not overflowed", "9999999999", 365 * 24 * time.Hour},
		{"zero seconds", "0", 0},
		{"negative seconds", "-5", 0},
		{"future date", now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
		{"future RFC 850 date", now.Add(2 * time.Minute).Format(time.RFC850), 2 * time.Minute},
		{"past date", now.Add(-time.Hour).Format(http.TimeFormat), 0},
		{"date equal to now", now.Format(http.TimeFormat), 0},
		{"garbage", "soon", 0},
		{"fractional seconds", "1.5", 0},
		{"seconds with space", " 30", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := parseRetryAfter(tc.v, now); got != tc.want {
				t.Fatalf("parseRetryAfter(%q) = %v, want %v", tc.v, got, tc.want)
			}
		})
	}
}

func TestParseContentRange(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		v           string
		start, size int64
		ok          bool
	}{
		{"bytes 0-99/100", 0, 100, true},
		{"bytes 10-99/100", 10, 100, true},
		{"bytes 65536-131071/131072", 65536, 131072, true},
		{"bytes 10-99/*", 0, 0, false}, // unknown total: refused
		{"bytes */100", 0, 0, false},   // the 416 form
		{"bytes 10-99", 0, 0, false},
		{"bytes=10-99/100", 0, 0, false},
		{"10-99/100", 0, 0, false},
		{"bytes a-99/100", 0, 0, false},
		{"bytes 10-99/abc", 0, 0, false},
		{"bytes 10/100", 0, 0, false},
		{"bytes -10/100", 0, 0, false},
		{"", 0, 0, false},
	} {
		start, size, ok := parseContentRange(tc.v)
		if ok != tc.ok || (ok && (start != tc.start || size != tc.size)) {
			t.Errorf("parseContentRange(%q) = %d, %d, %v; want %d, %d, %v", tc.v, start, size, ok, tc.start, tc.size, tc.ok)
		}
	}
}

func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{"bytes 0-99/100", "bytes 10-99/*", "bytes */100", "bytes -/", "", "bytes 9223372036854775807-1/9223372036854775808"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		start, size, ok := parseContentRange(v)
		if !ok {
			return
		}
		if !strings.HasPrefix(v, "bytes ") || !strings.Contains(v, "/") {
			t.Fatalf("accepted %q, which is not \"bytes START-END/SIZE\"", v)
		}
		if strings.HasSuffix(v, "/*") {
			t.Fatalf("accepted unknown total in %q", v)
		}
		rng, total, _ := strings.Cut(strings.TrimPrefix(v, "bytes "), "/")
		first, _, _ := strings.Cut(rng, "-")
		if s, err := strconv.ParseInt(first, 10, 64); err != nil || s != start {
			t.Fatalf("start %d does not come from %q", start, v)
		}
		if n, err := strconv.ParseInt(total, 10, 64); err != nil || n != size {
			t.Fatalf("size %d does not come from %q", size, v)
		}
	})
}

func TestManifestMediaType(t *testing.T) {
	t.Parallel()
	const ociManifest = "application/vnd.oci.image.manifest.v1+json"
	const dockerList = "application/vnd.docker.distribution.manifest.list.v2+json"
	withMT := []byte(`{"schemaVersion":2,"mediaType":"` + dockerList + `"}`)
	withoutMT := []byte(`{"schemaVersion":2}`)
	for _, tc := range []struct {
		name string
		ct   string
		body []byte
		want string
	}{
		{"specific type", ociManifest, withMT, ociManifest},
		{"parameters dropped", ociManifest + "; charset=utf-8", withoutMT, ociManifest},
		{"generic json falls back to body", "application/json", withMT, dockerList},
		{"generic json with params falls back to body", "application/json; charset=utf-8", withMT, dockerList},
		{"text/plain falls back to body", "text/plain", withMT, dockerList},
		{"octet-stream falls back to body", "application/octet-stream", withMT, dockerList},
		{"no header falls back to body", "", withMT, dockerList},
		{"unparseable header falls back to body", ";;;", withMT, dockerList},
		{"generic json, body without mediaType", "application/json", withoutMT, "application/json"},
		{"text/plain, body without mediaType", "text/plain", withoutMT, "text/plain"},
		{"neither", "", withoutMT, "application/json"},
		{"neither, body not JSON", "", []byte("not json"), "application/json"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := manifestMediaType(tc.ct, tc.body); got != tc.want {
				t.Fatalf("manifestMediaType(%q, %s) = %q, want %q", tc.ct, tc.body, got, tc.want)
			}
		})
	}
}

// newTestClient starts a populated fake nvcr.io and an anonymous client for it.
func newTestClient(t *testing.T) (*Client, *ngctest.Upstream, *ngctest.Fixture) {
	t.Helper()
	up := ngctest.New(ngctest.Options{})
	t.Cleanup(up.Close)
	fx, err := up.Populate(64 << 10)
	if err != nil {
		t.Fatal(err)
	}
	origin, err := url.Parse(up.URL())
	if err != nil {
		t.Fatal(err)
	}
	return New(origin, auth.NewTransport(nil, origin, auth.Credentials{}, nil)), up, fx
}

func TestGetManifestByTagAndDigest(t *testing.T) {
	t.Parallel()
	c, up, fx := newTestClient(t)
	ctx := t.Context()

	m, err := c.GetManifest(ctx, ngctest.PytorchRepo, ngctest.PytorchTag, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := fx.Pytorch.Manifest
	if !bytes.Equal(m.Body, want.Body) || m.MediaType != want.MediaType || m.Digest != want.Digest {
		t.Fatalf("by tag: got %s %s (%d bytes), want %s %s (%d bytes)", m.MediaType, m.Digest, len(m.Body), want.MediaType, want.Digest, len(want.Body))
	}

	child := fx.DCGM.Child("linux/arm64").Manifest
	m, err = c.GetManifest(ctx, ngctest.DCGMRepo, child.Digest.String(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(m.Body, child.Body) || m.MediaType != child.MediaType || m.Digest != child.Digest {
		t.Fatalf("by digest: got %s %s, want %s %s", m.MediaType, m.Digest, child.MediaType, child.Digest)
	}
	if n := up.Count("registry", http.MethodGet, "/v2/"+ngctest.DCGMRepo+"/manifests/"+child.Digest.String()); n < 1 {
		t.Fatal("the fake saw no manifest GET by digest")
	}
}

func TestGetManifestAcceptHeader(t *testing.T) {
	t.Parallel()
	c, up, _ := newTestClient(t)
	var mu sync.Mutex
	var accepts []string
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/manifests/") {
			mu.Lock()
			accepts = append(accepts, r.Header.Get("Accept"))
			mu.Unlock()
		}
		return false
	})
	if _, err := c.GetManifest(t.Context(), ngctest.CUDARepo, ngctest.CUDATag, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetManifest(t.Context(), ngctest.CUDARepo, ngctest.CUDATag, []string{"application/vnd.docker.distribution.manifest.v2+json"}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(accepts) < 2 {
		t.Fatalf("accept headers seen: %q", accepts)
	}
	first, last := accepts[0], accepts[len(accepts)-1]
	for _, mt := range ManifestMediaTypes {
		if !strings.Contains(first, mt) {
			t.Errorf("default Accept %q lacks %s", first, mt)
		}
	}
	if last != "application/vnd.docker.distribution.manifest.v2+json" {
		t.Errorf("explicit Accept sent as %q", last)
	}
}

func TestGetManifestDigestMismatch(t *testing.T) {
	t.Parallel()
	c, up, fx := newTestClient(t)
	target := fx.CUDA.Manifest
	other := fx.Private.Manifest
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/v2/"+ngctest.CUDARepo+"/manifests/"+target.Digest.String() {
			return false
		}
		w.Header().Set("Content-Type", other.MediaType)
		w.Header().Set("Docker-Content-Digest", target.Digest.String())
		_, _ = w.Write(other.Body)
		return true
	})
	m, err := c.GetManifest(t.Context(), ngctest.CUDARepo, target.Digest.String(), nil)
	if !errors.Is(err, ErrInvalidContent) {
		t.Fatalf("got %v, %v; want an error wrapping ErrInvalidContent", m, err)
	}
}

func TestGetManifestByTagDockerContentDigestMismatch(t *testing.T) {
	t.Parallel()
	c, up, fx := newTestClient(t)
	m := fx.CUDA.Manifest
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/v2/"+ngctest.CUDARepo+"/manifests/"+ngctest.CUDATag {
			return false
		}
		w.Header().Set("Content-Type", m.MediaType)
		w.Header().Set("Docker-Content-Digest", digest.FromString("something else").String())
		_, _ = w.Write(m.Body)
		return true
	})
	if _, err := c.GetManifest(t.Context(), ngctest.CUDARepo, ngctest.CUDATag, nil); !errors.Is(err, ErrInvalidContent) {
		t.Fatalf("got %v, want an error wrapping ErrInvalidContent", err)
	}
}

func TestGetManifestTooLarge(t *testing.T) {
	t.Parallel()
	c, up, _ := newTestClient(t)
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.Contains(r.URL.Path, "/manifests/") {
			return false
		}
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		w.Header().Del("Content-Length")
		w.WriteHeader(http.StatusOK)
		chunk := bytes.Repeat([]byte{' '}, 64<<10)
		for range MaxManifestSize/len(chunk) + 2 {
			if _, err := w.Write(chunk); err != nil {
				break
			}
		}
		return true
	})
	if _, err := c.GetManifest(t.Context(), ngctest.CUDARepo, ngctest.CUDATag, nil); !errors.Is(err, ErrInvalidContent) {
		t.Fatalf("got %v, want an error wrapping ErrInvalidContent", err)
	}
}

func TestHeadManifest(t *testing.T) {
	t.Parallel()
	c, up, fx := newTestClient(t)
	want := fx.DCGM.Manifest
	d, err := c.HeadManifest(t.Context(), ngctest.DCGMRepo, ngctest.DCGMTag, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d.Digest != want.Digest || d.MediaType != want.MediaType || d.Size != int64(len(want.Body)) {
		t.Fatalf("got %+v, want %s %s %d", d, want.MediaType, want.Digest, len(want.Body))
	}
	path := "/v2/" + ngctest.DCGMRepo + "/manifests/" + ngctest.DCGMTag
	if up.Count("registry", http.MethodHead, path) < 1 || up.Count("registry", http.MethodGet, path) != 0 {
		t.Fatalf("HeadManifest did not (only) send HEAD: %+v", up.Requests())
	}
	if _, err := c.HeadManifest(t.Context(), ngctest.DCGMRepo, "no-such-tag", nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown tag: got %v, want ErrNotFound", err)
	}
}

func TestHeadManifestWithoutDigest(t *testing.T) {
	t.Parallel()
	c, up, _ := newTestClient(t)
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.Contains(r.URL.Path, "/manifests/") {
			return false
		}
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		return true
	})
	if _, err := c.HeadManifest(t.Context(), ngctest.CUDARepo, ngctest.CUDATag, nil); !errors.Is(err, ErrInvalidContent) {
		t.Fatalf("got %v, want an error wrapping ErrInvalidContent", err)
	}
}

func TestGetBlobFollowsRedirect(t *testing.T) {
	t.Parallel()
	c, up, fx := newTestClient(t)
	layer := fx.CUDA.Layers[1]
	b, err := c.GetBlob(t.Context(), ngctest.CUDARepo, layer.Digest, 0)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(b.Body)
	b.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(body, layer.Body) || b.Size != int64(len(layer.Body)) {
		t.Fatalf("got %d bytes, Size %d; want %d", len(body), b.Size, len(layer.Body))
	}
	if up.BlobFetches(layer.Digest) != 1 {
		t.Fatalf("CDN fetches: %d, want 1", up.BlobFetches(layer.Digest))
	}
	for _, r := range up.CDNRequests() {
		if r.Auth != "" || r.Range != "" {
			t.Fatalf("CDN request carried Authorization %q / Range %q", r.Auth, r.Range)
		}
	}
}

func TestGetBlobAtOffset(t *testing.T) {
	t.Parallel()
	c, up, fx := newTestClient(t)
	layer := fx.CUDA.Layers[1]
	off := int64(len(layer.Body) / 3)
	b, err := c.GetBlob(t.Context(), ngctest.CUDARepo, layer.Digest, off)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(b.Body)
	b.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(body, layer.Body[off:]) {
		t.Fatalf("got %d bytes, want the %d from offset %d", len(body), len(layer.Body)-int(off), off)
	}
	if b.Size != int64(len(layer.Body)) {
		t.Fatalf("Size %d, want the full size %d", b.Size, len(layer.Body))
	}
	ranges := up.CDNRanges()
	if want := "bytes=" + strconv.FormatInt(off, 10) + "-"; len(ranges) != 1 || ranges[0] != want {
		t.Fatalf("CDN Range headers %q, want [%q]", ranges, want)
	}
}

func TestGetBlobUpstreamIgnoresRange(t *testing.T) {
	t.Parallel()
	c, up, fx := newTestClient(t)
	layer := fx.CUDA.Layers[0]
	var ranged atomic.Int32
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !up.IsCDN(r) || r.Header.Get("Range") == "" {
			return false
		}
		ranged.Add(1)
		w.Header().Set("Content-Length", strconv.Itoa(len(layer.Body)))
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(layer.Body)
		return true
	})
	off := int64(len(layer.Body) - 1000)
	b, err := c.GetBlob(t.Context(), ngctest.CUDARepo, layer.Digest, off)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(b.Body)
	b.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if ranged.Load() != 1 {
		t.Fatalf("fault saw %d ranged CDN requests, want 1", ranged.Load())
	}
	if !bytes.Equal(body, layer.Body[off:]) || b.Size != int64(len(layer.Body)) {
		t.Fatalf("got %d bytes, Size %d; want %d bytes, Size %d", len(body), b.Size, len(layer.Body)-int(off), len(layer.Body))
	}
}

func TestGetBlobBadContentRange(t *testing.T) {
	t.Parallel()
	c, up, fx := newTestClient(t)
	layer := fx.CUDA.Layers[0]
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !up.IsCDN(r) || r.Header.Get("Range") == "" {
			return false
		}
		// A 206 for the wrong start.
		w.Header().Set("Content-Range", "bytes 0-99/"+strconv.Itoa(len(layer.Body)))
		w.WriteHeader(http.StatusPartialContent)
		_, _ = w.Write(layer.Body[:100])
		return true
	})
	if _, err := c.GetBlob(t.Context(), ngctest.CUDARepo, layer.Digest, 500); !errors.Is(err, ErrInvalidContent) {
		t.Fatalf("got %v, want an error wrapping ErrInvalidContent", err)
	}
}

func TestHeadBlob(t *testing.T) {
	t.Parallel()
	c, up, fx := newTestClient(t)
	layer := fx.CUDA.Layers[0]
	size, err := c.HeadBlob(t.Context(), ngctest.CUDARepo, layer.Digest)
	if err != nil || size != int64(len(layer.Body)) {
		t.Fatalf("got %d, %v; want %d", size, err, len(layer.Body))
	}
	if up.BlobFetches(layer.Digest) != 0 {
		t.Fatal("HeadBlob fetched the blob from the CDN")
	}
	if _, err := c.HeadBlob(t.Context(), ngctest.CUDARepo, digest.FromString("absent")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("absent blob: got %v, want ErrNotFound", err)
	}
}

func TestListTags(t *testing.T) {
	t.Parallel()
	c, _, _ := newTestClient(t)
	ctx := t.Context()
	all := []string{"17.12", "18.01-py3"}

	p, err := c.ListTags(ctx, ngctest.PytorchRepo, 0, "")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(p.Tags, ",") != strings.Join(all, ",") || p.More {
		t.Fatalf("all tags: got %q more=%v", p.Tags, p.More)
	}
	p, err = c.ListTags(ctx, ngctest.PytorchRepo, 1, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Tags) != 1 || p.Tags[0] != all[0] || !p.More {
		t.Fatalf("n=1: got %q more=%v, want [%s] more=true", p.Tags, p.More, all[0])
	}
	p, err = c.ListTags(ctx, ngctest.PytorchRepo, 1, all[0])
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Tags) != 1 || p.Tags[0] != all[1] || p.More {
		t.Fatalf("n=1 last=%s: got %q more=%v, want [%s] more=false", all[0], p.Tags, p.More, all[1])
	}
	p, err = c.ListTags(ctx, ngctest.PytorchRepo, 0, all[1])
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Tags) != 0 || p.More {
		t.Fatalf("after the last tag: got %q more=%v", p.Tags, p.More)
	}
}

func TestListTagsNotJSON(t *testing.T) {
	t.Parallel()
	c, up, _ := newTestClient(t)
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasSuffix(r.URL.Path, "/tags/list") {
			return false
		}
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write([]byte("<html>"))
		return true
	})
	if _, err := c.ListTags(t.Context(), ngctest.PytorchRepo, 0, ""); !errors.Is(err, ErrInvalidContent) {
		t.Fatalf("got %v, want an error wrapping ErrInvalidContent", err)
	}
}

var sentinels = []error{ErrNotFound, ErrUnauthorized, ErrDenied, ErrTooManyRequests, ErrUnavailable, ErrInvalidContent}

// matchesOnly checks that err is an *Error matching want and no other sentinel.
func matchesOnly(t *testing.T, err, want error) *Error {
	t.Helper()
	var ue *Error
	if !errors.As(err, &ue) {
		t.Fatalf("got %T %v, want an *Error", err, err)
	}
	for _, s := range sentinels {
		if got := errors.Is(err, s); got != (s == want) {
			t.Errorf("errors.Is(%v, %v) = %v", err, s, got)
		}
	}
	return ue
}

func TestErrorSentinels(t *testing.T) {
	t.Parallel()
	statusFault := func(status int, retryAfter string) func(w http.ResponseWriter, r *http.Request) bool {
		return func(w http.ResponseWriter, r *http.Request) bool {
			if !strings.Contains(r.URL.Path, "/manifests/") {
				return false
			}
			if retryAfter != "" {
				w.Header().Set("Retry-After", retryAfter)
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(status)
			_, _ = w.Write([]byte(`{"errors":[{"code":"CODE_` + strconv.Itoa(status) + `","message":"m"}]}`))
			return true
		}
	}
	for _, tc := range []struct {
		name           string
		repo, ref      string
		fault          func(w http.ResponseWriter, r *http.Request) bool
		want           error
		status         int
		code           string
		retryAfter     time.Duration
		checkErrorCode bool
	}{
		{name: "404 unknown tag", repo: ngctest.CUDARepo, ref: "no-such-tag", want: ErrNotFound, status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "404 unknown repository", repo: "nvidia/absent", ref: "latest", want: ErrNotFound, status: 404, code: "NAME_UNKNOWN"},
		{name: "401 private repository without key", repo: ngctest.PrivateRepo, ref: ngctest.PrivateTag, want: ErrUnauthorized, status: 401, code: "UNAUTHORIZED"},
		{name: "403", repo: ngctest.CUDARepo, ref: ngctest.CUDATag, fault: statusFault(403, ""), want: ErrDenied, status: 403, code: "CODE_403"},
		{name: "451", repo: ngctest.CUDARepo, ref: ngctest.CUDATag, fault: statusFault(451, ""), want: ErrDenied, status: 451, code: "CODE_451"},
		{name: "429", repo: ngctest.CUDARepo, ref: ngctest.CUDATag, fault: statusFault(429, "7"), want: ErrTooManyRequests, status: 429, code: "CODE_429", retryAfter: 7 * time.Second},
		{name: "500", repo: ngctest.CUDARepo, ref: ngctest.CUDATag, fault: statusFault(500, ""), want: ErrUnavailable, status: 500, code: "CODE_500"},
		{name: "503 with Retry-After", repo: ngctest.CUDARepo, ref: ngctest.CUDATag, fault: statusFault(503, "12"), want: ErrUnavailable, status: 503, code: "CODE_503", retryAfter: 12 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c, up, _ := newTestClient(t)
			if tc.fault != nil {
				up.SetFault(tc.fault)
			}
			_, err := c.GetManifest(t.Context(), tc.repo, tc.ref, nil)
			ue := matchesOnly(t, err, tc.want)
			if ue.StatusCode != tc.status || ue.Method != http.MethodGet || ue.RetryAfter != tc.retryAfter {
				t.Errorf("got %+v, want status %d, GET, RetryAfter %v", ue, tc.status, tc.retryAfter)
			}
			if len(ue.Errors) == 0 || ue.Errors[0].Code != tc.code || !strings.Contains(ue.Error(), tc.code) {
				t.Errorf("error entries %+v / %q, want code %s", ue.Errors, ue.Error(), tc.code)
			}
			if want := "/v2/" + tc.repo + "/manifests/" + tc.ref; ue.Path != want || !strings.Contains(ue.Error(), want) {
				t.Errorf("path %q / %q, want %q", ue.Path, ue.Error(), want)
			}
		})
	}
}

func TestTokenRealm429(t *testing.T) {
	t.Parallel()
	c, up, _ := newTestClient(t)
	var refused atomic.Int32
	c.OnBackoffRefusal = func() { refused.Add(1) }
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/proxy_auth" {
			return false
		}
		w.Header().Set("Retry-After", "20")
		w.WriteHeader(http.StatusTooManyRequests)
		return true
	})
	_, err := c.GetManifest(t.Context(), ngctest.CUDARepo, ngctest.CUDATag, nil)
	ue := matchesOnly(t, err, ErrTooManyRequests)
	if ue.RetryAfter != 20*time.Second {
		t.Fatalf("RetryAfter %v, want 20s", ue.RetryAfter)
	}
	before := len(up.Requests())
	if _, err := c.HeadBlob(t.Context(), ngctest.CUDARepo, digest.FromString("x")); !errors.Is(err, ErrTooManyRequests) {
		t.Fatalf("after a realm 429: got %v, want a 429 refusal", err)
	}
	if len(up.Requests()) != before || refused.Load() != 1 {
		t.Fatalf("upstream saw %d more requests, %d refusals; want 0 and 1", len(up.Requests())-before, refused.Load())
	}
}

// TestErrorsCarryNoQuery: no error, whether an upstream answer or a
// transport failure, shows a URL query (a signed CDN URL's signature, a tag
// list's parameters).
func TestErrorsCarryNoQuery(t *testing.T) {
	t.Parallel()
	c, up, fx := newTestClient(t)
	forbidden, broken := fx.CUDA.Layers[0], fx.CUDA.Layers[1]
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		switch {
		case up.IsCDN(r) && r.URL.Path == "/blobs/"+forbidden.Digest.String():
			if r.URL.Query().Get("Signature") == "" {
				t.Error("CDN request without a signature: the test checks nothing")
			}
			http.Error(w, "AccessDenied", http.StatusForbidden)
			return true
		case up.IsCDN(r) && r.URL.Path == "/blobs/"+broken.Digest.String():
			panic(http.ErrAbortHandler) // connection closed before any answer
		case strings.HasSuffix(r.URL.Path, "/tags/list"):
			w.WriteHeader(http.StatusInternalServerError)
			return true
		}
		return false
	})
	ctx := t.Context()
	_, err := c.GetBlob(ctx, ngctest.CUDARepo, forbidden.Digest, 0)
	ue := matchesOnly(t, err, ErrDenied)
	if ue.Path != "/blobs/"+forbidden.Digest.String() {
		t.Errorf("CDN error path %q", ue.Path)
	}
	_, err2 := c.GetBlob(ctx, ngctest.CUDARepo, broken.Digest, 0)
	if err2 == nil {
		t.Fatal("broken CDN connection: no error")
	}
	_, err3 := c.ListTags(ctx, ngctest.PytorchRepo, 5, "17.12")
	matchesOnly(t, err3, ErrUnavailable)
	for _, e := range []error{err, err2, err3} {
		if msg := e.Error(); strings.ContainsAny(msg, "?") || strings.Contains(msg, "Signature=") || strings.Contains(msg, "Expires=") || strings.Contains(msg, "last=") {
			t.Errorf("error carries a URL query: %q", msg)
		}
	}
}

// fakeClock is a settable time source for Client.now.
type fakeClock struct{ ns atomic.Int64 }

func (f *fakeClock) now() time.Time          { return time.Unix(0, f.ns.Load()) }
func (f *fakeClock) advance(d time.Duration) { f.ns.Add(int64(d)) }
func newFakeClock(start time.Time) *fakeClock {
	f := &fakeClock{}
	f.ns.Store(start.UnixNano())
	return f
}

func TestBackoffAfter429(t *testing.T) {
	t.Parallel()
	c, up, fx := newTestClient(t)
	clock := newFakeClock(time.Now())
	c.now = clock.now
	var refused atomic.Int32
	c.OnBackoffRefusal = func() { refused.Add(1) }
	var limited atomic.Bool
	limited.Store(true)
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !limited.Load() || !strings.Contains(r.URL.Path, "/manifests/") {
			return false
		}
		w.Header().Set("Retry-After", "30")
		w.WriteHeader(http.StatusTooManyRequests)
		return true
	})
	ctx := t.Context()
	_, err := c.GetManifest(ctx, ngctest.CUDARepo, ngctest.CUDATag, nil)
	ue := matchesOnly(t, err, ErrTooManyRequests)
	if ue.RetryAfter != 30*time.Second {
		t.Fatalf("429 RetryAfter %v, want 30s", ue.RetryAfter)
	}
	if refused.Load() != 0 {
		t.Fatal("the 429 itself counted as a refusal")
	}
	limited.Store(false) // the upstream would answer now: only the client holds back

	seen := len(up.Requests())
	clock.advance(10 * time.Second)
	for i, call := range []func() error{
		func() error { _, err := c.GetManifest(ctx, ngctest.CUDARepo, ngctest.CUDATag, nil); return err },
		func() error { _, err := c.GetBlob(ctx, ngctest.CUDARepo, fx.CUDA.Layers[0].Digest, 0); return err },
		func() error { _, err := c.ListTags(ctx, ngctest.CUDARepo, 0, ""); return err },
		func() error { return c.Ping(ctx) },
	} {
		err := call()
		ue := matchesOnly(t, err, ErrTooManyRequests)
		if ue.StatusCode != http.StatusTooManyRequests || ue.RetryAfter < time.Second || ue.RetryAfter > 30*time.Second {
			t.Fatalf("call %d: got %+v, want a 429 with RetryAfter in [1s, 30s]", i, ue)
		}
		if ue.RetryAfter != 20*time.Second {
			t.Fatalf("call %d: RetryAfter %v, want the 20s left", i, ue.RetryAfter)
		}
	}
	if n := len(up.Requests()) - seen; n != 0 {
		t.Fatalf("the upstream received %d requests during the backoff", n)
	}
	if refused.Load() != 4 {
		t.Fatalf("OnBackoffRefusal called %d times, want 4", refused.Load())
	}

	clock.advance(20*time.Second + time.Millisecond)
	m, err := c.GetManifest(ctx, ngctest.CUDARepo, ngctest.CUDATag, nil)
	if err != nil || m.Digest != fx.CUDA.Manifest.Digest {
		t.Fatalf("after the backoff: %v", err)
	}
	if len(up.Requests()) == seen {
		t.Fatal("the upstream saw nothing after the backoff")
	}
	if refused.Load() != 4 {
		t.Fatalf("refusals after the backoff: %d", refused.Load())
	}
}

func TestBackoffCapped(t *testing.T) {
	t.Parallel()
	c, up, _ := newTestClient(t)
	clock := newFakeClock(time.Now())
	c.now = clock.now
	var retryAfter atomic.Value
	retryAfter.Store("3600")
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("Retry-After", retryAfter.Load().(string))
		w.WriteHeader(http.StatusTooManyRequests)
		return true
	})
	ctx := t.Context()
	if ue := matchesOnly(t, c.Ping(ctx), ErrTooManyRequests); ue.RetryAfter != time.Hour {
		t.Fatalf("429 RetryAfter %v, want the upstream's 1h", ue.RetryAfter)
	}
	if ue := matchesOnly(t, c.Ping(ctx), ErrTooManyRequests); ue.RetryAfter != MaxBackoff {
		t.Fatalf("refusal RetryAfter %v, want MaxBackoff", ue.RetryAfter)
	}
	// Past the cap the client sends again.
	clock.advance(MaxBackoff + time.Second)
	n := len(up.Requests())
	retryAfter.Store("60")
	if ue := matchesOnly(t, c.Ping(ctx), ErrTooManyRequests); ue.RetryAfter != time.Minute || len(up.Requests()) == n {
		t.Fatalf("after the cap: %+v, %d new requests; want the upstream's 60s", ue, len(up.Requests())-n)
	}
	n = len(up.Requests())
	clock.advance(30 * time.Second)
	if ue := matchesOnly(t, c.Ping(ctx), ErrTooManyRequests); ue.RetryAfter != 30*time.Second || len(up.Requests()) != n {
		t.Fatalf("refusal: %+v, %d new requests", ue, len(up.Requests())-n)
	}
}

// TestBackoffNotShortened: of two 429s answered together, the shorter
// Retry-After does not cut the longer one short.
func TestBackoffNotShortened(t *testing.T) {
	t.Parallel()
	c, up, _ := newTestClient(t)
	clock := newFakeClock(time.Now())
	c.now = clock.now
	var arrivals atomic.Int32
	both := make(chan struct{})
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if arrivals.Add(1) == 2 {
			close(both)
		}
		select { // both requests are in flight
		case <-both:
		case <-time.After(2 * time.Second):
			t.Error("the two requests were not in flight together")
		}
		if r.URL.Path == "/v2/" {
			w.Header().Set("Retry-After", "60")
			w.WriteHeader(http.StatusTooManyRequests)
			return true
		}
		// The short one answers last.
		time.Sleep(50 * time.Millisecond)
		w.Header().Set("Retry-After", "5")
		w.WriteHeader(http.StatusTooManyRequests)
		return true
	})
	ctx := t.Context()
	errs := make(chan error, 2)
	go func() { errs <- c.Ping(ctx) }()
	go func() { _, err := c.ListTags(ctx, ngctest.CUDARepo, 0, ""); errs <- err }()
	for range 2 {
		if err := <-errs; !errors.Is(err, ErrTooManyRequests) {
			t.Fatalf("got %v, want a 429", err)
		}
	}
	if ue := matchesOnly(t, c.Ping(ctx), ErrTooManyRequests); ue.RetryAfter != time.Minute {
		t.Fatalf("refusal RetryAfter %v, want the longer 60s", ue.RetryAfter)
	}
	if n := len(up.Requests()); n != 2 {
		t.Fatalf("upstream saw %d requests, want 2", n)
	}
}

// TestCaptivePortal: an uplink that answers every request with a 200 HTML
// page is not a registry: each call fails with ErrNotRegistry (none returns
// the page as content), and so does a GET /v2/ without the registry's
// Docker-Distribution-API-Version header.
func TestCaptivePortal(t *testing.T) {
	t.Parallel()
	c, up, fx := newTestClient(t)
	ctx := t.Context()
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("ping of the real fake: %v", err)
	}
	var mu sync.Mutex
	results := map[string][]int{}
	c.OnRequest = func(kind string, status int, _ time.Duration) {
		mu.Lock()
		defer mu.Unlock()
		results[kind] = append(results[kind], status)
	}
	up.SetFault(ngctest.CaptivePortal)
	layer := fx.CUDA.Layers[0]
	for name, call := range map[string]func() error{
		"ping":          func() error { return c.Ping(ctx) },
		"manifest":      func() error { _, err := c.GetManifest(ctx, ngctest.CUDARepo, ngctest.CUDATag, nil); return err },
		"manifest HEAD": func() error { _, err := c.HeadManifest(ctx, ngctest.CUDARepo, ngctest.CUDATag, nil); return err },
		"blob":          func() error { _, err := c.GetBlob(ctx, ngctest.CUDARepo, layer.Digest, 0); return err },
		"blob HEAD":     func() error { _, err := c.HeadBlob(ctx, ngctest.CUDARepo, layer.Digest); return err },
		"tags":          func() error { _, err := c.ListTags(ctx, ngctest.CUDARepo, 0, ""); return err },
	} {
		if err := call(); !errors.Is(err, ErrNotRegistry) {
			t.Errorf("%s through a captive portal: %v, want ErrNotRegistry", name, err)
		}
	}
	// The exchanges are recorded as not a registry's, not as 2xx: the
	// upstream-failing alert counts them.
	mu.Lock()
	for _, kind := range []string{"manifest", "blob", "tags"} {
		if !slices.Contains(results[kind], metrics.StatusNotRegistry) || slices.Contains(results[kind], http.StatusOK) {
			t.Errorf("%s exchanges through a captive portal recorded as %v, want StatusNotRegistry", kind, results[kind])
		}
	}
	mu.Unlock()
	if StatusNotRegistry != metrics.StatusNotRegistry {
		t.Fatal("upstream.StatusNotRegistry and metrics.StatusNotRegistry differ")
	}
	// Only the CDN answers HTML: the blob is refused after the redirect.
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool { return up.IsCDN(r) && ngctest.CaptivePortal(w, r) })
	if _, err := c.GetBlob(ctx, ngctest.CUDARepo, layer.Digest, 0); !errors.Is(err, ErrNotRegistry) {
		t.Errorf("HTML from the CDN: %v, want ErrNotRegistry", err)
	}
	mu.Lock()
	if b := results["blob"]; len(b) == 0 || b[len(b)-1] != StatusNotRegistry {
		t.Errorf("a 200 HTML page from the CDN recorded as %v, want StatusNotRegistry last", b)
	}
	mu.Unlock()
	// A JSON 200 without the API version header on /v2/.
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/v2/" {
			return false
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte("{}"))
		return true
	})
	if err := c.Ping(ctx); !errors.Is(err, ErrNotRegistry) {
		t.Errorf("/v2/ without Docker-Distribution-API-Version: %v, want ErrNotRegistry", err)
	}
}

// TestListAllTags: every Link page is merged (the fake, like nvcr.io,
// sends 100 a page); a Link to another origin is not followed, the next
// page is asked on the registry with last= instead; the page bound cuts
// the list and says so.
func TestListAllTags(t *testing.T) {
	t.Parallel()
	c, up, fx := newTestClient(t)
	ctx := t.Context()
	for i := range 250 {
		up.AddTag(ngctest.CUDARepo, fmt.Sprintf("t%03d", i), fx.CUDA.Manifest.Digest)
	}
	tags, complete, err := c.ListAllTags(ctx, ngctest.CUDARepo, "", 0)
	if err != nil || !complete || len(tags) != 251 || !sort.StringsAreSorted(tags) {
		t.Fatalf("all tags: %d complete=%v %v", len(tags), complete, err)
	}
	tags, complete, err = c.ListAllTags(ctx, ngctest.CUDARepo, "", 2)
	if err != nil || complete || len(tags) != 2*ngctest.TagPageSize {
		t.Fatalf("bounded: %d complete=%v %v", len(tags), complete, err)
	}
	// A Link elsewhere: never followed (credentials stay with the registry).
	var elsewhere atomic.Int32
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { elsewhere.Add(1) }))
	t.Cleanup(other.Close)
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasSuffix(r.URL.Path, "/tags/list") || r.Header.Get("Authorization") == "" {
			return false
		}
		all := []string{}
		for i := range 250 {
			all = append(all, fmt.Sprintf("t%03d", i))
		}
		page := all[:100]
		if last := r.URL.Query().Get("last"); last != "" {
			i := sort.SearchStrings(all, last) + 1
			page = all[i:min(i+100, len(all))]
		}
		if page[len(page)-1] != all[len(all)-1] {
			w.Header().Set("Link", `<`+other.URL+`/v2/`+ngctest.CUDARepo+`/tags/list?last=`+page[len(page)-1]+`>; rel="next"`)
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"tags": page})
		return true
	})
	tags, complete, err = c.ListAllTags(ctx, ngctest.CUDARepo, "", 0)
	if err != nil || !complete || len(tags) != 250 || elsewhere.Load() != 0 {
		t.Fatalf("off-origin Link: %d complete=%v %v, %d requests elsewhere", len(tags), complete, err, elsewhere.Load())
	}
}
