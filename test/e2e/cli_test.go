//go:build e2e

package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// TestHelpAndVersion: help exits 0 with the usage on stdout (an unknown
// command exits 2), and `make build` stamps the version, the git revision
// and the build time that `mirror version` prints.
func TestHelpAndVersion(t *testing.T) {
	for _, arg := range []string{"help", "-h", "--help"} {
		out, err := exec.Command(mirrorBin, arg).Output()
		if err != nil || !strings.Contains(string(out), "usage: mirror serve") || !strings.Contains(string(out), "mirror jobs") {
			t.Errorf("mirror %s: %v\n%s", arg, err, out)
		}
	}
	if out, code := runCLI(t, nil, "bogus"); code != 2 || !strings.Contains(out, "usage:") {
		t.Errorf("mirror bogus: exit %d\n%s", code, out)
	}
	// Commands that take no positional argument refuse a stray one rather
	// than ignore it (a mirror started by "serve extra" on defaults).
	env := []string{"MIRROR_ADDR=127.0.0.1:0", "MIRROR_DATA_DIR=" + t.TempDir()}
	for _, args := range [][]string{{"serve", "extra"}, {"serve", "--config", "", "extra"}, {"healthcheck", "extra"}, {"version", "extra"}} {
		if out, code := runCLI(t, env, args...); code != 2 || !strings.Contains(out, "unexpected argument") {
			t.Errorf("mirror %s: exit %d, want 2 and a usage error\n%s", strings.Join(args, " "), code, out)
		}
	}

	need(t, "make", "git")
	bin := filepath.Join(t.TempDir(), "mirror")
	if out, err := run(t, 5*time.Minute, "make", "-C", "../..", "build", "BIN="+bin); err != nil {
		t.Fatalf("make build: %v\n%s", err, out)
	}
	rev, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		t.Fatalf("git rev-parse HEAD: %v", err)
	}
	out, err := exec.Command(bin, "version").Output()
	v := string(out)
	if err != nil || !strings.HasPrefix(v, "mirror ") || !strings.Contains(v, "revision "+strings.TrimSpace(string(rev))) ||
		strings.Contains(v, "unknown") || !strings.Contains(v, "built "+time.Now().UTC().Format("2006-01-02")) {
		t.Errorf("mirror version after make build: %v\n%s", err, v)
	}
}

// TestOperatorCommandsFindTheMirror: with MIRROR_CONFIG naming the
// mirror's configuration, the operator commands reach it from any working
// directory; without it (and without /etc/ngc-mirror/mirror.yaml) they say
// where they looked and how to point them at the mirror, instead of
// checking an empty ./data and calling it clean.
func TestOperatorCommandsFindTheMirror(t *testing.T) {
	up, _ := newUpstream(t)
	dataDir := t.TempDir()
	m := startMirrorAt(t, up.URL(), dataDir, "")
	cfg := testsupport.WriteConfig(t, "addr: \""+m.addr+"\"\nstorage:\n  data_dir: "+dataDir+"\n")
	elsewhere := t.TempDir()
	cli := func(env []string, args ...string) (string, int) {
		t.Helper()
		cmd := exec.Command(mirrorBin, args...)
		cmd.Dir = elsewhere
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		if err != nil && cmd.ProcessState == nil {
			t.Fatal(err)
		}
		return string(out), cmd.ProcessState.ExitCode()
	}
	env := []string{"MIRROR_CONFIG=" + cfg}
	if out, code := cli(env, "tags", "nvidia/pytorch"); code != 0 || !strings.Contains(out, "17.12") {
		t.Errorf("mirror tags with MIRROR_CONFIG: exit %d\n%s", code, out)
	}
	if out, code := cli(env, "jobs"); code != 0 {
		t.Errorf("mirror jobs with MIRROR_CONFIG: exit %d\n%s", code, out)
	}
	// fsck names what it checked and how much of it (U1 F6).
	if out, code := cli(env, "fsck"); code != 0 || !strings.Contains(out, dataDir+": clean (") || !strings.Contains(out, " blobs, ") {
		t.Errorf("mirror fsck with MIRROR_CONFIG: exit %d\n%s", code, out)
	}
	// A stray word must not end flag parsing silently: "gc now --dry-run"
	// would otherwise collect for real.
	for _, args := range [][]string{{"gc", "now", "--dry-run"}, {"gc", "dry-run"}, {"fsck", "extra"}} {
		if out, code := cli(env, args...); code != 2 || !strings.Contains(out, "unexpected argument") {
			t.Errorf("mirror %s: exit %d, want 2 and a usage error\n%s", strings.Join(args, " "), code, out)
		}
	}
	// A negative grace would collect everything young too (U1 F8).
	if out, code := cli(env, "gc", "--grace", "-5h"); code != 2 || !strings.Contains(out, "must not be negative") {
		t.Errorf("mirror gc --grace -5h: exit %d, want 2\n%s", code, out)
	}
	if out, code := cli(env, "healthcheck"); code != 0 {
		t.Errorf("mirror healthcheck with MIRROR_CONFIG: exit %d\n%s", code, out)
	}
	if _, err := os.Stat(config.DefaultPath); err == nil {
		t.Logf("%s exists on this machine: the checks without a configuration do not apply", config.DefaultPath)
		return
	}
	if out, code := cli(nil, "tags", "nvidia/pytorch"); code != 2 || !strings.Contains(out, "no admin token in "+filepath.Join(elsewhere, "data", "admin-token")) ||
		!strings.Contains(out, "MIRROR_CONFIG") {
		t.Errorf("mirror tags without a configuration: exit %d\n%s", code, out)
	}
	if out, code := cli(nil, "fsck"); code != 2 || !strings.Contains(out, "no cache at "+filepath.Join(elsewhere, "data")) || !strings.Contains(out, "--config") {
		t.Errorf("mirror fsck without a configuration: exit %d\n%s", code, out)
	}
}
