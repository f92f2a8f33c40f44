// Package metrics holds the mirror's Prometheus collectors. Build one
// Metrics per process (or per test) with New and inject it; nothing is
// registered globally. Label values come from small fixed sets, never from
// repository names or digests.
package metrics

import (
	"syscall"

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
	ReasonNotRegistry    = "not_registry"    // an HTML page (captive portal, proxy) instead of the blob
)

// Route kinds, the values of the "route" label.
const (
	RouteManifest = "manifest"
	RouteBlob     = "blob"
	RouteTags     = "tags"
	RouteBase     = "base"
	RouteOther    = "other"
)

// Cache results and sources.
const (
	Hit      = "hit"
	Miss     = "miss"
	Cache    = "cache"
	Upstream = "upstream"
)

// Metrics are the collectors. A nil *Metrics is valid and records nothing.
type Metrics struct {
	Requests        *prometheus.CounterVec   // route, method, code (status class)
	RequestDuration *prometheus.HistogramVec // route
	CacheRequests   *prometheus.CounterVec   // kind (manifest, blob), result (hit, miss)
	CacheBytes      *prometheus.CounterVec   // kind, result
	ServedBytes     *prometheus.CounterVec   // source (cache, upstream)
	UpstreamReqs    *prometheus.CounterVec   // kind (manifest, blob, tags, ping), result
	UpstreamBytes   prometheus.Counter
	UpstreamLatency *prometheus.HistogramVec // kind
	TokenExchanges  *prometheus.CounterVec   // result (success, failure)
	UpstreamLimited prometheus.Counter

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
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_http_requests_total",
			Help: "Registry API requests by route kind, method and status class.",
		}, []string{"route", "method", "code"}),
		RequestDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "ngc_mirror_http_request_duration_seconds",
			Help:    "Registry API request latency (until the handler returns: whole body sent), by route kind.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300},
		}, []string{"route"}),
		CacheRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_cache_requests_total",
			Help: "Manifest and blob requests answered from the cache (hit) or the upstream (miss).",
		}, []string{"kind", "result"}),
		CacheBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_cache_response_bytes_total",
			Help: "Body bytes of manifest and blob responses, by cache hit or miss.",
		}, []string{"kind", "result"}),
		ServedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_served_bytes_total",
			Help: "Manifest and blob body bytes sent to clients, by where they came from.",
		}, []string{"source"}),
		UpstreamReqs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_upstream_requests_total",
			Help: "Requests to the upstream registry by kind and result (2xx, 3xx, 4xx, 429, 5xx, error, backoff).",
		}, []string{"kind", "result"}),
		UpstreamBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ngc_mirror_upstream_received_bytes_total",
			Help: "Body bytes received from the upstream registry and its CDN.",
		}),
		UpstreamLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "ngc_mirror_upstream_request_duration_seconds",
			Help:    "Time to response headers from the upstream (redirects and token exchange included), by kind.",
			Buckets: prometheus.DefBuckets,
		}, []string{"kind"}),
		TokenExchanges: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_upstream_token_exchanges_total",
			Help: "Bearer token exchanges with the upstream's token realm, by result.",
		}, []string{"result"}),
		UpstreamLimited: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ngc_mirror_upstream_rate_limited_total",
			Help: "429 Too Many Requests answers seen from the upstream.",
		}),
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
	for _, r := range []string{ReasonDigestMismatch, ReasonSizeMismatch, ReasonUpstream, ReasonIdle, ReasonDisk, ReasonNoClients, ReasonNotRegistry} {
		m.FillFailures.WithLabelValues(r)
	}
	for _, k := range []string{"manifest", "blob"} {
		for _, r := range []string{Hit, Miss} {
			m.CacheRequests.WithLabelValues(k, r)
			m.CacheBytes.WithLabelValues(k, r)
		}
	}
	for _, src := range []string{Cache, Upstream} {
		m.ServedBytes.WithLabelValues(src)
	}
	for _, r := range []string{"success", "failure"} {
		m.TokenExchanges.WithLabelValues(r)
	}
	reg.MustRegister(m.Requests, m.RequestDuration, m.CacheRequests, m.CacheBytes, m.ServedBytes,
		m.UpstreamReqs, m.UpstreamBytes, m.UpstreamLatency, m.TokenExchanges, m.UpstreamLimited)
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

// Request records one finished API request; status is the HTTP status.
func (m *Metrics) Request(route, method string, status int, seconds float64) {
	if m == nil {
		return
	}
	m.Requests.WithLabelValues(route, method, statusClass(status)).Inc()
	m.RequestDuration.WithLabelValues(route).Observe(seconds)
}

func statusClass(status int) string {
	switch {
	case status >= 500:
		return "5xx"
	case status >= 400:
		return "4xx"
	case status >= 300:
		return "3xx"
	case status >= 200:
		return "2xx"
	}
	return "1xx"
}

// CacheResult records a manifest or blob request answered with a cache hit
// or miss, and the body bytes sent for it.
func (m *Metrics) CacheResult(kind, result string, bytes int64) {
	if m == nil {
		return
	}
	m.CacheRequests.WithLabelValues(kind, result).Inc()
	m.CacheBytes.WithLabelValues(kind, result).Add(float64(bytes))
	src := Cache
	if result == Miss {
		src = Upstream
	}
	m.ServedBytes.WithLabelValues(src).Add(float64(bytes))
}

// StatusNotRegistry, passed as UpstreamRequest's status, records an
// answer that was not a registry's (an HTML page from a captive portal or
// proxy, whatever its HTTP status): result "not_registry".
const StatusNotRegistry = -2

// UpstreamRequest records one upstream exchange. status is the HTTP status,
// or 0 for a transport error, -1 for a request held back by a backoff, or
// StatusNotRegistry.
func (m *Metrics) UpstreamRequest(kind string, status int, seconds float64) {
	if m == nil {
		return
	}
	result := "error"
	switch {
	case status == -1:
		result = "backoff"
	case status == StatusNotRegistry:
		result = "not_registry"
	case status == 429:
		result = "429"
		m.UpstreamLimited.Inc()
	case status > 0:
		result = statusClass(status)
	}
	m.UpstreamReqs.WithLabelValues(kind, result).Inc()
	if status > 0 {
		m.UpstreamLatency.WithLabelValues(kind).Observe(seconds)
	}
}

// UpstreamReceived records body bytes received from the upstream.
func (m *Metrics) UpstreamReceived(n int) {
	if m != nil {
		m.UpstreamBytes.Add(float64(n))
	}
}

// TokenExchange records one token exchange.
func (m *Metrics) TokenExchange(ok bool) {
	if m == nil {
		return
	}
	if ok {
		m.TokenExchanges.WithLabelValues("success").Inc()
	} else {
		m.TokenExchanges.WithLabelValues("failure").Inc()
	}
}

// BuildInfo registers ngc_mirror_build_info{version,revision,goversion} 1.
func BuildInfo(reg prometheus.Registerer, version, revision, goversion string) {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "ngc_mirror_build_info",
		Help: "Build information of the running mirror; the value is always 1.",
	}, []string{"version", "revision", "goversion"})
	g.WithLabelValues(version, revision, goversion).Set(1)
	reg.MustRegister(g)
}

// StorageUsage registers gauges of the cache's content, read at scrape
// time from usage, which returns bytes and objects for kind "blob" or
// "manifest".
func StorageUsage(reg prometheus.Registerer, usage func(kind string) (bytes, objects int64)) {
	for _, kind := range []string{"blob", "manifest"} {
		reg.MustRegister(
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name:        "ngc_mirror_storage_used_bytes",
				Help:        "Bytes of content in the cache, by kind.",
				ConstLabels: prometheus.Labels{"kind": kind},
			}, func() float64 { b, _ := usage(kind); return float64(b) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name:        "ngc_mirror_storage_objects",
				Help:        "Objects (blobs or manifests) in the cache, by kind.",
				ConstLabels: prometheus.Labels{"kind": kind},
			}, func() float64 { _, o := usage(kind); return float64(o) }),
		)
	}
}

// FilesystemUsage registers the size and free bytes of the filesystem that
// holds dir (the local cache), read at scrape time with statfs(2).
func FilesystemUsage(reg prometheus.Registerer, dir string) {
	stat := func() (size, free float64) {
		var st syscall.Statfs_t
		if err := syscall.Statfs(dir, &st); err != nil {
			return 0, 0
		}
		return float64(st.Blocks) * float64(st.Bsize), float64(st.Bavail) * float64(st.Bsize)
	}
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "ngc_mirror_filesystem_size_bytes",
			Help: "Size of the filesystem holding the cache.",
		}, func() float64 { s, _ := stat(); return s }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "ngc_mirror_filesystem_free_bytes",
			Help: "Bytes available to the mirror on the filesystem holding the cache.",
		}, func() float64 { _, f := stat(); return f }),
	)
}
