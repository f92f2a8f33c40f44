package main

import (
	"errors"
	"os"
	"os/exec"
	"runtime/debug"
	"strings"
	"testing"
)

// Link-time values win; without them the module version and the VCS
// revision, modification flag and commit time of the build information
// are used; without either, "dev" and "unknown".
func TestBuildInfo(t *testing.T) {
	vcs := &debug.BuildInfo{Main: debug.Module{Version: "v1.4.0"}, Settings: []debug.BuildSetting{
		{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: "0123abcd"}, {Key: "vcs.time", Value: "2026-11-30T10:00:00Z"}, {Key: "vcs.modified", Value: "true"}}}
	for _, c := range []struct {
		name         string
		ld           [3]string // version, revision, buildTime
		bi           *debug.BuildInfo
		wantV, wantR string
		wantT        string
	}{
		{"nothing", [3]string{}, nil, "dev", "unknown", "unknown"},
		{"devel", [3]string{}, &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}}, "dev", "unknown", "unknown"},
		{"vcs", [3]string{}, vcs, "v1.4.0", "0123abcd-dirty", "2026-11-30T10:00:00Z"},
		// go install module@version: no VCS settings, the module version
		// names the commit.
		{"go install @pseudo-version", [3]string{}, &debug.BuildInfo{Main: debug.Module{Version: "v0.0.0-20261203150405-0123456789ab"}},
			"v0.0.0-20261203150405-0123456789ab", "0123456789ab", "2026-12-03T15:04:05Z"},
		{"go install @pseudo-version after a tag", [3]string{}, &debug.BuildInfo{Main: debug.Module{Version: "v1.4.1-0.20261203150405-0123456789ab+dirty"}},
			"v1.4.1-0.20261203150405-0123456789ab+dirty", "0123456789ab", "2026-12-03T15:04:05Z"},
		{"go install @tag", [3]string{}, &debug.BuildInfo{Main: debug.Module{Version: "v1.4.0"}}, "v1.4.0", "v1.4.0", "unknown"},
		{"ldflags", [3]string{"v2.0.0", "feedbeef", "2026-12-01T00:00:00Z"}, vcs, "v2.0.0", "feedbeef", "2026-12-01T00:00:00Z"},
	} {
		version, revision, buildTime = c.ld[0], c.ld[1], c.ld[2]
		b := buildInfo(c.bi)
		if b.Version != c.wantV || b.Revision != c.wantR || b.Time != c.wantT || b.Go == "" {
			t.Errorf("%s: %+v, want %s %s %s", c.name, b, c.wantV, c.wantR, c.wantT)
		}
	}
	version, revision, buildTime = "", "", ""
}

// TestVersionCommand: `mirror version` (a process of its own) prints the
// version line; `mirror version -h` its usage with exit 0, never the
// version as if -h were not there; a stray argument is a usage error.
func TestVersionCommand(t *testing.T) {
	run := func(args string) (string, int) {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "MIRROR_TEST_MAIN="+args)
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatal(err)
		}
		return string(out), cmd.ProcessState.ExitCode()
	}
	if out, code := run("version"); code != 0 || !strings.HasPrefix(out, "mirror ") || !strings.Contains(out, "revision ") {
		t.Errorf("mirror version: exit %d, %q", code, out)
	}
	for _, h := range []string{"-h", "--help"} {
		if out, code := run("version " + h); code != 0 || !strings.HasPrefix(out, "usage: mirror version") {
			t.Errorf("mirror version %s: exit %d, %q; want the usage and exit 0", h, code, out)
		}
	}
	if out, code := run("version now"); code != 2 || !strings.Contains(out, "usage: mirror version") {
		t.Errorf("mirror version now: exit %d, %q; want the usage and exit 2", code, out)
	}
}
