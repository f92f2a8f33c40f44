package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// TestSecondMirrorOnDataDirRefused: a second `mirror serve` on the data
// directory of a running one, with a state file of its own (so the state
// store's lock does not stop it), refuses to start, naming the first one's
// PID, and leaves the upload of the first one's running download alone:
// that download completes and is served whole.
func TestSecondMirrorOnDataDirRefused(t *testing.T) {
	up := ngctest.New(ngctest.Options{})
	defer up.Close()
	fx, err := up.Populate(256 << 10)
	if err != nil {
		t.Fatal(err)
	}
	layer := fx.CUDA.Layers[0]
	// The layer's download stalls half way until released.
	stalled, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !up.IsCDN(r) || !strings.HasSuffix(r.URL.Path, layer.Digest.String()) {
			return false
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(layer.Body)))
		w.WriteHeader(http.StatusOK)
		half := len(layer.Body) / 2
		_, _ = w.Write(layer.Body[:half])
		w.(http.Flusher).Flush()
		once.Do(func() { close(stalled) })
		select {
		case <-release:
		case <-r.Context().Done():
			return true
		}
		_, _ = w.Write(layer.Body[half:])
		return true
	})

	dataDir := t.TempDir()
	cfgDir := t.TempDir()
	config := func(name string) string {
		return testsupport.WriteConfig(t, "state: {path: "+filepath.Join(cfgDir, name+"-state.db")+"}\n")
	}
	env := func(name, addr string) map[string]string {
		return map[string]string{"MIRROR_CONFIG": config(name), "MIRROR_ADDR": addr, "MIRROR_UPSTREAM": up.URL(),
			"MIRROR_DATA_DIR": dataDir, "MIRROR_LOG_LEVEL": "warn"}
	}
	addrA := testsupport.FreeAddr(t)
	first, _, firstErr := startMirror(t, up.URL(), env("first", addrA))
	c := &http.Client{Timeout: 2 * time.Minute}
	defer c.CloseIdleConnections()

	type result struct {
		status int
		sum    string
		err    error
	}
	got := make(chan result, 1)
	go func() {
		resp, err := c.Get("http://" + addrA + "/v2/" + ngctest.CUDARepo + "/blobs/" + layer.Digest.String())
		if err != nil {
			got <- result{err: err}
			return
		}
		defer resp.Body.Close()
		h := sha256.New()
		_, err = io.Copy(h, resp.Body)
		got <- result{status: resp.StatusCode, sum: "sha256:" + hex.EncodeToString(h.Sum(nil)), err: err}
	}()
	select {
	case <-stalled:
	case <-time.After(time.Minute):
		t.Fatalf("the download did not start\n%s", firstErr)
	}
	uploads := func() []string {
		var out []string
		entries, _ := os.ReadDir(filepath.Join(dataDir, "_uploads"))
		for _, e := range entries {
			if !strings.HasSuffix(e.Name(), ".live") {
				out = append(out, e.Name())
			}
		}
		return out
	}
	testsupport.Eventually(t, 30*time.Second, "the first mirror's upload", func() bool { return len(uploads()) == 1 })

	addrB := testsupport.FreeAddr(t)
	second, secondErr := mirrorProcess(t, env("second", addrB))
	started := false
	ok := testsupport.Until(30*time.Second, 20*time.Millisecond, func() bool {
		select {
		case <-second.Exited():
			return true
		default:
		}
		if resp, err := c.Get("http://" + addrB + "/healthz"); err == nil {
			resp.Body.Close()
			started = true
		}
		return started
	})
	switch {
	case started:
		t.Errorf("a second mirror started on the data directory of a running one\n%s", secondErr)
	case !ok:
		t.Fatalf("the second mirror neither started nor exited\n%s", secondErr)
	}
	if code := second.Cmd.ProcessState.ExitCode(); code != 1 {
		t.Errorf("second mirror: exit code %d, want 1", code)
	}
	if want := fmt.Sprintf("in use by process %d", first.Cmd.Process.Pid); !strings.Contains(secondErr.String(), want) {
		t.Errorf("second mirror's error does not say %q:\n%s", want, secondErr)
	}
	if len(uploads()) != 1 {
		t.Errorf("the running download's upload is gone: %v", uploads())
	}

	// The maintenance commands run beside a serving mirror by design (a
	// running download's upload has a live marker): gc does not wait for
	// the lock, and spares the upload whatever its grace.
	gc := exec.Command(os.Args[0], "-test.run=^$")
	gc.Env = append(os.Environ(), "MIRROR_TEST_MAIN=gc --grace 0s", "MIRROR_CONFIG="+config("first"), "MIRROR_DATA_DIR="+dataDir)
	if out, err := gc.CombinedOutput(); err != nil || !strings.Contains(string(out), "0 stale uploads") {
		t.Errorf("mirror gc beside the serving mirror: %v\n%s", err, out)
	}
	if len(uploads()) != 1 {
		t.Errorf("the running download's upload is gone after gc: %v", uploads())
	}

	close(release)
	select {
	case r := <-got:
		if r.err != nil || r.status != http.StatusOK || r.sum != layer.Digest.String() {
			t.Fatalf("the first mirror's download: status %d, digest %s, %v (want 200, %s)\n%s", r.status, r.sum, r.err, layer.Digest, firstErr)
		}
	case <-time.After(time.Minute):
		t.Fatal("the first mirror's download did not end")
	}
	if bytes.Contains([]byte(firstErr.String()), []byte("level=ERROR")) {
		t.Errorf("the first mirror logged errors:\n%s", firstErr)
	}
}

// TestStartLogsRemovedUploads: uploads a crash left in a filesystem cache
// are removed at start-up with one INFO line that counts them.
func TestStartLogsRemovedUploads(t *testing.T) {
	up := ngctest.New(ngctest.Options{})
	defer up.Close()
	dataDir, cfgDir := t.TempDir(), t.TempDir()
	if err := os.MkdirAll(filepath.Join(dataDir, "_uploads"), 0o750); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"aa", "aa.live", "bb"} {
		if err := os.WriteFile(filepath.Join(dataDir, "_uploads", f), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfg := testsupport.WriteConfig(t, "state: {path: "+filepath.Join(cfgDir, "state.db")+"}\n")
	p, _, stderr := startMirror(t, up.URL(), map[string]string{"MIRROR_CONFIG": cfg, "MIRROR_DATA_DIR": dataDir, "MIRROR_LOG_LEVEL": "info"})
	p.Stop()
	if !strings.Contains(stderr.String(), `msg="removed interrupted uploads" count=2`) {
		t.Errorf("no line counting the 2 removed uploads in\n%s", stderr)
	}
	if left, _ := os.ReadDir(filepath.Join(dataDir, "_uploads")); len(left) != 0 {
		t.Errorf("left in _uploads: %v", left)
	}
}
