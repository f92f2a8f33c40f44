//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// readyz returns the mirror's /readyz status and JSON report (strings,
// and "upstreams": an object by registry name).
func readyz(t *testing.T, m *mirror) (int, map[string]any) {
	t.Helper()
	resp, err := http.Get("http://" + m.addr + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	rep := map[string]any{}
	if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, rep
}

// waitLog waits (bounded) until the mirror's log contains s.
func waitLog(t *testing.T, m *mirror, s string) {
	t.Helper()
	if !testsupport.Until(20*time.Second, 50*time.Millisecond, func() bool { return strings.Contains(m.log.String(), s) }) {
		t.Fatalf("the mirror's log never said %q:\n%s", s, m.log.String())
	}
}

// serveFails runs `mirror serve` that must refuse to start, and returns
// its output.
func serveFails(t *testing.T, env ...string) string {
	t.Helper()
	out, code := runCLI(t, append([]string{"MIRROR_LOG_LEVEL=debug"}, env...), "serve")
	if code == 0 {
		t.Fatalf("mirror serve started (exit 0):\n%s", out)
	}
	return out
}

// TestStartupErrorsNameTheFix: what an operator gets wrong first is
// refused (or reported) in the mirror's log format with the setting that
// fixes it: an htpasswd file of MD5 hashes (htpasswd -B), a port in use
// (MIRROR_ADDR / addr), a second mirror on the same data directory
// (the first holds its lock, named by PID), a config typo (the key path), and a
// wrong NGC API key (logged and in /readyz as refused, not unreachable).
func TestStartupErrorsNameTheFix(t *testing.T) {
	up, _ := newUpstream(t)

	// htpasswd -c without -B writes MD5 ($apr1$): nobody could log in.
	htp := filepath.Join(t.TempDir(), "htpasswd")
	if err := os.WriteFile(htp, []byte("alice:$apr1$gmiCkWW9$Xi6Yr0ih1KFIQcOyIkiYX/\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := serveFails(t, "MIRROR_ADDR="+freeAddr(t), "MIRROR_DATA_DIR="+t.TempDir(),
		"MIRROR_ACCESS_MODE=htpasswd", "MIRROR_HTPASSWD_FILE="+htp)
	for _, want := range []string{"level=ERROR", "alice", "MD5", "htpasswd -B"} {
		if !strings.Contains(out, want) {
			t.Errorf("non-bcrypt htpasswd: output lacks %q:\n%s", want, out)
		}
	}

	// A config typo names the key path.
	cfg := testsupport.WriteConfig(t, "cache:\n  max_szie: 10GiB\n")
	out, code := runCLI(t, []string{"MIRROR_DATA_DIR=" + t.TempDir()}, "serve", "--config", cfg)
	if code != 2 || !strings.Contains(out, "level=ERROR") || !strings.Contains(out, "unknown key cache.max_szie") {
		t.Errorf("config typo:\n%s", out)
	}

	// A wrong key: the mirror serves (cached content), says the key was
	// refused and how to fix it, and /readyz says so too.
	dataDir := t.TempDir()
	m := startMirrorAt(t, up.URL(), dataDir, "", "NGC_API_KEY=nvapi-wrong-key")
	waitLog(t, m, "the upstream refused the NGC API key")
	if !strings.Contains(m.log.String(), "NGC_API_KEY") {
		t.Errorf("the refused-key message does not name NGC_API_KEY:\n%s", m.log.String())
	}
	if _, rep := readyz(t, m); rep["upstream"] != "credentials refused" {
		t.Errorf("/readyz with a wrong key: %v", rep)
	}
	resp, err := http.Get("http://" + m.addr + "/v2/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(body), "refused the mirror's credentials") {
		t.Errorf("a pull with a wrong key: %d %s", resp.StatusCode, body)
	}
	waitLog(t, m, " route=manifest ") // access log lines follow the responses
	assertNoSecrets(t, up, m.log.String(), "nvapi-wrong-key")

	// A second mirror on the same data directory: the first holds its
	// lock (named by PID); it does not start.
	out = serveFails(t, "MIRROR_ADDR="+freeAddr(t), "MIRROR_DATA_DIR="+dataDir, "MIRROR_UPSTREAM="+up.URL())
	for _, want := range []string{"level=ERROR", fmt.Sprintf("in use by process %d", m.cmd.Process.Pid), "data_dir", "MIRROR_DATA_DIR"} {
		if !strings.Contains(out, want) {
			t.Errorf("second mirror on one data_dir: output lacks %q:\n%s", want, out)
		}
	}

	// The port of the first mirror, in use.
	out = serveFails(t, "MIRROR_ADDR="+m.addr, "MIRROR_DATA_DIR="+t.TempDir(), "MIRROR_UPSTREAM="+up.URL())
	for _, want := range []string{"level=ERROR", "in use", "MIRROR_ADDR", "addr"} {
		if !strings.Contains(out, want) {
			t.Errorf("port in use: output lacks %q:\n%s", want, out)
		}
	}
}

// TestReadOnlyDataDir: a mirror whose data disk is read-only starts and
// serves what its cache holds (README, "Health"): the state file cannot be
// opened for writing, so the state store is off, with a warning naming
// state.path and "state":"off" in /readyz.
func TestReadOnlyDataDir(t *testing.T) {
	need(t, "skopeo", "mount", "umount")
	if os.Geteuid() != 0 {
		t.Fatal("the read-only bind mount needs root")
	}
	up, _ := newUpstream(t)
	rw := t.TempDir()
	ref := ngctest.CUDARepo + ":" + ngctest.CUDATag
	m := startMirrorAt(t, up.URL(), rw, "")
	if out, err := skopeoCopy(t, m.addr+"/"+ref, t.TempDir()); err != nil {
		t.Fatalf("warming the cache: %v\n%s", err, out)
	}
	_ = m.cmd.Process.Signal(os.Interrupt)
	_ = m.cmd.Wait()

	ro := t.TempDir()
	if out, err := exec.Command("mount", "--bind", rw, ro).CombinedOutput(); err != nil {
		t.Fatalf("bind mount: %v\n%s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", ro).Run() })
	if out, err := exec.Command("mount", "-o", "remount,ro,bind", ro).CombinedOutput(); err != nil {
		t.Fatalf("read-only remount: %v\n%s", err, out)
	}
	if err := os.WriteFile(filepath.Join(ro, "probe"), nil, 0o600); err == nil {
		t.Fatal("the bind mount is writable")
	}

	// Upstream gone too: everything comes from the read-only cache. (The
	// same upstream URL: the cache keys tags by the upstream's host, and a
	// mirror pointed elsewhere does not serve them.)
	up.Close()
	m = startMirrorAt(t, up.URL(), ro, "")
	waitLog(t, m, "state store off")
	if !strings.Contains(m.log.String(), "state.path") {
		t.Errorf("the warning does not name state.path:\n%s", m.log.String())
	}
	if out, err := skopeoCopy(t, m.addr+"/"+ref, t.TempDir()); err != nil {
		t.Fatalf("pull from the read-only cache: %v\n%s", err, out)
	}
	status, rep := readyz(t, m)
	if rep["state"] != "off" || rep["storage"] != "not writable" || status != http.StatusServiceUnavailable {
		t.Errorf("/readyz on a read-only disk: %d %v", status, rep)
	}
	if _, err := net.Dial("tcp", m.addr); err != nil {
		t.Fatalf("the mirror stopped listening: %v", err)
	}
}
