// Package health serves the mirror's liveness (/healthz) and readiness
// (/readyz) endpoints.
package health

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// ErrCredentialsRefused is wrapped by an UpstreamProbe error that means the
// upstream answered and refused the mirror's credentials (a wrong NGC API
// key), as opposed to not answering.
var ErrCredentialsRefused = errors.New("health: the upstream refused the mirror's credentials")

// ErrStateOff is wrapped by a StateProbe error that means the state store
// is off by configuration or circumstance (a read-only data disk), not
// failing.
var ErrStateOff = errors.New("health: state store off")

// Checker answers /healthz and /readyz.
//
// /healthz is 200 while the process serves HTTP. /readyz is 200 when the
// cache storage accepts a write, 503 otherwise; it also reports whether the
// upstream answered its last ping, and whether the state store answers,
// neither of which makes the mirror unready: a mirror with a warm cache is
// useful while the uplink is down.
type Checker struct {
	// StorageProbe writes and removes a small object in the cache.
	StorageProbe func(ctx context.Context) error
	// UpstreamProbe pings the upstream registry; an error wrapping
	// ErrCredentialsRefused is reported as "credentials refused".
	UpstreamProbe func(ctx context.Context) error
	// StateProbe, when set, pings the state store; an error wrapping
	// ErrStateOff is reported as "off".
	StateProbe func(ctx context.Context) error
	// Cluster, when set (scale-out), reports this replica's membership
	// ("ok", "uncoordinated": Redis unreachable, filling alone, or
	// "joining") and whether it may take clients: a replica is unready
	// only until it registered (cluster.Node).
	Cluster func() (status string, ready bool)

	mu          sync.Mutex
	lastPing    time.Time
	upstreamErr error
}

type report struct {
	Status   string `json:"status"`
	Storage  string `json:"storage"`
	Upstream string `json:"upstream"`
	State    string `json:"state,omitempty"`
	Cluster  string `json:"cluster,omitempty"`
	// UpstreamReason says why the upstream is not "ok" (fixed texts: no
	// URLs, tokens or upstream bodies).
	UpstreamReason string `json:"upstream_reason,omitempty"`
}

// Healthz is the liveness handler.
func (c *Checker) Healthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain")
	_, _ = w.Write([]byte("ok\n"))
}

// Readyz is the readiness handler. Its JSON body is
// {"status":"ready|unready","storage":"ok|not writable",
// "upstream":"ok|unreachable|credentials refused|not a registry",
// "upstream_reason":"...","state":"ok|unreachable|off",
// "cluster":"ok|uncoordinated|joining"}.
// "not a registry" means that the upstream's GET /v2/ answered without
// Docker-Distribution-API-Version, or with an HTML page
// (upstream.ErrNotRegistry): a captive portal or a misconfigured proxy
// is on the uplink.
func (c *Checker) Readyz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	rep := report{Status: "ready", Storage: "ok", Upstream: "ok"}
	if err := c.StorageProbe(ctx); err != nil {
		rep.Status, rep.Storage = "unready", "not writable"
	}
	switch err := c.upstream(ctx); {
	case errors.Is(err, ErrCredentialsRefused):
		rep.Upstream = "credentials refused"
		rep.UpstreamReason = "the upstream refused the mirror's credentials: check NGC_API_KEY (upstream.api_key)"
	case errors.Is(err, upstream.ErrNotRegistry):
		rep.Upstream = "not a registry"
		rep.UpstreamReason = "GET /v2/ answered without the Docker-Distribution-API-Version header (or with an HTML page): a captive portal or proxy on the uplink answers instead of the registry"
	case err != nil:
		rep.Upstream = "unreachable"
		rep.UpstreamReason = "the last ping of the upstream failed (network, status or token error; see the log)"
	}
	if c.StateProbe != nil {
		switch err := c.StateProbe(ctx); {
		case errors.Is(err, ErrStateOff):
			rep.State = "off"
		case err != nil:
			rep.State = "unreachable"
		default:
			rep.State = "ok"
		}
	}
	if c.Cluster != nil {
		st, ready := c.Cluster()
		rep.Cluster = st
		if !ready {
			rep.Status = "unready"
		}
	}
	w.Header().Set("Content-Type", "application/json")
	if rep.Status != "ready" {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_ = json.NewEncoder(w).Encode(rep)
}

// upstreamEvery is how often /readyz pings the upstream at most.
const upstreamEvery = 30 * time.Second

func (c *Checker) upstream(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.lastPing) >= upstreamEvery {
		c.upstreamErr = c.UpstreamProbe(ctx)
		c.lastPing = time.Now()
	}
	return c.upstreamErr
}
