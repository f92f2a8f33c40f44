package proxy_test

import (
	"bytes"
	"net/http"
	"strings"
	"sync"
	"testing"
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
	resp, err := noFollow.Get(e.mirror.URL + path)
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
