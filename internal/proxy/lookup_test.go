package proxy_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"

	driver "github.com/distribution/distribution/v3/registry/storage/driver"
)

// countingDriver counts the calls made to a storage driver, by method and
// top-level directory ("Stat /blobs"), and can remove a blob right after
// a Stat of it found it (gc or eviction in that window).
type countingDriver struct {
	driver.StorageDriver
	vanishAfterStat bool

	mu    sync.Mutex
	calls map[string]int
}

func (d *countingDriver) count(method, path string) {
	top, _, _ := strings.Cut(strings.TrimPrefix(path, "/"), "/")
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.calls == nil {
		d.calls = map[string]int{}
	}
	d.calls[method+" /"+top]++
}

// take returns the counts so far and starts again.
func (d *countingDriver) take() map[string]int {
	d.mu.Lock()
	defer d.mu.Unlock()
	c := d.calls
	d.calls = nil
	return c
}

func (d *countingDriver) Stat(ctx context.Context, path string) (driver.FileInfo, error) {
	d.count("Stat", path)
	fi, err := d.StorageDriver.Stat(ctx, path)
	if err == nil && d.vanishAfterStat && strings.HasPrefix(path, "/blobs/") {
		_ = d.StorageDriver.Delete(ctx, path)
	}
	return fi, err
}

func (d *countingDriver) Reader(ctx context.Context, path string, offset int64) (io.ReadCloser, error) {
	d.count("Reader", path)
	return d.StorageDriver.Reader(ctx, path, offset)
}

func (d *countingDriver) GetContent(ctx context.Context, path string) ([]byte, error) {
	d.count("GetContent", path)
	return d.StorageDriver.GetContent(ctx, path)
}

func (d *countingDriver) PutContent(ctx context.Context, path string, content []byte) error {
	d.count("PutContent", path)
	return d.StorageDriver.PutContent(ctx, path, content)
}

func (d *countingDriver) Writer(ctx context.Context, path string, append bool) (driver.FileWriter, error) {
	d.count("Writer", path)
	return d.StorageDriver.Writer(ctx, path, append)
}

func (d *countingDriver) Move(ctx context.Context, from, to string) error {
	d.count("Move", to)
	return d.StorageDriver.Move(ctx, from, to)
}

func (d *countingDriver) Delete(ctx context.Context, path string) error {
	d.count("Delete", path)
	return d.StorageDriver.Delete(ctx, path)
}

// TestCacheHitOpensFirst: on a local disk a cache-hit blob GET opens the
// blob and takes its size from the open file, with no stat before it: a
// removal (gc, eviction) after a stat can no longer turn a hit into a miss,
// and the driver is not asked at all.
func TestCacheHitOpensFirst(t *testing.T) {
	t.Parallel()
	cd := &countingDriver{}
	e := newEnv(t, envOpts{keepLocal: true, wrap: func(d driver.StorageDriver) driver.StorageDriver {
		cd.StorageDriver = d
		return cd
	}})
	layer := e.fx.CUDA.Layers[1]
	path := "/v2/nvidia/cuda/blobs/" + layer.Digest.String()
	mustServe(t, e, path, layer.Body) // a miss: fetched and cached
	assertCached(t, e, layer.Digest, "the fill")
	cd.take()
	cd.vanishAfterStat = true // gc right after any stat of the blob
	for _, rng := range []string{"", "bytes=10-19"} {
		r := e.do(t, http.MethodGet, path, "Range", rng)
		want, status := layer.Body, http.StatusOK
		if rng != "" {
			want, status = layer.Body[10:20], http.StatusPartialContent
		}
		mustOK(t, r, status)
		if !bytes.Equal(r.body, want) || r.header.Get("Content-Length") != itoa(len(want)) {
			t.Fatalf("hit %q: %d bytes, Content-Length %s", rng, len(r.body), r.header.Get("Content-Length"))
		}
	}
	if n := e.up.BlobFetches(layer.Digest); n != 1 {
		t.Errorf("the blob was fetched %d times: a hit became a miss", n)
	}
	if calls := cd.take(); calls["Stat /blobs"] != 0 || calls["Reader /blobs"] != 0 {
		t.Errorf("driver calls on cache hits: %v; want no stat or read through the driver (the file is opened first)", calls)
	}
}

// TestS3FillChecksExistenceOnce: a cold blob GET on S3 checks whether the
// blob exists once (the cache lookup); the fill trusts that lookup and its
// commit needs no check either.
func TestS3FillChecksExistenceOnce(t *testing.T) {
	t.Parallel()
	cd := &countingDriver{}
	e := newEnv(t, envOpts{s3: true, wrap: func(d driver.StorageDriver) driver.StorageDriver {
		cd.StorageDriver = d
		return cd
	}})
	im := e.fx.CUDA.Child("linux/amd64")
	if im == nil {
		im = e.fx.CUDA
	}
	mustOK(t, e.do(t, http.MethodGet, "/v2/nvidia/cuda/manifests/"+im.Manifest.Digest.String()), 200)
	waitFills(t, e)
	for _, b := range im.Blobs() {
		cd.take()
		mustServe(t, e, "/v2/nvidia/cuda/blobs/"+b.Digest.String(), b.Body)
		assertCached(t, e, b.Digest, "the fill")
		calls := cd.take()
		t.Logf("driver calls for a cold blob GET and the check after it: %v", calls)
		// One Stat is the lookup; assertCached's StatBlob is the other.
		if n := calls["Stat /blobs"]; n != 2 {
			t.Errorf("blob %s: %d existence checks of the blob (Stat /blobs) for a fill, want 1 (plus the test's own)", b.Digest, n-1)
		}
	}
}
