package metrics

import "github.com/prometheus/client_golang/prometheus"

// Eviction holds the collectors of the cache budget (internal/evict). A
// nil *Eviction is valid and records nothing.
type Eviction struct {
	EvictedObjects *prometheus.CounterVec // kind (blob, manifest)
	EvictedBytes   *prometheus.CounterVec // kind
	BudgetBytes    prometheus.Gauge
	MinFreeBytes   prometheus.Gauge
	Full           prometheus.Counter
}

// NewEviction creates the eviction collectors and registers them with reg.
// cmd/mirror registers them whether or not a budget is configured, so that
// dashboards always find the series.
func NewEviction(reg prometheus.Registerer) *Eviction {
	m := &Eviction{
		EvictedObjects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_evicted_objects_total",
			Help: "Blobs and manifests removed from the cache to keep it within its budget, by kind.",
		}, []string{"kind"}),
		EvictedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_evicted_bytes_total",
			Help: "Bytes removed from the cache to keep it within its budget, by kind.",
		}, []string{"kind"}),
		BudgetBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ngc_mirror_cache_budget_bytes",
			Help: "Maximum size of the cache content (cache.max_size); 0 when there is none.",
		}),
		MinFreeBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ngc_mirror_cache_min_free_bytes",
			Help: "Free space the cache keeps on its filesystem (cache.min_free, as bytes at the last check); 0 when there is none.",
		}),
		Full: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ngc_mirror_cache_full_total",
			Help: "Blobs served straight from the upstream without caching because the cache was at its budget and nothing could be evicted.",
		}),
	}
	for _, k := range []string{"blob", "manifest"} {
		m.EvictedObjects.WithLabelValues(k)
		m.EvictedBytes.WithLabelValues(k)
	}
	reg.MustRegister(m.EvictedObjects, m.EvictedBytes, m.BudgetBytes, m.MinFreeBytes, m.Full)
	return m
}

// Evicted records one object of kind ("blob" or "manifest") and its bytes
// removed by eviction.
func (m *Eviction) Evicted(kind string, bytes int64) {
	if m != nil {
		m.EvictedObjects.WithLabelValues(kind).Inc()
		m.EvictedBytes.WithLabelValues(kind).Add(float64(bytes))
	}
}

// SetBudget records the configured maximum size and the current minimum
// free space, in bytes (0: none).
func (m *Eviction) SetBudget(maxSize, minFree int64) {
	if m != nil {
		m.BudgetBytes.Set(float64(maxSize))
		m.MinFreeBytes.Set(float64(minFree))
	}
}

// CacheFull records a blob refused by the budget (served uncached).
func (m *Eviction) CacheFull() {
	if m != nil {
		m.Full.Inc()
	}
}
