package metrics_test

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
)

// TestEvictionMetrics: the eviction collectors pass promlint, count what
// they are told, and a nil *Eviction records nothing.
func TestEvictionMetrics(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	m := metrics.NewEviction(reg)
	m.Evicted("blob", 100)
	m.Evicted("blob", 20)
	m.Evicted("manifest", 3)
	m.SetBudget(1<<30, 5<<20)
	m.CacheFull()
	assertLintClean(t, reg)
	if got := testutil.ToFloat64(m.EvictedBytes.WithLabelValues("blob")); got != 120 {
		t.Errorf("evicted blob bytes %v, want 120", got)
	}
	if got := testutil.ToFloat64(m.EvictedObjects.WithLabelValues("blob")); got != 2 {
		t.Errorf("evicted blobs %v, want 2", got)
	}
	if got := testutil.ToFloat64(m.BudgetBytes); got != 1<<30 {
		t.Errorf("budget %v", got)
	}
	if got := testutil.ToFloat64(m.Full); got != 1 {
		t.Errorf("cache full %v, want 1", got)
	}
	var nilm *metrics.Eviction
	nilm.Evicted("blob", 1)
	nilm.SetBudget(1, 1)
	nilm.CacheFull()
}
