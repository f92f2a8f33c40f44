package main

import (
	"context"
	"log/slog"
	"net/url"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/evict"
	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// budget is the cache budget as the wiring uses it: the fill group asks it
// for room, the pull-through service leases and touches, and serve seeds
// and runs it. *evict.Evictor, or evict.Unlimited without a budget.
type budget interface {
	fill.Budget
	pull.CacheTracker
	SeedObjects([]storage.Object)
	SetPinSource(name string, f evict.PinSource)
	Share(ctx context.Context)
	Run(ctx context.Context)
}

// newBudget builds the evictor that keeps the cache within
// cache.max_size and cache.min_free (on the filesystem of the cache,
// filesystem driver only), never evicting the images of cache.pin. The
// caller seeds it from the start-up listing and runs it (passes every
// cache.evict_interval and when a commit crosses the budget). It returns
// evict.Unlimited when no budget is configured. The eviction metrics are
// registered either way. Pin sources (prefetch rules) are added with
// SetPinSource on the result.
//
// With the cache on S3 and the state in Redis (st is *state.Redis), the
// budget is shared with every replica on the same bucket and Redis (see
// evict's "Shared budget"): one budget for the bucket, evicted by one
// leader. It needs no cluster settings (cluster.advertise): Redis carries
// everything.
func newBudget(cfg config.Config, store *storage.Store, st state.Store, registry string, reg prometheus.Registerer, log *slog.Logger) budget {
	log = log.With("component", "evict")
	m := metrics.NewEviction(reg)
	opts := evict.Options{
		MaxSize:        int64(cfg.Cache.MaxSize),
		MinFree:        cfg.Cache.MinFree.Bytes,
		MinFreePercent: cfg.Cache.MinFree.Percent,
		Interval:       time.Duration(cfg.Cache.EvictInterval),
		Registry:       registry,
		Log:            log,
		Metrics:        m,
	}
	opts.Dir = store.Capabilities().LocalDir // min_free's filesystem
	for _, s := range cfg.Cache.Pin {
		p, err := evict.ParsePin(s, cfg.UpstreamHosts(), cfg.UpstreamNames()...) // validated with the configuration
		if err != nil {
			log.Warn("ignoring cache.pin entry", "err", err)
			continue
		}
		opts.Pins = append(opts.Pins, p)
	}
	if !opts.Enabled() {
		if len(opts.Pins) > 0 {
			log.Info("cache.pin has no effect without cache.max_size or cache.min_free")
		}
		return evict.Unlimited{}
	}
	if r, ok := sharedState(cfg, st); ok {
		opts.Shared, opts.Scope = r, budgetScope(cfg.Storage.S3)
	}
	ev := evict.New(store, opts)
	log.Info("cache budget", "max_size", cfg.Cache.MaxSize.String(), "min_free", cfg.Cache.MinFree.String(), "pins", len(opts.Pins), "interval", opts.Interval,
		"shared", opts.Shared != nil)
	return ev
}

// sharedState returns the Redis state store when replicas may share this
// cache with others: the cache on S3 (one bucket for all) and the state in
// Redis. Then the budget is one (evict's shared budget) and a manifest is
// fetched once across them (pull.Options.Leases).
func sharedState(cfg config.Config, st state.Store) (*state.Redis, bool) {
	r, ok := st.(*state.Redis)
	return r, ok && cfg.Storage.Driver == "s3"
}

// budgetScope names a bucket for the shared budget's keys in Redis:
// endpoint host, bucket and prefix, so that mirrors on different buckets
// sharing one Redis keep budgets of their own.
func budgetScope(s3 config.S3) string {
	host := "aws"
	if u, err := url.Parse(s3.Endpoint); err == nil && u.Host != "" {
		host = u.Host
	}
	return host + "/" + s3.Bucket + "/" + strings.Trim(s3.Prefix, "/")
}
