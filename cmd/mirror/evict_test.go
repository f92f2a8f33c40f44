package main

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/evict"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
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
	if _, unlimited := newBudget(cfg, store, nil, "nvcr.io", prometheus.NewRegistry(), slog.New(slog.NewTextHandler(&buf, nil))).(evict.Unlimited); unlimited {
		t.Fatal("no evictor with a budget")
	}
	if got := buf.String(); !strings.Contains(got, "max_size=500GiB min_free=10%") {
		t.Errorf("log = %s", got)
	}
}

// With the cache on S3 and the state in Redis the budget is shared with
// the bucket's other replicas; on a filesystem cache it is not.
func TestBudgetSharedOnS3WithRedis(t *testing.T) {
	store, err := storage.OpenFilesystem(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	rd, err := state.OpenRedis("redis://127.0.0.1:1/0", state.RedisOptions{}) // never dialled here
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	cfg := config.Default()
	cfg.Cache.MaxSize = 1 << 30
	log := slog.New(slog.DiscardHandler)
	for _, c := range []struct {
		driver string
		st     state.Store
		shared bool
	}{{"s3", rd, true}, {"filesystem", rd, false}, {"s3", nil, false}} {
		cfg.Storage.Driver = c.driver
		ev, ok := newBudget(cfg, store, c.st, "nvcr.io", prometheus.NewRegistry(), log).(*evict.Evictor)
		if !ok {
			t.Fatal("no evictor with a budget")
		}
		if shared := ev.Owner() != ""; shared != c.shared {
			t.Errorf("driver %s, state %T: shared %v, want %v", c.driver, c.st, shared, c.shared)
		}
	}
	if got, want := budgetScope(config.S3{Endpoint: "http://minio:9000", Bucket: "cache", Prefix: "/lab/"}), "minio:9000/cache/lab"; got != want {
		t.Errorf("scope %q, want %q", got, want)
	}
}
