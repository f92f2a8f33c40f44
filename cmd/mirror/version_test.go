package main

import (
	"runtime/debug"
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
