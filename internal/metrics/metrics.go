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
	CacheRequests   *prometheus.CounterVec   // upstream, kind (manifest, blob), result (hit, miss)
	CacheBytes      *prometheus.CounterVec   // upstream, kind, result
	ServedBytes     *prometheus.CounterVec   // source (cache, upstream)
	UpstreamReqs    *prometheus.CounterVec   // upstream, kind (manifest, blob, tags, ping), result
	UpstreamBytes   *prometheus.CounterVec   // upstream
	UpstreamLatency *prometheus.HistogramVec // upstream, kind
	TokenExchanges  *prometheus.CounterVec   // upstream, result (success, failure)
	UpstreamLimited *prometheus.CounterVec   // upstream

	FillsInFlight   prometheus.Gauge
	FillsStarted    prometheus.Counter
	FillJoins       prometheus.Counter
	FillFailures    *prometheus.CounterVec
	FillNotCached   prometheus.Counter
	FillResumes     prometheus.Counter
	UpstreamBackoff *prometheus.CounterVec // upstream
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
		}, []string{"upstream", "kind", "result"}),
		CacheBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_cache_response_bytes_total",
			Help: "Body bytes of manifest and blob responses, by cache hit or miss.",
		}, []string{"upstream", "kind", "result"}),
		ServedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_served_bytes_total",
			Help: "Manifest and blob body bytes sent to clients, by where they came from.",
		}, []string{"source"}),
		UpstreamReqs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_upstream_requests_total",
			Help: "Requests to each upstream registry by kind and result (2xx, 3xx, 4xx, 429, 5xx, error, backoff, not_registry).",
		}, []string{"upstream", "kind", "result"}),
		UpstreamBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_upstream_received_bytes_total",
			Help: "Body bytes received from each upstream registry and its CDN.",
		}, []string{"upstream"}),
		UpstreamLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "ngc_mirror_upstream_request_duration_seconds",
			Help:    "Time to response headers from the upstream (redirects and token exchange included), by kind.",
			Buckets: prometheus.DefBuckets,
		}, []string{"upstream", "kind"}),
		TokenExchanges: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_upstream_token_exchanges_total",
			Help: "Bearer token exchanges with each upstream's token realm, by result.",
		}, []string{"upstream", "result"}),
		UpstreamLimited: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_upstream_rate_limited_total",
			Help: "429 Too Many Requests answers seen from each upstream.",
		}, []string{"upstream"}),
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
		UpstreamBackoff: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_upstream_backoff_refusals_total",
			Help: "Upstream requests not sent because that upstream asked the mirror to back off (429 Retry-After).",
		}, []string{"upstream"}),
	}
	for _, r := range []string{ReasonDigestMismatch, ReasonSizeMismatch, ReasonUpstream, ReasonIdle, ReasonDisk, ReasonNoClients, ReasonNotRegistry} {
		m.FillFailures.WithLabelValues(r)
	}
	for _, src := range []string{Cache, Upstream} {
		m.ServedBytes.WithLabelValues(src)
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

// CacheResult records a manifest or blob request for a repository of
// upstream (a configured registry name) answered with a cache hit or
// miss, and the body bytes sent for it.
func (m *Metrics) CacheResult(upstream, kind, result string, bytes int64) {
	if m == nil {
		return
	}
	m.CacheRequests.WithLabelValues(upstream, kind, result).Inc()
	m.CacheBytes.WithLabelValues(upstream, kind, result).Add(float64(bytes))
	src := Cache
	if result == Miss {
		src = Upstream
	}
	m.ServedBytes.WithLabelValues(src).Add(float64(bytes))
}

// DefaultUpstream is the upstream label value of the default upstream
// (upstream.url), whatever host its URL names (nvcr.io, a proxy or lab
// alias of it, a test upstream): dashboards and alerts select nvcr.io by
// this one name, as they select a further upstream by its key in
// upstreams:.
const DefaultUpstream = "nvcr.io"

// UpstreamMetrics records the traffic of one upstream, under the label
// upstream="<its registry name>" (DefaultUpstream for the default). A nil
// *UpstreamMetrics records nothing.
type UpstreamMetrics struct {
	m    *Metrics
	name string
}

// For returns the recorder of the upstream named registry (a configured
// registry name: the label's values are never a client's input) and
// creates its series at zero, so that dashboards and alerts see every
// upstream from the start. nil on a nil *Metrics.
func (m *Metrics) For(registry string) *UpstreamMetrics {
	if m == nil {
		return nil
	}
	for _, k := range []string{"manifest", "blob"} {
		for _, r := range []string{Hit, Miss} {
			m.CacheRequests.WithLabelValues(registry, k, r)
			m.CacheBytes.WithLabelValues(registry, k, r)
		}
	}
	for _, r := range []string{"success", "failure"} {
		m.TokenExchanges.WithLabelValues(registry, r)
	}
	m.UpstreamBytes.WithLabelValues(registry)
	m.UpstreamLimited.WithLabelValues(registry)
	m.UpstreamBackoff.WithLabelValues(registry)
	return &UpstreamMetrics{m: m, name: registry}
}

// StatusNotRegistry, passed as UpstreamRequest's status, records an
// answer that was not a registry's (an HTML page from a captive portal or
// proxy, whatever its HTTP status): result "not_registry".
const StatusNotRegistry = -2

// Request records one upstream exchange (upstream.Client.OnRequest). status
// is the HTTP status, or 0 for a transport error, -1 for a request held
// back by a backoff, or StatusNotRegistry.
func (u *UpstreamMetrics) Request(kind string, status int, seconds float64) {
	if u == nil {
		return
	}
	m := u.m
	result := "error"
	switch {
	case status == -1:
		result = "backoff"
	case status == StatusNotRegistry:
		result = "not_registry"
	case status == 429:
		result = "429"
		m.UpstreamLimited.WithLabelValues(u.name).Inc()
	case status > 0:
		result = statusClass(status)
	}
	m.UpstreamReqs.WithLabelValues(u.name, kind, result).Inc()
	if status > 0 {
		m.UpstreamLatency.WithLabelValues(u.name, kind).Observe(seconds)
	}
}

// Received records body bytes received from the upstream
// (upstream.Client.OnBytes).
func (u *UpstreamMetrics) Received(n int) {
	if u != nil {
		u.m.UpstreamBytes.WithLabelValues(u.name).Add(float64(n))
	}
}

// TokenExchange records one token exchange (auth.Transport.OnTokenExchange).
func (u *UpstreamMetrics) TokenExchange(ok bool) {
	if u == nil {
		return
	}
	r := "failure"
	if ok {
		r = "success"
	}
	u.m.TokenExchanges.WithLabelValues(u.name, r).Inc()
}

// BackoffRefusal records a request held back by this upstream's 429
// back-off (upstream.Client.OnBackoffRefusal).
func (u *UpstreamMetrics) BackoffRefusal() {
	if u != nil {
		u.m.UpstreamBackoff.WithLabelValues(u.name).Inc()
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
