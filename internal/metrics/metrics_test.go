package metrics_test

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
)

func newRegistry(t *testing.T) (*prometheus.Registry, *metrics.Metrics) {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := metrics.New(reg)
	metrics.BuildInfo(reg, "v0.0.0-test", "abc123", "go-test")
	metrics.StorageUsage(reg, func(kind string) (int64, int64) { return 42, 2 })
	metrics.FilesystemUsage(reg, t.TempDir())
	return reg, m
}

// TestPromlintClean runs client_golang's promlint over everything the
// mirror exposes.
func TestPromlintClean(t *testing.T) {
	t.Parallel()
	reg, m := newRegistry(t)
	// Touch every vector so that each family is exposed.
	m.Request(metrics.RouteBlob, "GET", 200, 0.01)
	m.UpstreamRequest("blob", 429, 0.2)
	m.UpstreamRequest("manifest", 0, 0)
	m.UpstreamReceived(10)
	assertLintClean(t, reg)
}

// assertLintClean runs client_golang's promlint over what reg exposes.
func assertLintClean(t *testing.T, reg *prometheus.Registry) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}

// TestNilMetricsIsSafe: components accept a nil *Metrics.
func TestNilMetricsIsSafe(t *testing.T) {
	t.Parallel()
	var m *metrics.Metrics
	m.Request("blob", "GET", 200, 1)
	m.CacheResult("blob", metrics.Hit, 10)
	m.UpstreamRequest("blob", 200, 1)
	m.UpstreamReceived(1)
	m.TokenExchange(true)
	m.FillStarted()
	m.FillEnded(metrics.ReasonIdle)
}

func TestCacheResultFeedsServedBytes(t *testing.T) {
	t.Parallel()
	_, m := newRegistry(t)
	m.CacheResult("blob", metrics.Hit, 100)
	m.CacheResult("blob", metrics.Miss, 30)
	m.CacheResult("manifest", metrics.Miss, 5)
	if got := testutil.ToFloat64(m.ServedBytes.WithLabelValues(metrics.Cache)); got != 100 {
		t.Fatalf("cache bytes %v", got)
	}
	if got := testutil.ToFloat64(m.ServedBytes.WithLabelValues(metrics.Upstream)); got != 35 {
		t.Fatalf("upstream bytes %v", got)
	}
	if got := testutil.ToFloat64(m.CacheRequests.WithLabelValues("blob", metrics.Miss)); got != 1 {
		t.Fatalf("blob misses %v", got)
	}
	m.UpstreamRequest("blob", 429, 0.1)
	m.UpstreamRequest("blob", -1, 0)
	if got := testutil.ToFloat64(m.UpstreamLimited); got != 1 {
		t.Fatalf("429s seen %v", got)
	}
	if got := testutil.ToFloat64(m.UpstreamReqs.WithLabelValues("blob", "backoff")); got != 1 {
		t.Fatalf("backoff refusals %v", got)
	}
}

// TestTrackingMetricsLintClean: the tag tracking and prefetch collectors
// pass promlint too.
func TestTrackingMetricsLintClean(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	m := metrics.NewTracking(reg)
	m.Discovered("tag", 2)
	m.PrefetchBlob("fetched", 10)
	m.JobStarted()
	m.JobEnded("done")
	m.SetLeader(true)
	assertLintClean(t, reg)
}
