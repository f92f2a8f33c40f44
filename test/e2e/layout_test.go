//go:build e2e

package e2e

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// TestOldLayoutCacheServed: a cache written by the mirror before cache
// layouts were versioned (layout 1; the literal paths of that code) is
// migrated when the new binary starts on it, and served: the tag, the
// manifest and every blob come from the cache, with the repository links
// it recorded, without one upstream blob request or manifest GET.
func TestOldLayoutCacheServed(t *testing.T) {
	up, fx := newUpstream(t)
	dataDir := t.TempDir()
	im, repo, tag := fx.CUDA, ngctest.CUDARepo, ngctest.CUDATag
	write := func(rel string, data []byte) {
		p := filepath.Join(dataDir, filepath.FromSlash(rel))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	hexOf := func(c ngctest.Content) string { return c.Digest.Encoded() }
	for _, b := range im.Blobs() {
		write("blobs/sha256/"+hexOf(b)[:2]+"/"+hexOf(b), b.Body)
		write("repositories/"+repo+"/_links/sha256/"+hexOf(b), nil)
	}
	m := im.Manifest
	write("manifests/sha256/"+hexOf(m)[:2]+"/"+hexOf(m), append([]byte(m.MediaType+"\n"), m.Body...))
	write("repositories/"+repo+"/_links/sha256/"+hexOf(m), nil)
	rec, _ := json.Marshal(map[string]any{"digest": m.Digest, "mediaType": m.MediaType, "size": len(m.Body),
		"confirmedAt": time.Now().Add(-time.Minute).UTC()}) // fresh: served without asking
	write("repositories/"+repo+"/_tags/"+tag, rec)

	mir := startMirrorAt(t, up.URL(), dataDir, "")
	get := func(path string) []byte {
		t.Helper()
		resp, err := http.Get("http://" + mir.addr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d %s", path, resp.StatusCode, body)
		}
		return body
	}
	if got := get("/v2/" + repo + "/manifests/" + tag); !bytes.Equal(got, m.Body) {
		t.Fatal("manifest by tag differs")
	}
	for _, b := range im.Blobs() {
		if got := get("/v2/" + repo + "/blobs/" + b.Digest.String()); !bytes.Equal(got, b.Body) {
			t.Fatalf("blob %s differs", b.Digest)
		}
	}
	if n := up.Count("registry", http.MethodGet, "/v2/"+repo+"/manifests/"+tag); n != 0 {
		t.Errorf("the tag was fetched from the upstream %d times: the old tag record was not read", n)
	}
	for _, b := range im.Blobs() {
		for _, method := range []string{http.MethodHead, http.MethodGet} {
			if n := up.Count("registry", method, "/v2/"+repo+"/blobs/"+b.Digest.String()); n != 0 {
				t.Errorf("%s of blob %s upstream: the old links were not read", method, b.Digest)
			}
		}
	}
	// Now in layout 2, keyed by the upstream's registry.
	if _, err := os.Stat(cachePath(t, dataDir, storage.TagPath{Repo: storage.Repo{Registry: up.Host(), Name: repo}, Tag: tag})); err != nil {
		t.Errorf("tag record not migrated: %v", err)
	}
	if raw, err := os.ReadFile(cachePath(t, dataDir, storage.LayoutPath{})); err != nil || !bytes.Contains(raw, []byte(`"version":2`)) {
		t.Errorf("layout record %q, %v", raw, err)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "repositories")); !os.IsNotExist(err) {
		t.Errorf("the old repositories directory is still there: %v", err)
	}
}
