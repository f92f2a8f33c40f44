package main

import (
	"maps"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
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
