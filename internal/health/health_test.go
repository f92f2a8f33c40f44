package health_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/auth"
	"github.com/ngc-mirror/ngc-mirror/internal/health"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

type readyz struct {
	Status, Storage, Upstream, Cluster string
	Reason                             string `json:"upstream_reason"`
	Upstreams                          map[string]struct{ Status, Reason string }
}

func ask(t *testing.T, c *health.Checker) (int, readyz) {
	t.Helper()
	w := httptest.NewRecorder()
	c.Readyz(w, httptest.NewRequestWithContext(t.Context(), http.MethodGet, "/readyz", nil))
	var rep readyz
	if err := json.Unmarshal(w.Body.Bytes(), &rep); err != nil {
		t.Fatalf("readyz body %q: %v", w.Body.String(), err)
	}
	return w.Code, rep
}

// TestReadyzUpstream: /readyz reports the real (fake) registry as ok, a
// captive portal (200 HTML without Docker-Distribution-API-Version) as "not
// a registry" with the reason, and a closed upstream as unreachable;
// neither makes the mirror unready (a warm cache still serves).
func TestReadyzUpstream(t *testing.T) {
	t.Parallel()
	probe := func(t *testing.T, fault func(http.ResponseWriter, *http.Request) bool, closed bool) (int, readyz) {
		up := ngctest.New(ngctest.Options{})
		t.Cleanup(up.Close)
		up.SetFault(fault)
		origin, _ := url.Parse(up.URL())
		c := upstream.New(origin, auth.NewTransport(nil, origin, auth.Credentials{}, nil))
		if closed {
			up.Close()
		}
		return ask(t, &health.Checker{StorageProbe: func(context.Context) error { return nil }, Upstreams: []health.UpstreamCheck{{Name: "nvcr.io", Probe: c.Ping}}})
	}
	code, rep := probe(t, nil, false)
	if code != http.StatusOK || rep.Status != "ready" || rep.Upstream != "ok" || rep.Reason != "" {
		t.Fatalf("registry: %d %+v", code, rep)
	}
	code, rep = probe(t, ngctest.CaptivePortal, false)
	if code != http.StatusOK || rep.Upstream != "not a registry" || !strings.Contains(rep.Reason, "Docker-Distribution-API-Version") {
		t.Fatalf("captive portal: %d %+v", code, rep)
	}
	code, rep = probe(t, nil, true)
	if code != http.StatusOK || rep.Upstream != "unreachable" {
		t.Fatalf("closed upstream: %d %+v", code, rep)
	}
}

// TestReadyzCluster: a replica is unready only until it joined; a member
// and a replica filling alone (Redis unreachable) are ready, and say which.
func TestReadyzCluster(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		status string
		ready  bool
		code   int
	}{{"joining", false, 503}, {"ok", true, 200}, {"uncoordinated", true, 200}} {
		c := &health.Checker{StorageProbe: func(context.Context) error { return nil }, Upstreams: []health.UpstreamCheck{{Name: "nvcr.io", Probe: func(context.Context) error { return nil }}},
			Cluster: func() (string, bool) { return tc.status, tc.ready }}
		code, rep := ask(t, c)
		if code != tc.code || rep.Cluster != tc.status {
			t.Errorf("%s: %d %+v, want %d", tc.status, code, rep, tc.code)
		}
	}
}

// TestReadyzEveryUpstream: /readyz pings every upstream and reports each
// by registry name; none of them being down (or refusing the mirror's
// credentials) makes the mirror unready, since its cache still serves.
// The default upstream's status stays in "upstream" too. Each upstream is
// pinged at most once per interval, the failing one included.
func TestReadyzEveryUpstream(t *testing.T) {
	t.Parallel()
	client := func(u *ngctest.Upstream) *upstream.Client {
		origin, _ := url.Parse(u.URL())
		return upstream.New(origin, auth.NewTransport(nil, origin, auth.Credentials{}, nil))
	}
	nvcr, hub := ngctest.New(ngctest.Options{}), ngctest.New(ngctest.Options{})
	t.Cleanup(nvcr.Close)
	t.Cleanup(hub.Close)
	refused := func(context.Context) error { return fmt.Errorf("%w: 401", health.ErrCredentialsRefused) }
	c := &health.Checker{
		StorageProbe: func(context.Context) error { return nil },
		Upstreams: []health.UpstreamCheck{
			{Name: "nvcr.io", Probe: client(nvcr).Ping},
			{Name: "docker.io", Probe: client(hub).Ping},
			{Name: "ghcr.io", Probe: refused, Credentials: "upstreams.ghcr.io.username and password"},
		},
	}
	hub.SetFault(ngctest.FailWith(http.StatusServiceUnavailable))
	code, rep := ask(t, c)
	want := map[string]string{"nvcr.io": "ok", "docker.io": "unreachable", "ghcr.io": "credentials refused"}
	if code != http.StatusOK || rep.Status != "ready" || rep.Upstream != "ok" {
		t.Fatalf("one upstream down, one refusing: %d %+v, want 200 ready with the default ok", code, rep)
	}
	for name, st := range want {
		if got := rep.Upstreams[name]; got.Status != st {
			t.Errorf("upstreams[%s] = %+v, want %s", name, got, st)
		}
	}
	if r := rep.Upstreams["ghcr.io"].Reason; !strings.Contains(r, "upstreams.ghcr.io.username") {
		t.Errorf("ghcr.io's reason %q does not name its credentials' settings", r)
	}
	if r := rep.Upstreams["docker.io"].Reason; r == "" {
		t.Error("docker.io unreachable without a reason")
	}
	pings := func(u *ngctest.Upstream) int { return u.Count("registry", http.MethodGet, "/v2/") }
	n1, n2 := pings(nvcr), pings(hub)
	if n1 == 0 || n2 == 0 {
		t.Fatalf("pings: nvcr.io %d, docker.io %d; want both pinged", n1, n2)
	}
	hub.SetFault(nil)
	if code, rep = ask(t, c); code != http.StatusOK || rep.Upstreams["docker.io"].Status != "unreachable" {
		t.Fatalf("asked again at once: %d %+v, want the last ping's result", code, rep)
	}
	if pings(nvcr) != n1 || pings(hub) != n2 {
		t.Fatalf("asked again at once, the upstreams were pinged again (%d, %d more)", pings(nvcr)-n1, pings(hub)-n2)
	}

	// Every upstream down: still ready (the cache serves); the default's
	// state in "upstream" as before.
	nvcr.Close()
	c2 := &health.Checker{StorageProbe: func(context.Context) error { return nil },
		Upstreams: []health.UpstreamCheck{{Name: "nvcr.io", Probe: client(nvcr).Ping}, {Name: "docker.io", Probe: refused}}}
	if code, rep = ask(t, c2); code != http.StatusOK || rep.Upstream != "unreachable" || rep.Upstreams["nvcr.io"].Status != "unreachable" ||
		rep.Upstreams["docker.io"].Status != "credentials refused" {
		t.Fatalf("every upstream down: %d %+v, want 200 with each reported", code, rep)
	}
}

// TestReadyzDoesNotWaitForAHangingUpstream: an upstream that accepts and
// never answers (its ping blocks until the test lets it go) does not hold
// /readyz: the probe answers, ready, with that upstream "checking" (no
// ping has ended yet) and the other one ok; once the ping fails, the next
// /readyz says unreachable, and no second ping is started meanwhile.
func TestReadyzDoesNotWaitForAHangingUpstream(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	var hung atomic.Int32
	c := &health.Checker{StorageProbe: func(context.Context) error { return nil }, Upstreams: []health.UpstreamCheck{
		{Name: "nvcr.io", Probe: func(context.Context) error { return nil }},
		{Name: "docker.io", Probe: func(context.Context) error {
			hung.Add(1)
			<-release // ignores its context, as a hung connection might
			return fmt.Errorf("read: connection reset")
		}},
	}}
	type answer struct {
		code int
		rep  readyz
	}
	got := make(chan answer, 1)
	go func() { code, rep := ask(t, c); got <- answer{code, rep} }()
	var a answer
	select {
	case a = <-got:
	case <-time.After(20 * time.Second): // a guard, not a measure: the old code never answered
		close(release)
		t.Fatal("/readyz waited for the hanging upstream's ping")
	}
	if a.code != http.StatusOK || a.rep.Upstreams["docker.io"].Status != "checking" || a.rep.Upstreams["nvcr.io"].Status != "ok" {
		close(release)
		t.Fatalf("/readyz while docker.io hangs: %d %+v", a.code, a.rep)
	}
	if _, rep := ask(t, c); rep.Upstreams["docker.io"].Status != "checking" || hung.Load() != 1 {
		close(release)
		t.Fatalf("second /readyz: %+v, %d pings of the hanging upstream, want checking and 1", rep, hung.Load())
	}
	close(release)
	if !testsupport.Until(10*time.Second, 10*time.Millisecond, func() bool {
		_, rep := ask(t, c)
		return rep.Upstreams["docker.io"].Status == "unreachable"
	}) {
		t.Fatal("the failed ping never reached /readyz")
	}
}
