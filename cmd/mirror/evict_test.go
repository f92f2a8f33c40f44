package main

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/evict"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// The budget is logged as it is configured ("10%", "500GiB"), not as a Go
// struct or a bare byte count.
func TestCacheBudgetLoggedAsSizes(t *testing.T) {
	dir := t.TempDir()
	store, err := storage.OpenFilesystem(dir)
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.Cache.MaxSize = 500 << 30
	if cfg.Cache.MinFree, err = config.ParseFreeSpace("10%"); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if _, unlimited := newBudget(cfg, store, "nvcr.io", prometheus.NewRegistry(), slog.New(slog.NewTextHandler(&buf, nil))).(evict.Unlimited); unlimited {
		t.Fatal("no evictor with a budget")
	}
	if got := buf.String(); !strings.Contains(got, "max_size=500GiB min_free=10%") {
		t.Errorf("log = %s", got)
	}
}
