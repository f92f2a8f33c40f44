package main

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
)

// version, revision and buildTime are set at link time by `make build`:
//
//	go build -ldflags "-X main.version=v1.2.3 -X main.revision=$(git rev-parse HEAD) -X main.buildTime=2026-01-02T03:04:05Z"
//
// Left unset (go build, go install), they come from the build information
// the go command records: the module version and the VCS revision and
// commit time (see buildInfo).
var (
	version   = ""
	revision  = ""
	buildTime = ""
)

// build describes the running binary.
type build struct {
	Version  string // "v1.2.3", a pseudo-version, or "dev"
	Revision string // VCS commit, "-dirty" appended for a modified tree; "unknown"
	Time     string // build (ldflags) or commit (VCS) time, RFC 3339; "unknown"
	Go       string
}

// buildInfo combines the link-time values with bi (debug.ReadBuildInfo;
// nil when unavailable): link-time values win, then bi's main module
// version and vcs.revision, vcs.modified and vcs.time settings.
func buildInfo(bi *debug.BuildInfo) build {
	b := build{Version: version, Revision: revision, Time: buildTime, Go: runtime.Version()}
	if bi != nil {
		if b.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			b.Version = bi.Main.Version
		}
		var rev, at string
		dirty := false
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.time":
				at = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
		if b.Revision == "" && rev != "" {
			b.Revision = rev
			if dirty {
				b.Revision += "-dirty"
			}
		}
		if b.Time == "" {
			b.Time = at
		}
	}
	if b.Version == "" {
		b.Version = "dev"
	}
	if b.Revision == "" {
		b.Revision = "unknown"
	}
	if b.Time == "" {
		b.Time = "unknown"
	}
	return b
}

func currentBuild() build {
	bi, _ := debug.ReadBuildInfo()
	return buildInfo(bi)
}

// versionCmd prints "mirror VERSION (revision REV, built TIME, GO)".
func versionCmd(w io.Writer) int {
	b := currentBuild()
	fmt.Fprintf(w, "mirror %s (revision %s, built %s, %s)\n", b.Version, b.Revision, b.Time, b.Go)
	return 0
}

// loadConfig loads the configuration a command runs with: the file
// config.FindFile picks for the --config value flagValue (then
// MIRROR_CONFIG, then config.DefaultPath when it exists), then the
// environment.
func loadConfig(flagValue string) (config.Config, error) {
	return config.Load(config.FindFile(flagValue, os.Getenv), os.Getenv)
}
