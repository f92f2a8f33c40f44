package main

import (
	"maps"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// TestFillBounds: upstream.max_fills bounds the default upstream's fills
// under its registry name and upstreams.<name>.max_fills each further
// upstream's under its name (the keys pull joins fills with); 0 gives no
// bound of its own.
func TestFillBounds(t *testing.T) {
	cfg := config.Default()
	cfg.Upstream.MaxFills = 40
	cfg.Upstreams = map[string]config.ExtraUpstream{"docker.io": {MaxFills: 8}, "ghcr.io": {}}
	want := map[string]int{"nvcr.io": 40, "docker.io": 8}
	if got := fillBounds(cfg, "nvcr.io"); !maps.Equal(got, want) {
		t.Errorf("fillBounds = %v, want %v", got, want)
	}
}

// TestServeWarnsOfMaxFillsThatCannotBind: `mirror serve` with an
// upstream's max_fills above limits.max_fills starts, and says at start-up
// that the bound can never bind, naming both keys with their values.
func TestServeWarnsOfMaxFillsThatCannotBind(t *testing.T) {
	up := ngctest.New(ngctest.Options{})
	defer up.Close()
	cfg := testsupport.WriteConfig(t, "limits: {max_fills: 4}\nupstream: {max_fills: 8}\nupstreams:\n  docker.io: {url: "+up.URL()+", max_fills: 2}\n"+
		"state: {path: "+filepath.Join(t.TempDir(), "state.db")+"}\n")
	p, _, stderr := startMirror(t, up.URL(), map[string]string{"MIRROR_CONFIG": cfg, "MIRROR_LOG_LEVEL": "info"})
	p.Stop()
	want := `level=WARN msg="upstream.max_fills is larger than limits.max_fills and can never bind: at most limits.max_fills downloads run, all upstreams together" upstream.max_fills=8 limits.max_fills=4`
	if !strings.Contains(stderr.String(), want) {
		t.Errorf("no line\n%s\nin\n%s", want, stderr)
	}
	if strings.Contains(stderr.String(), "upstreams.docker.io.max_fills is larger") {
		t.Errorf("docker.io's max_fills 2, below limits.max_fills 4, warned of:\n%s", stderr)
	}
}
