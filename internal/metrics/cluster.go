package metrics

import "github.com/prometheus/client_golang/prometheus"

// Peer results, the values of the "result" label of
// ngc_mirror_peer_blobs_total.
const (
	PeerOK    = "ok"
	PeerError = "error"
)

// Cluster holds the collectors of scale-out (internal/cluster). A nil
// *Cluster is valid and records nothing.
type Cluster struct {
	Members     prometheus.Gauge
	Coordinated prometheus.Gauge
	PeerBlobs   *prometheus.CounterVec // result (ok, error)
	PeerBytes   *prometheus.CounterVec // direction (in, out)
	FillsOwned  prometheus.Counter
}

// NewCluster creates the cluster collectors and registers them with reg.
// cmd/mirror registers them only when clustering is on (cluster.advertise).
func NewCluster(reg prometheus.Registerer) *Cluster {
	m := &Cluster{
		Members: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ngc_mirror_cluster_members",
			Help: "Live replicas (this one included) seen in Redis at the last heartbeat; 1 (itself) while Redis is unreachable.",
		}),
		Coordinated: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ngc_mirror_cluster_coordinated",
			Help: "1 while this replica coordinates its fills through Redis; 0 while Redis is unreachable and it fills alone.",
		}),
		PeerBlobs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_peer_blobs_total",
			Help: "Blob streams this replica read from a peer replica (the blob's owner) instead of the upstream, by result.",
		}, []string{"result"}),
		PeerBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ngc_mirror_peer_bytes_total",
			Help: "Blob bytes received from peers (in) and sent to peers (out).",
		}, []string{"direction"}),
		FillsOwned: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ngc_mirror_fills_owned_total",
			Help: "Blob fills this replica ran from the upstream as the blob's owner (holding its lease).",
		}),
	}
	for _, r := range []string{PeerOK, PeerError} {
		m.PeerBlobs.WithLabelValues(r)
	}
	for _, d := range []string{"in", "out"} {
		m.PeerBytes.WithLabelValues(d)
	}
	reg.MustRegister(m.Members, m.Coordinated, m.PeerBlobs, m.PeerBytes, m.FillsOwned)
	return m
}

// SetMembers records the live replicas seen and whether Redis answered;
// uncoordinated, the members are 1 (this replica alone) whatever n is.
func (m *Cluster) SetMembers(n int, coordinated bool) {
	if m == nil {
		return
	}
	if coordinated {
		m.Members.Set(float64(n))
		m.Coordinated.Set(1)
	} else {
		// Without Redis the replica fills alone: the cluster it works
		// with is itself (never the last count Redis gave).
		m.Members.Set(1)
		m.Coordinated.Set(0)
	}
}

// PeerBlob records one blob stream from a peer and how it ended.
func (m *Cluster) PeerBlob(ok bool) {
	if m == nil {
		return
	}
	if ok {
		m.PeerBlobs.WithLabelValues(PeerOK).Inc()
	} else {
		m.PeerBlobs.WithLabelValues(PeerError).Inc()
	}
}

// PeerIn records bytes received from a peer.
func (m *Cluster) PeerIn(n int) {
	if m != nil && n > 0 {
		m.PeerBytes.WithLabelValues("in").Add(float64(n))
	}
}

// PeerOut records bytes sent to a peer.
func (m *Cluster) PeerOut(n int64) {
	if m != nil && n > 0 {
		m.PeerBytes.WithLabelValues("out").Add(float64(n))
	}
}

// FillOwned records a fill run from the upstream as the blob's owner.
func (m *Cluster) FillOwned() {
	if m != nil {
		m.FillsOwned.Inc()
	}
}
