package metrics

import "github.com/prometheus/client_golang/prometheus"

// Tracking are the collectors of tag tracking, pull history and prefetch
// (internal/tracking, internal/prefetch). A nil *Tracking records nothing.
type Tracking struct {
	TagsDiscovered *prometheus.CounterVec // kind: tag, release
	TagPolls       *prometheus.CounterVec // result: success, failure
	StateErrors    *prometheus.CounterVec // op
	PullsDropped   prometheus.Counter
	Leader         prometheus.Gauge
	Ticks          *prometheus.CounterVec // rule kind: rule, auto, poll
	Jobs           *prometheus.CounterVec // result: done, failed
	JobsRunning    prometheus.Gauge
	PrefetchBlobs  *prometheus.CounterVec // result: fetched, cached, failed
	PrefetchBytes  prometheus.Counter
}

// State operations, the values of the "op" label of
// ngc_mirror_state_errors_total.
const (
	OpRecordPull = "record_pull"
	OpPoll       = "poll"
	OpSchedule   = "schedule"
	OpJob        = "job"
	OpAPI        = "api"
)

// NewTracking creates the collectors and registers them with reg.
func NewTracking(reg prometheus.Registerer) *Tracking {
	t := &Tracking{
		TagsDiscovered: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_tags_discovered_total",
			Help: "Upstream tags seen for the first time (kind=tag), and new monthly releases of a known variant (kind=release).",
		}, []string{"kind"}),
		TagPolls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_tag_polls_total",
			Help: "Tag-list polls of tracked repositories, by result.",
		}, []string{"result"}),
		StateErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_state_errors_total",
			Help: "Failed operations on the state store (Redis or the embedded file), by operation.",
		}, []string{"op"}),
		PullsDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ngc_mirror_pull_records_dropped_total",
			Help: "Manifest pulls not recorded in the pull history (state store unreachable or queue full).",
		}),
		Leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ngc_mirror_scheduler_leader",
			Help: "1 while this replica holds the scheduler lock and runs scheduled ticks and prefetch jobs.",
		}),
		Ticks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_scheduler_ticks_total",
			Help: "Scheduled ticks this replica ran, by kind (rule: a prefetch rule, auto: the automatic rule, poll: tag polling, task: cache gc).",
		}, []string{"kind"}),
		Jobs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_prefetch_jobs_total",
			Help: "Prefetch jobs this replica finished, by result (done, failed, cancelled).",
		}, []string{"result"}),
		JobsRunning: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ngc_mirror_prefetch_jobs_running",
			Help: "Prefetch jobs running on this replica.",
		}),
		PrefetchBlobs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_prefetch_blobs_total",
			Help: "Blobs handled by prefetch jobs: fetched from the upstream, already cached, or failed.",
		}, []string{"result"}),
		PrefetchBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ngc_mirror_prefetch_fetched_bytes_total",
			Help: "Blob bytes that prefetch jobs fetched into the cache.",
		}),
	}
	for _, k := range []string{"tag", "release"} {
		t.TagsDiscovered.WithLabelValues(k)
	}
	for _, r := range []string{"success", "failure"} {
		t.TagPolls.WithLabelValues(r)
	}
	for _, op := range []string{OpRecordPull, OpPoll, OpSchedule, OpJob, OpAPI} {
		t.StateErrors.WithLabelValues(op)
	}
	for _, k := range []string{"rule", "auto", "poll", "task"} {
		t.Ticks.WithLabelValues(k)
	}
	for _, r := range []string{"done", "failed"} {
		t.Jobs.WithLabelValues(r)
	}
	for _, r := range []string{"fetched", "cached", "failed"} {
		t.PrefetchBlobs.WithLabelValues(r)
	}
	reg.MustRegister(t.TagsDiscovered, t.TagPolls, t.StateErrors, t.PullsDropped, t.Leader, t.Ticks,
		t.Jobs, t.JobsRunning, t.PrefetchBlobs, t.PrefetchBytes)
	return t
}

// StateError counts a failed state operation.
func (t *Tracking) StateError(op string) {
	if t != nil {
		t.StateErrors.WithLabelValues(op).Inc()
	}
}

// Discovered counts new tags (kind "tag") or new releases (kind "release").
func (t *Tracking) Discovered(kind string, n int) {
	if t != nil && n > 0 {
		t.TagsDiscovered.WithLabelValues(kind).Add(float64(n))
	}
}

// Polled counts one tag-list poll.
func (t *Tracking) Polled(ok bool) {
	if t == nil {
		return
	}
	if ok {
		t.TagPolls.WithLabelValues("success").Inc()
	} else {
		t.TagPolls.WithLabelValues("failure").Inc()
	}
}

// PullDropped counts a pull the history could not record.
func (t *Tracking) PullDropped() {
	if t != nil {
		t.PullsDropped.Inc()
	}
}

// SetLeader sets the scheduler-leader gauge.
func (t *Tracking) SetLeader(on bool) {
	if t == nil {
		return
	}
	if on {
		t.Leader.Set(1)
	} else {
		t.Leader.Set(0)
	}
}

// Tick counts a scheduled tick of kind rule, auto or poll.
func (t *Tracking) Tick(kind string) {
	if t != nil {
		t.Ticks.WithLabelValues(kind).Inc()
	}
}

// JobStarted and JobEnded track running jobs; JobEnded counts the result
// ("done", "failed" or "cancelled").
func (t *Tracking) JobStarted() {
	if t != nil {
		t.JobsRunning.Inc()
	}
}

// JobStopped records a job cut off (shutdown, lost leadership) to be
// resumed later: not counted as ended.
func (t *Tracking) JobStopped() {
	if t != nil {
		t.JobsRunning.Dec()
	}
}

func (t *Tracking) JobEnded(result string) {
	if t != nil {
		t.JobsRunning.Dec()
		t.Jobs.WithLabelValues(result).Inc()
	}
}

// PrefetchBlob counts a blob a job handled; fetched bytes count only for
// result "fetched".
func (t *Tracking) PrefetchBlob(result string, bytes int64) {
	if t == nil {
		return
	}
	t.PrefetchBlobs.WithLabelValues(result).Inc()
	if result == "fetched" {
		t.PrefetchBytes.Add(float64(bytes))
	}
}
