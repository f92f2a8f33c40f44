package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
)

// The rules example in the README is a valid configuration.
func TestREADMERulesExample(t *testing.T) {
	raw, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(raw), "```yaml\ntracking:")
	if !ok {
		t.Fatal("README has no rules example (a yaml block starting with tracking:)")
	}
	block, _, _ := strings.Cut(rest, "```")
	p := filepath.Join(t.TempDir(), "mirror.yaml")
	if err := os.WriteFile(p, []byte("tracking:"+block), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(p, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	rules, err := compileRules(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(rules) < 2 || !rules[0].Pin || len(rules[0].Platforms) != 2 || rules[0].Next(time.Now()).IsZero() {
		t.Errorf("rules = %+v", rules)
	}
}

// Without a configured token the first start creates one (owner-only) and
// later starts reuse it; a configured token wins.
func TestAdminToken(t *testing.T) {
	dir := t.TempDir()
	cfg := config.Default()
	tok, src, err := adminToken(cfg, dir)
	if err != nil || len(tok) < 32 || !strings.HasPrefix(src, "created") || strings.Contains(src, tok) {
		t.Fatalf("first start: %q %q %v", tok, src, err)
	}
	fi, err := os.Stat(filepath.Join(dir, "admin-token"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("token file: %v %v", fi, err)
	}
	again, _, _ := adminToken(cfg, dir)
	if again != tok {
		t.Error("a restart made a new token")
	}
	cfg.Admin.Token = "configured"
	if got, _, _ := adminToken(cfg, dir); got != "configured" {
		t.Errorf("configured token ignored: %q", got)
	}
}
