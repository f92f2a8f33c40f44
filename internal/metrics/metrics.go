// Package metrics holds the mirror's Prometheus collectors. Build one
// Metrics per process (or per test) with New and inject it; nothing is
// registered globally. Label values come from small fixed sets, never from
// repository names or digests.
package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Fill failure reasons, the values of the "reason" label of
// ngc_mirror_fill_failures_total.
const (
	ReasonDigestMismatch = "digest_mismatch" // content hashed to another digest
	ReasonSizeMismatch   = "size_mismatch"   // content had another size
	ReasonUpstream       = "upstream_error"  // the upstream failed or broke off
	ReasonIdle           = "idle_timeout"    // the upstream stalled
	ReasonDisk           = "disk_error"      // the spool or the cache could not be written
	ReasonNoClients      = "no_clients"      // every client left and detached fills are off
)

// Metrics are the collectors. A nil *Metrics is valid and records nothing.
type Metrics struct {
	FillsInFlight   prometheus.Gauge
	FillsStarted    prometheus.Counter
	FillJoins       prometheus.Counter
	FillFailures    *prometheus.CounterVec
	FillNotCached   prometheus.Counter
	FillResumes     prometheus.Counter
	UpstreamBackoff prometheus.Counter
}

// New creates the collectors and registers them with reg.
func New(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		FillsInFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ngc_mirror_fills_in_flight",
			Help: "Blob fills (upstream downloads into the cache) running now.",
		}),
		FillsStarted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ngc_mirror_fills_started_total",
			Help: "Blob fills started: one per upstream blob download, however many clients asked.",
		}),
		FillJoins: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ngc_mirror_fill_coalesced_clients_total",
			Help: "Client requests that attached to a blob fill another request had started.",
		}),
		FillFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_fill_failures_total",
			Help: "Blob fills that failed, by reason.",
		}, []string{"reason"}),
		FillNotCached: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ngc_mirror_fill_uncached_total",
			Help: "Blob fills whose verified content was served but could not be written to the cache.",
		}),
		FillResumes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ngc_mirror_fill_resumes_total",
			Help: "Broken upstream blob downloads resumed with a Range request.",
		}),
		UpstreamBackoff: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ngc_mirror_upstream_backoff_refusals_total",
			Help: "Upstream requests not sent because the upstream asked the mirror to back off (429 Retry-After).",
		}),
	}
	for _, r := range []string{ReasonDigestMismatch, ReasonSizeMismatch, ReasonUpstream, ReasonIdle, ReasonDisk, ReasonNoClients} {
		m.FillFailures.WithLabelValues(r)
	}
	reg.MustRegister(m.FillsInFlight, m.FillsStarted, m.FillJoins, m.FillFailures, m.FillNotCached, m.FillResumes, m.UpstreamBackoff)
	return m
}

// FillStarted records a new blob fill.
func (m *Metrics) FillStarted() {
	if m != nil {
		m.FillsStarted.Inc()
		m.FillsInFlight.Inc()
	}
}

// FillJoined records a client attaching to a running fill.
func (m *Metrics) FillJoined() {
	if m != nil {
		m.FillJoins.Inc()
	}
}

// FillEnded records the end of a fill; reason is "" on success.
func (m *Metrics) FillEnded(reason string) {
	if m != nil {
		m.FillsInFlight.Dec()
		if reason != "" {
			m.FillFailures.WithLabelValues(reason).Inc()
		}
	}
}

// FillUncached records a verified fill that the cache could not keep.
func (m *Metrics) FillUncached() {
	if m != nil {
		m.FillNotCached.Inc()
	}
}

// FillResumed records a resumed upstream download.
func (m *Metrics) FillResumed() {
	if m != nil {
		m.FillResumes.Inc()
	}
}

// BackoffRefusal records an upstream request held back by a 429 backoff.
func (m *Metrics) BackoffRefusal() {
	if m != nil {
		m.UpstreamBackoff.Inc()
	}
}
