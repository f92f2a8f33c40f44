package health_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/auth"
	"github.com/ngc-mirror/ngc-mirror/internal/health"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

type readyz struct {
	Status, Storage, Upstream, Cluster string
	Reason                             string `json:"upstream_reason"`
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
		return ask(t, &health.Checker{StorageProbe: func(context.Context) error { return nil }, UpstreamProbe: c.Ping})
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
		c := &health.Checker{StorageProbe: func(context.Context) error { return nil }, UpstreamProbe: func(context.Context) error { return nil },
			Cluster: func() (string, bool) { return tc.status, tc.ready }}
		code, rep := ask(t, c)
		if code != tc.code || rep.Cluster != tc.status {
			t.Errorf("%s: %d %+v, want %d", tc.status, code, rep, tc.code)
		}
	}
}
