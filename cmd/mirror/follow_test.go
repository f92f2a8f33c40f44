package main

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/state"
)

// TestFollowSaysWhileTheMirrorIsDown: `jobs --follow` says once that the
// mirror is unreachable (not once per retry) and once that it is back,
// then ends with the job's summary.
func TestFollowSaysWhileTheMirrorIsDown(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	calls := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		calls++
		n := calls
		mu.Unlock()
		j := state.Job{ID: "j1", Repository: "nvidia/x", Reference: "1", State: state.JobRunning}
		switch {
		case n <= 3: // down: the connection is cut without an answer
			conn, _, _ := w.(http.Hijacker).Hijack()
			_ = conn.Close()
			return
		case n >= 5:
			j.State = state.JobDone
		}
		_ = json.NewEncoder(w).Encode(j)
	}))
	defer srv.Close()
	c := &adminClient{base: srv.URL, token: "t", hc: srv.Client()}
	var stdout, stderr bytes.Buffer
	code := followTo(c, state.Job{ID: "j1", Repository: "nvidia/x", Reference: "1", State: state.JobRunning}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, stderr.String())
	}
	out := stderr.String()
	if n := strings.Count(out, "mirror unreachable at "+srv.URL+"; retrying"); n != 1 {
		t.Errorf("%d lines saying the mirror is unreachable, want 1:\n%s", n, out)
	}
	if n := strings.Count(out, "mirror at "+srv.URL+" is reachable again"); n != 1 {
		t.Errorf("%d lines saying the mirror is back, want 1:\n%s", n, out)
	}
}
