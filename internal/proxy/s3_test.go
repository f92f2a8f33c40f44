package proxy_test

import (
	"bytes"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/evict"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

// TestS3Cache runs the pull-through, coalescing and Range behaviour with
// the cache on a real S3 server.
func TestS3Cache(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{s3: true, layerSize: 1 << 20})
	im := e.fx.Pytorch.Child("linux/amd64")
	layer := im.Layers[1]
	path := "/v2/nvidia/pytorch/blobs/" + layer.Digest.String()

	// Several clients at once on a cold blob: one upstream fetch.
	var wg sync.WaitGroup
	errs := make([]string, 6)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := e.do(t, http.MethodGet, path)
			if r.err != nil || r.status != 200 || !bytes.Equal(r.body, layer.Body) {
				errs[i] = "bad response"
			}
		}()
	}
	wg.Wait()
	if strings.Join(errs, "") != "" {
		t.Fatalf("concurrent cold pulls: %v", errs)
	}
	if n := e.up.BlobFetches(layer.Digest); n != 1 {
		t.Fatalf("upstream fetches %d, want 1", n)
	}
	assertCached(t, e, layer.Digest, "the fill to S3")
	// Hit with Range, served through the mirror.
	r := e.do(t, http.MethodGet, path, "Range", "bytes=100-199")
	mustOK(t, r, http.StatusPartialContent)
	if !bytes.Equal(r.body, layer.Body[100:200]) {
		t.Fatal("range hit differs")
	}
	// The rest of the image, byte for byte.
	mustOK(t, e.do(t, http.MethodGet, "/v2/nvidia/pytorch/manifests/"+im.Manifest.Digest.String()), 200)
	for _, b := range im.Blobs() {
		r := e.do(t, http.MethodGet, "/v2/nvidia/pytorch/blobs/"+b.Digest.String())
		mustOK(t, r, 200)
		if !bytes.Equal(r.body, b.Body) {
			t.Fatalf("blob %s differs", b.Digest)
		}
	}
}

// TestS3Redirect: with redirects on, a cache-hit blob GET answers 307 to a
// presigned URL that serves the blob (and a Range of it); HEAD is still
// answered by the mirror; a miss still streams through the mirror.
func TestS3Redirect(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{s3: true, redirect: true})
	layer := e.fx.CUDA.Layers[1]
	path := "/v2/nvidia/cuda/blobs/" + layer.Digest.String()
	r := e.do(t, http.MethodGet, path) // miss: streamed by the mirror
	mustOK(t, r, 200)
	waitFills(t, e)

	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noFollow.Get(e.url(path))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusTemporaryRedirect || !strings.Contains(loc, "X-Amz-Signature=") {
		t.Fatalf("hit: %d, Location %q", resp.StatusCode, loc)
	}
	r = e.do(t, http.MethodGet, path) // followed by the default client
	mustOK(t, r, 200)
	if !bytes.Equal(r.body, layer.Body) {
		t.Fatal("blob fetched through the redirect differs")
	}
	r = e.do(t, http.MethodGet, path, "Range", "bytes=10-19")
	mustOK(t, r, http.StatusPartialContent)
	if !bytes.Equal(r.body, layer.Body[10:20]) {
		t.Fatal("range through the redirect differs")
	}
	r = e.do(t, http.MethodHead, path)
	mustOK(t, r, 200)
	if r.header.Get("Content-Length") != itoa(len(layer.Body)) || r.header.Get("Docker-Content-Digest") != layer.Digest.String() {
		t.Fatalf("HEAD: %v", r.header)
	}
}

// TestS3RedirectOutlivesEviction: a blob a client was just redirected to
// stays in the bucket until the presigned URL expires, even when eviction
// wants the room before the client's GET reaches the store.
func TestS3RedirectOutlivesEviction(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{s3: true, redirect: true, budget: func(fx *ngctest.Fixture) evict.Options {
		// Room for one of the two layers, not both.
		return evict.Options{MaxSize: sizeOf(fx.CUDA.Layers[0], fx.CUDA.Layers[1]) - 1}
	}})
	a, b := e.fx.CUDA.Layers[1], e.fx.CUDA.Layers[0]
	pathA := "/v2/nvidia/cuda/blobs/" + a.Digest.String()
	mustServe(t, e, pathA, a.Body) // a miss: cached
	assertCached(t, e, a.Digest, "the fill")

	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noFollow.Get(e.url(pathA))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusTemporaryRedirect || loc == "" {
		t.Fatalf("hit: %d, Location set %v", resp.StatusCode, loc != "")
	}
	// Before the client follows: another blob takes the cache over its
	// budget, and a is the least recently used.
	mustServe(t, e, "/v2/nvidia/cuda/blobs/"+b.Digest.String(), b.Body)
	waitFills(t, e)
	if _, err := e.evictor.Evict(t.Context()); err != nil {
		t.Fatal(err)
	}
	got, err := http.Get(loc)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(got.Body)
	got.Body.Close()
	if err != nil || got.StatusCode != http.StatusOK || !bytes.Equal(body, a.Body) {
		t.Fatalf("the presigned URL after eviction: %d, %d bytes (want %d), %v", got.StatusCode, len(body), len(a.Body), err)
	}
	if _, err := e.store.StatBlob(t.Context(), a.Digest); err != nil {
		t.Errorf("the redirected blob was evicted: %v", err)
	}
}
