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
// cache storage accepts a write, 503 otherwise (and, with clustering,
// until the replica joined). It also reports whether each upstream
// answered its last ping, and whether the state store answers, none of
// which makes the mirror unready: a mirror with a warm cache is useful
// while an uplink, or one of several upstreams, is down, and a load
// balancer taking every replica out then would serve nothing.
type Checker struct {
	// StorageProbe writes and removes a small object in the cache.
	StorageProbe func(ctx context.Context) error
	// Upstreams are the upstream registries to ping, the default first.
	Upstreams []UpstreamCheck
	// StateProbe, when set, pings the state store; an error wrapping
	// ErrStateOff is reported as "off".
	StateProbe func(ctx context.Context) error
	// Cluster, when set (scale-out), reports this replica's membership
	// ("ok", "uncoordinated": Redis unreachable, filling alone, or
	// "joining") and whether it may take clients: a replica is unready
	// only until it registered (cluster.Node).
	Cluster func() (status string, ready bool)

	mu    sync.Mutex
	pings map[string]*ping // by UpstreamCheck.Name
}

// UpstreamCheck is one upstream registry /readyz pings.
type UpstreamCheck struct {
	// Name is the registry name the report keys it by ("nvcr.io",
	// "docker.io").
	Name string
	// Probe pings the registry; an error wrapping ErrCredentialsRefused is
	// reported as "credentials refused".
	Probe func(ctx context.Context) error
	// Credentials names the settings of the mirror's credentials for it,
	// for the reason of "credentials refused" (default: the NGC API key's).
	Credentials string
}

// ping is the last ping of one upstream.
type ping struct {
	mu      sync.Mutex
	last    time.Time     // when the last ping ended; zero before the first
	err     error         // its result
	running chan struct{} // closed when the running ping ends; nil when none runs
}

type report struct {
	Status  string `json:"status"`
	Storage string `json:"storage"`
	// Upstream and UpstreamReason are the default upstream's entry of
	// Upstreams, as reported before there were several.
	Upstream string `json:"upstream"`
	State    string `json:"state,omitempty"`
	Cluster  string `json:"cluster,omitempty"`
	// UpstreamReason says why the upstream is not "ok" (fixed texts: no
	// URLs, tokens or upstream bodies).
	UpstreamReason string                    `json:"upstream_reason,omitempty"`
	Upstreams      map[string]upstreamReport `json:"upstreams,omitempty"`
}

// upstreamReport is one upstream's state in /readyz.
type upstreamReport struct {
	Status string `json:"status"`
	Reason string `json:"reason,omitempty"`
}

// Healthz is the liveness handler.
func (c *Checker) Healthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain")
	_, _ = w.Write([]byte("ok\n"))
}

// Readyz is the readiness handler. Its JSON body is
// {"status":"ready|unready","storage":"ok|not writable",
// "upstream":"ok|unreachable|credentials refused|not a registry|checking",
// "upstream_reason":"...","upstreams":{"<registry>":{"status":"...",
// "reason":"..."}},"state":"ok|unreachable|off",
// "cluster":"ok|uncoordinated|joining"}: "upstreams" has every upstream by
// registry name, "upstream" (and its reason) the default's. "not a
// registry" means that the upstream's GET /v2/ answered without
// Docker-Distribution-API-Version, or with an HTML page
// (upstream.ErrNotRegistry): a captive portal or a misconfigured proxy is
// on the uplink; "checking" that the first ping has not answered within
// pingWait. The upstreams are pinged at once, each at most every
// upstreamEvery, in the background: a probe waits at most pingWait for a
// ping, else reports the last result. No upstream's state changes the
// status code.
func (c *Checker) Readyz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	rep := report{Status: "ready", Storage: "ok", Upstream: "ok"}
	if err := c.StorageProbe(ctx); err != nil {
		rep.Status, rep.Storage = "unready", "not writable"
	}
	ups := make([]upstreamReport, len(c.Upstreams))
	var wg sync.WaitGroup
	for i, u := range c.Upstreams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err, known := c.ping(ctx, u)
			if !known {
				ups[i] = upstreamReport{Status: "checking", Reason: "the first ping of the upstream has not answered yet"}
				return
			}
			ups[i] = describe(u, err)
		}()
	}
	wg.Wait()
	for i, u := range c.Upstreams {
		if rep.Upstreams == nil {
			rep.Upstreams = map[string]upstreamReport{}
		}
		rep.Upstreams[u.Name] = ups[i]
		if i == 0 {
			rep.Upstream, rep.UpstreamReason = ups[i].Status, ups[i].Reason
		}
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

// describe is the report of upstream u whose last ping returned err.
func describe(u UpstreamCheck, err error) upstreamReport {
	switch {
	case err == nil:
		return upstreamReport{Status: "ok"}
	case errors.Is(err, ErrCredentialsRefused):
		creds := u.Credentials
		if creds == "" {
			creds = "NGC_API_KEY (upstream.api_key)"
		}
		return upstreamReport{Status: "credentials refused", Reason: "the upstream refused the mirror's credentials: check " + creds}
	case errors.Is(err, upstream.ErrNotRegistry):
		return upstreamReport{Status: "not a registry", Reason: "GET /v2/ answered without the Docker-Distribution-API-Version header (or with an HTML page): a captive portal or proxy on the uplink answers instead of the registry"}
	}
	return upstreamReport{Status: "unreachable", Reason: "the last ping of the upstream failed (network, status or token error; see the log)"}
}

// upstreamEvery is how often /readyz pings an upstream at most.
const upstreamEvery = 30 * time.Second

// pingWait is how long /readyz waits for a ping it started (or found
// running) before it answers with the last result: a hanging upstream
// must not hold readiness probes (Kubernetes' default timeout is 1 s,
// HAProxy's check the deploy files' 2 s). pingTimeout bounds the ping
// itself.
const (
	pingWait    = 500 * time.Millisecond
	pingTimeout = 10 * time.Second
)

// ping returns the result of u's last ping and whether there is one. When
// that result is upstreamEvery old it starts a new ping in the background
// (one at a time per upstream) and waits for it at most pingWait (or until
// ctx ends).
func (c *Checker) ping(ctx context.Context, u UpstreamCheck) (err error, known bool) {
	c.mu.Lock()
	if c.pings == nil {
		c.pings = map[string]*ping{}
	}
	p := c.pings[u.Name]
	if p == nil {
		p = &ping{}
		c.pings[u.Name] = p
	}
	c.mu.Unlock()
	p.mu.Lock()
	if p.running == nil && time.Since(p.last) >= upstreamEvery {
		done := make(chan struct{})
		p.running = done
		go func() {
			pctx, cancel := context.WithTimeout(context.Background(), pingTimeout)
			err := u.Probe(pctx)
			cancel()
			p.mu.Lock()
			p.err, p.last, p.running = err, time.Now(), nil
			p.mu.Unlock()
			close(done)
		}()
	}
	running := p.running
	p.mu.Unlock()
	if running != nil {
		t := time.NewTimer(pingWait)
		defer t.Stop()
		select {
		case <-running:
		case <-t.C:
		case <-ctx.Done():
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err, !p.last.IsZero()
}
