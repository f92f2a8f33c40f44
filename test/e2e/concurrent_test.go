//go:build e2e

package e2e

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// startContainerd starts a private containerd (no CRI) and returns its
// socket. It fails loudly when the daemon cannot start.
func startContainerd(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "e2e-containerd-")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "containerd.sock")
	cfg := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), sock)), 0o600); err != nil {
		t.Fatal(err)
	}
	log := &syncBuffer{}
	cmd := exec.Command("containerd", "--config", cfg)
	cmd.Stdout, cmd.Stderr = log, log
	t.Cleanup(func() { _ = os.RemoveAll(dir) }) // after the daemon stopped
	if _, err := testsupport.Start(t, cmd, syscall.SIGTERM); err != nil {
		t.Fatalf("CONTAINERD DID NOT START: %v", err)
	}
	var out []byte
	if !testsupport.Until(30*time.Second, 100*time.Millisecond, func() bool {
		out, err = exec.Command("ctr", "-a", sock, "version").CombinedOutput()
		return err == nil
	}) {
		t.Fatalf("CONTAINERD DID NOT START within 30 s: %v\n%s\n%s", err, out, log.String())
	}
	return sock
}

// TestConcurrentClientsOneFetchPerBlob: skopeo, crane and containerd (through
// hosts.toml for nvcr.io, so with ?ns=nvcr.io) pull the same cold image at
// the same moment, several of each; the upstream serves every blob once.
func TestConcurrentClientsOneFetchPerBlob(t *testing.T) {
	need(t, "skopeo", "crane", "containerd", "ctr")
	up := ngctest.New(ngctest.Options{})
	t.Cleanup(up.Close)
	fx, err := up.Populate(2 << 20)
	if err != nil {
		t.Fatal(err)
	}
	// Slow the CDN down so that every client asks while the fills run.
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if up.IsCDN(r) {
			time.Sleep(300 * time.Millisecond)
		}
		return false
	})
	m := startMirrorWithConfig(t, up.URL(), testsupport.WriteConfig(t, "upstream:\n  ns_aliases: [nvcr.io]\n"))
	sock := startContainerd(t)
	hostsDir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(hostsDir, "nvcr.io"), 0o755); err != nil {
		t.Fatal(err)
	}
	hosts := fmt.Sprintf("server = \"https://nvcr.io\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", m.addr)
	if err := os.WriteFile(filepath.Join(hostsDir, "nvcr.io", "hosts.toml"), []byte(hosts), 0o644); err != nil {
		t.Fatal(err)
	}

	ref := ngctest.PytorchRepo + ":" + ngctest.PytorchTag
	type job struct {
		name string
		args []string
	}
	var jobs []job
	for i := range 3 {
		jobs = append(jobs,
			job{"skopeo", []string{"--insecure-policy", "copy", "--all", "--retry-times", "0", "--src-tls-verify=false", "docker://" + m.addr + "/" + ref, "dir:" + filepath.Join(t.TempDir(), "s")}},
			job{"crane", []string{"pull", "--insecure", "--format=oci", m.addr + "/" + ref, filepath.Join(t.TempDir(), "c")}},
			job{"ctr", []string{"-a", sock, "-n", "e2e" + strconv.Itoa(i), "content", "fetch", "--all-platforms", "--hosts-dir", hostsDir, "nvcr.io/" + ref}},
		)
	}
	var wg sync.WaitGroup
	errs := make([]string, len(jobs))
	for i, j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if out, err := run(t, 3*time.Minute, j.name, j.args...); err != nil {
				errs[i] = fmt.Sprintf("%s: %v\n%s", j.name, err, out)
			}
		}()
	}
	wg.Wait()
	for _, e := range errs {
		if e != "" {
			t.Error(e)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	for _, b := range fx.Pytorch.Blobs() {
		if n := up.BlobFetches(b.Digest); n != 1 {
			t.Errorf("blob %s (%s) fetched %d times from the upstream, want 1", b.Digest.Encoded()[:12], b.MediaType, n)
		}
	}
	// containerd came with ?ns=nvcr.io; it must have been accepted.
	if !strings.Contains(m.log.String(), "ns=nvcr.io") {
		t.Fatal("the mirror's request log shows no containerd request with ?ns=nvcr.io")
	}
}

// TestKilledFillLeavesNothing: the mirror is killed (SIGKILL) in the middle
// of a blob download; after a restart no partial upload or spool is left,
// the blob is not visible half-written, and a pull completes.
func TestKilledFillLeavesNothing(t *testing.T) {
	need(t, "skopeo")
	up, fx := newUpstream(t)
	layer := fx.CUDA.Layers[1]
	stall := make(chan struct{})
	var stallOnce sync.Once
	t.Cleanup(func() { stallOnce.Do(func() { close(stall) }) })
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !up.IsCDN(r) || !strings.HasSuffix(r.URL.Path, layer.Digest.String()) {
			return false
		}
		select {
		case <-stall: // released: serve normally
			return false
		default:
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(layer.Body)))
		_, _ = w.Write(layer.Body[:len(layer.Body)/2])
		w.(http.Flusher).Flush()
		select {
		case <-stall:
		case <-r.Context().Done():
		}
		return true
	})
	dataDir := t.TempDir()
	m := startMirrorAt(t, up.URL(), dataDir, "")
	go func() {
		resp, err := http.Get("http://" + m.addr + "/v2/" + ngctest.CUDARepo + "/blobs/" + layer.Digest.String())
		if err == nil {
			resp.Body.Close()
		}
	}()
	// Wait until the fill has written half the blob to its upload.
	uploads := cachePath(t, dataDir, storage.UploadsPath{})
	if !testsupport.Until(20*time.Second, 20*time.Millisecond, func() bool {
		entries, _ := os.ReadDir(uploads)
		return len(entries) > 0
	}) {
		t.Fatal("the fill never started writing")
	}
	time.Sleep(200 * time.Millisecond)
	if err := m.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = m.cmd.Wait()
	if entries, _ := os.ReadDir(uploads); len(entries) == 0 {
		t.Fatal("expected the killed fill's upload on disk before the restart")
	}
	final := cachePath(t, dataDir, storage.BlobPath{Digest: layer.Digest})
	if _, err := os.Stat(final); err == nil {
		t.Fatal("a half-written blob is visible at its final path")
	}
	stallOnce.Do(func() { close(stall) })

	m2 := startMirrorAt(t, up.URL(), dataDir, "")
	if entries, _ := os.ReadDir(uploads); len(entries) != 0 {
		t.Fatalf("uploads of the killed fill survived the restart: %d", len(entries))
	}
	if spools, _ := filepath.Glob(filepath.Join(dataDir, "_spool", "fill-*")); len(spools) != 0 {
		t.Fatalf("spool files survived the restart: %v", spools)
	}
	if out, err := skopeoCopy(t, m2.addr+"/"+ngctest.CUDARepo+":"+ngctest.CUDATag, t.TempDir()); err != nil {
		t.Fatalf("pull after restart: %v\n%s", err, out)
	}
	waitNoFills(t, m2)
	if _, err := os.Stat(final); err != nil {
		t.Fatalf("blob not cached after the restart's pull: %v", err)
	}
	// fsck finds a clean cache; after damaging a blob it finds that, and
	// quarantine leaves a clean cache again.
	fsck := func(args ...string) (string, int) {
		return runCLI(t, []string{"MIRROR_DATA_DIR=" + dataDir}, append([]string{"fsck"}, args...)...)
	}
	if out, code := fsck(); code != 0 || !strings.Contains(out, "clean") {
		t.Fatalf("fsck after kill -9 and restart: exit %d\n%s", code, out)
	}
	raw, _ := os.ReadFile(final)
	raw[len(raw)/2] ^= 0xff
	if err := os.WriteFile(final, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, code := fsck(); code != 1 || !strings.Contains(out, "DAMAGED blob "+layer.Digest.String()) {
		t.Fatalf("fsck of a damaged blob: exit %d\n%s", code, out)
	}
	if out, code := fsck("--repair", "quarantine"); code != 1 {
		t.Fatalf("fsck --repair quarantine: exit %d\n%s", code, out)
	}
	if out, code := fsck(); code != 0 {
		t.Fatalf("fsck after quarantine: exit %d\n%s", code, out)
	}
}

// waitNoFills waits (bounded) until the mirror reports no fill in flight:
// clients get a blob's last byte once it is verified, the commit follows.
func waitNoFills(t *testing.T, m *mirror) {
	t.Helper()
	if !testsupport.Until(10*time.Second, 20*time.Millisecond, func() bool {
		resp, err := http.Get("http://" + m.addr + "/metrics")
		if err != nil {
			return false
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return strings.Contains(string(body), "\nngc_mirror_fills_in_flight 0\n")
	}) {
		t.Fatal("fills still in flight after 10 s")
	}
}
