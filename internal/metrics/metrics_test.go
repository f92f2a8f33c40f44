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
	u := m.For("nvcr.io")
	u.Request("blob", 429, 0.2)
	u.Request("manifest", 0, 0)
	u.Received(10)
	u.BackoffRefusal()
	u.TokenExchange(true)
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
	m.CacheResult("nvcr.io", "blob", metrics.Hit, 10)
	u := m.For("nvcr.io")
	u.Request("blob", 200, 1)
	u.Received(1)
	u.TokenExchange(true)
	u.BackoffRefusal()
	m.FillStarted()
	m.FillEnded(metrics.ReasonIdle)
}

func TestCacheResultFeedsServedBytes(t *testing.T) {
	t.Parallel()
	_, m := newRegistry(t)
	m.CacheResult("nvcr.io", "blob", metrics.Hit, 100)
	m.CacheResult("docker.io", "blob", metrics.Miss, 30)
	m.CacheResult("nvcr.io", "manifest", metrics.Miss, 5)
	if got := testutil.ToFloat64(m.ServedBytes.WithLabelValues(metrics.Cache)); got != 100 {
		t.Fatalf("cache bytes %v", got)
	}
	if got := testutil.ToFloat64(m.ServedBytes.WithLabelValues(metrics.Upstream)); got != 35 {
		t.Fatalf("upstream bytes %v", got)
	}
	if got := testutil.ToFloat64(m.CacheRequests.WithLabelValues("docker.io", "blob", metrics.Miss)); got != 1 {
		t.Fatalf("blob misses %v", got)
	}
	if got := testutil.ToFloat64(m.CacheRequests.WithLabelValues("nvcr.io", "blob", metrics.Miss)); got != 0 {
		t.Fatalf("blob misses of another upstream %v", got)
	}
	// Per upstream: docker.io's 429 and back-off are not nvcr.io's.
	d, n := m.For("docker.io"), m.For("nvcr.io")
	d.Request("blob", 429, 0.1)
	d.Request("blob", -1, 0)
	d.BackoffRefusal()
	n.Request("blob", 200, 0.1)
	if got := testutil.ToFloat64(m.UpstreamLimited.WithLabelValues("docker.io")); got != 1 {
		t.Fatalf("429s seen %v", got)
	}
	if got := testutil.ToFloat64(m.UpstreamLimited.WithLabelValues("nvcr.io")) + testutil.ToFloat64(m.UpstreamBackoff.WithLabelValues("nvcr.io")); got != 0 {
		t.Fatalf("nvcr.io's 429s and back-offs %v", got)
	}
	if got := testutil.ToFloat64(m.UpstreamReqs.WithLabelValues("docker.io", "blob", "backoff")); got != 1 {
		t.Fatalf("backoff refusals %v", got)
	}
	if got := testutil.ToFloat64(m.UpstreamBackoff.WithLabelValues("docker.io")); got != 1 {
		t.Fatalf("backoff refusal counter %v", got)
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
