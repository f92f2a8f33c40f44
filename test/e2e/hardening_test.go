//go:build e2e

package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/ocierr"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// TestHugeHeadersAndRateLimit: the binary refuses headers over its limit
// (431) and, with limits.requests_per_second, answers a burst with 429.
func TestHugeHeadersAndRateLimit(t *testing.T) {
	up, _ := newUpstream(t)
	cfg := testsupport.WriteConfig(t, "limits:\n  requests_per_second: 5\n")
	m := startMirrorWithConfig(t, up.URL(), cfg)
	req, _ := http.NewRequest(http.MethodGet, "http://"+m.addr+"/v2/", nil)
	req.Header.Set("X-Huge", strings.Repeat("a", 200<<10))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("200 KiB header: %d, want 431", resp.StatusCode)
	}
	limited := 0
	for i := range 30 {
		resp, err := http.Get("http://" + m.addr + "/v2/")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusTooManyRequests {
			limited++
			env, ok := ocierr.Decode(body)
			if !ok || env.Errors[0].Code != "TOOMANYREQUESTS" || resp.Header.Get("Retry-After") == "" {
				t.Fatalf("429 body %q, Retry-After %q: want the OCI envelope with TOOMANYREQUESTS and a Retry-After", body, resp.Header.Get("Retry-After"))
			}
		}
		// The operational endpoints are neither limited nor counted,
		// also while this client is over its limit.
		if i%10 == 9 {
			for _, p := range []string{"/healthz", "/readyz", "/metrics"} {
				r, err := http.Get("http://" + m.addr + p)
				if err != nil {
					t.Fatal(err)
				}
				r.Body.Close()
				if r.StatusCode == http.StatusTooManyRequests {
					t.Fatalf("%s during a burst: 429; health, readiness and metrics must not be rate limited", p)
				}
			}
		}
	}
	if limited == 0 {
		t.Fatal("30 requests at once at 5 per second: none was rate limited")
	}
	// Each limited request has its access-log line, so an operator sees
	// who is throttled.
	testsupport.Eventually(t, 5*time.Second, "an access-log line per 429", func() bool {
		return strings.Count(m.log.String(), " status=429 ") >= limited
	})
}

// TestGracefulShutdown: SIGTERM while a client downloads a slow cold blob;
// the download completes with the right bytes, then the process exits 0.
func TestGracefulShutdown(t *testing.T) {
	up, fx := newUpstream(t)
	layer := fx.CUDA.Layers[1]
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !up.IsCDN(r) {
			return false
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(layer.Body)))
		half := len(layer.Body) / 2
		_, _ = w.Write(layer.Body[:half])
		w.(http.Flusher).Flush()
		time.Sleep(time.Second)
		_, _ = w.Write(layer.Body[half:])
		return true
	})
	m := startMirror(t, up.URL())
	var got []byte
	var getErr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		resp, err := http.Get("http://" + m.addr + "/v2/" + ngctest.CUDARepo + "/blobs/" + layer.Digest.String())
		if err != nil {
			getErr = err
			return
		}
		defer resp.Body.Close()
		got, getErr = io.ReadAll(resp.Body)
	}()
	time.Sleep(300 * time.Millisecond) // the download is under way
	if err := m.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if getErr != nil || string(got) != string(layer.Body) {
		t.Fatalf("download during shutdown: %v, %d of %d bytes", getErr, len(got), len(layer.Body))
	}
	done := make(chan error, 1)
	go func() { done <- m.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("mirror exit: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("mirror did not exit after SIGTERM")
	}
	// A clean stop says so at the end (U1 F8).
	if _, after, _ := strings.Cut(m.log.String(), "shutting down"); !strings.Contains(after, "ngc-mirror stopped") {
		t.Errorf("no \"ngc-mirror stopped\" after \"shutting down\" in the log:\n%s", m.log.String())
	}
}

// TestTLSReloadAndHTTP2: HTTPS speaks HTTP/2, and a new certificate written
// over the old files is served to new connections after SIGHUP while an
// open connection keeps working.
func TestTLSReloadAndHTTP2(t *testing.T) {
	up, _ := newUpstream(t)
	dirA := t.TempDir()
	certA, keyA := testCertificate(t, dirA)
	m := startMirror(t, up.URL(), "MIRROR_TLS_CERT_FILE="+certA, "MIRROR_TLS_KEY_FILE="+keyA)
	client := func(caDir string) *http.Client {
		pool := x509.NewCertPool()
		raw, err := os.ReadFile(filepath.Join(caDir, "ca.crt"))
		if err != nil {
			t.Fatal(err)
		}
		pool.AppendCertsFromPEM(raw)
		return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}}
	}
	oldClient := client(dirA)
	resp, err := oldClient.Get("https://" + m.addr + "/v2/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.ProtoMajor != 2 {
		t.Fatalf("HTTPS answered with HTTP/%d, want 2", resp.ProtoMajor)
	}
	// A new CA and certificate over the same files, then SIGHUP.
	dirB := t.TempDir()
	certB, keyB := testCertificate(t, dirB)
	for src, dst := range map[string]string{certB: certA, keyB: keyA} {
		raw, _ := os.ReadFile(src)
		if err := os.WriteFile(dst, raw, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if !testsupport.Until(10*time.Second, 100*time.Millisecond, func() bool {
		var resp *http.Response
		if resp, err = client(dirB).Get("https://" + m.addr + "/v2/"); err == nil {
			resp.Body.Close()
		}
		return err == nil
	}) {
		t.Fatalf("the new certificate is not served: %v", err)
	}
	// The connection opened before the reload still works.
	resp, err = oldClient.Get("https://" + m.addr + "/healthz")
	if err != nil {
		t.Fatalf("the open connection broke on reload: %v", err)
	}
	resp.Body.Close()
	if !strings.Contains(m.log.String(), "TLS certificate reloaded") {
		t.Fatal("no reload in the log")
	}
}

// TestCaptivePortalUpstream: behind a captive portal (every upstream
// request answered 200 text/html) the binary answers blob and manifest
// requests with 502 in the OCI error envelope, caches nothing, and /readyz
// reports the upstream as not a registry, saying why, while staying ready.
func TestCaptivePortalUpstream(t *testing.T) {
	up, fx := newUpstream(t)
	up.SetFault(ngctest.CaptivePortal)
	dataDir := t.TempDir()
	m := startMirrorAt(t, up.URL(), dataDir, "")
	for _, path := range []string{
		"/v2/" + ngctest.CUDARepo + "/blobs/" + fx.CUDA.Config.Digest.String(),
		"/v2/" + ngctest.CUDARepo + "/blobs/" + fx.CUDA.Layers[0].Digest.String(),
		"/v2/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag,
		"/v2/" + ngctest.CUDARepo + "/manifests/" + fx.CUDA.Manifest.Digest.String(),
	} {
		resp, err := http.Get("http://" + m.addr + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(body), `"UNAVAILABLE"`) || strings.Contains(string(body), "<html") {
			t.Errorf("GET %s: %d %v %s, want 502 UNAVAILABLE", path, resp.StatusCode, err, body)
		}
	}
	for _, dir := range []string{"blobs", "manifests", "repositories"} {
		if n := countFiles(t, filepath.Join(dataDir, dir)); n > 0 {
			t.Errorf("%d files cached under %s through the portal", n, dir)
		}
	}
	resp, err := http.Get("http://" + m.addr + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"upstream":"not a registry"`) || !strings.Contains(string(body), "Docker-Distribution-API-Version") {
		t.Fatalf("/readyz behind a captive portal: %d %s", resp.StatusCode, body)
	}
}

func countFiles(t *testing.T, root string) int {
	t.Helper()
	n := 0
	_ = filepath.WalkDir(root, func(_ string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			n++
		}
		return nil
	})
	return n
}
