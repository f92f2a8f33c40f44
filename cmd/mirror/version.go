package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"runtime"
	"runtime/debug"
	"time"

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
// version and vcs.revision, vcs.modified and vcs.time settings, then,
// without VCS settings, the revision (and time) the module version names.
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
		// No VCS information (go install module@version, -buildvcs=false):
		// the module version names the commit, a pseudo-version with its
		// hash and time, a tag by itself.
		if v := bi.Main.Version; b.Revision == "" && rev == "" && v != "" && v != "(devel)" {
			if m := pseudoVersion.FindStringSubmatch(v); m != nil {
				b.Revision = m[2]
				if t, err := time.Parse("20060102150405", m[1]); err == nil && b.Time == "" {
					b.Time = t.UTC().Format(time.RFC3339)
				}
			} else {
				b.Revision = v
			}
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

// pseudoVersion matches the end of a Go pseudo-version
// (v0.0.0-20261203150405-0123456789ab, v1.2.4-0.20261203150405-...,
// optionally +incompatible or +dirty): the commit time and hash prefix.
var pseudoVersion = regexp.MustCompile(`[-.](\d{14})-([0-9a-f]{12})(?:\+[0-9A-Za-z.]+)?$`)

func currentBuild() build {
	bi, _ := debug.ReadBuildInfo()
	return buildInfo(bi)
}

// versionCmd prints "mirror VERSION (revision REV, built TIME, GO)" to w.
// It takes no arguments: -h prints its usage to w (exit 0), anything else
// is a usage error (exit 2).
func versionCmd(w io.Writer, args []string) int {
	fs := flag.NewFlagSet("version", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	usage := "usage: mirror version   (version, git revision, build time and Go version of this binary)\n"
	switch err := fs.Parse(args); {
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprint(w, usage)
		return 0
	case err != nil:
		fmt.Fprint(os.Stderr, usage)
		return 2
	case fs.NArg() > 0:
		fmt.Fprintf(os.Stderr, "version: unexpected argument %q (it takes none)\n%s", fs.Arg(0), usage)
		return 2
	}
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
