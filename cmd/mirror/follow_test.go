package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ocierr"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
)

// followed is the job the tests follow, running.
var followed = state.Job{ID: "j1", Repository: "nvidia/x", Reference: "1", State: state.JobRunning}

// scriptedAdmin is a mirror's admin API on 127.0.0.1 whose n-th request
// (from 1) answer(n, w) answers. It returns how many requests came.
func scriptedAdmin(t *testing.T, answer func(n int32, w http.ResponseWriter)) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { answer(calls.Add(1), w) }))
	t.Cleanup(srv.Close)
	return srv, &calls
}

// answerJob answers the followed job, done or still running.
func answerJob(w http.ResponseWriter, done bool) {
	j := followed
	if done {
		j.State = state.JobDone
	}
	_ = json.NewEncoder(w).Encode(j)
}

// cutConnection closes the connection without an answer (the mirror down).
func cutConnection(w http.ResponseWriter) {
	conn, _, _ := w.(http.Hijacker).Hijack()
	_ = conn.Close()
}

// followJob follows the job on srv (polling every poll; 0: the default)
// with token and returns the exit code, stdout and stderr.
func followJob(srv *httptest.Server, token string, poll time.Duration) (int, string, string) {
	c := &adminClient{base: srv.URL, token: token, hc: srv.Client(), poll: poll}
	var stdout, stderr bytes.Buffer
	code := followTo(c, followed, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

// TestFollowSaysWhileTheMirrorIsDown: `jobs --follow` says once that the
// mirror is unreachable (not once per retry) and once that it is back,
// then ends with the job's summary.
func TestFollowSaysWhileTheMirrorIsDown(t *testing.T) {
	t.Parallel()
	srv, _ := scriptedAdmin(t, func(n int32, w http.ResponseWriter) {
		if n <= 3 {
			cutConnection(w)
			return
		}
		answerJob(w, n >= 5)
	})
	code, _, out := followJob(srv, "t", 0)
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	if n := strings.Count(out, "mirror unreachable at "+srv.URL+"; retrying"); n != 1 {
		t.Errorf("%d lines saying the mirror is unreachable, want 1:\n%s", n, out)
	}
	if n := strings.Count(out, "mirror at "+srv.URL+" is reachable again"); n != 1 {
		t.Errorf("%d lines saying the mirror is back, want 1:\n%s", n, out)
	}
}

// TestFollowSaysErrorAnswers: `jobs --follow` says once per change of
// what it meets that the mirror answered an error (its status, with the
// OCI error's code and message when the body is one, never another body),
// keeps following, says when the mirror answers again, and ends with the
// job's summary.
func TestFollowSaysErrorAnswers(t *testing.T) {
	t.Parallel()
	srv, _ := scriptedAdmin(t, func(n int32, w http.ResponseWriter) {
		switch n {
		case 1, 2: // the state store down: twice the same answer, said once
			ocierr.Write(w, http.StatusServiceUnavailable, ocierr.New("UNAVAILABLE", "the state store is unreachable"))
		case 3: // a proxy's page
			w.Header().Set("Content-Type", "text/html")
			w.WriteHeader(http.StatusBadGateway)
			_, _ = io.WriteString(w, "<html>502 Bad Gateway</html>")
		case 4, 5, 6: // down (net/http retries a GET once on a reused connection cut)
			cutConnection(w)
		case 8:
			ocierr.Write(w, http.StatusInternalServerError, ocierr.New("UNKNOWN", "internal error"))
		default:
			answerJob(w, n >= 9)
		}
	})
	code, stdout, stderr := followJob(srv, "t", time.Millisecond)
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, stderr)
	}
	want := strings.Join([]string{
		"mirror at " + srv.URL + " answered 503 (UNAVAILABLE: the state store is unreachable); retrying",
		"mirror at " + srv.URL + " answered 502; retrying",
		"mirror unreachable at " + srv.URL + "; retrying",
		"mirror at " + srv.URL + " is reachable again",
		"mirror at " + srv.URL + " answered 500 (UNKNOWN: internal error); retrying",
		"mirror at " + srv.URL + " answers again",
	}, "\n") + "\n"
	if got := mirrorLines(stderr); got != want {
		t.Errorf("stderr:\n%s\nwant\n%s", stderr, want)
	}
	if !strings.Contains(stdout, "nvidia/x:1") {
		t.Errorf("no summary of the job: %q", stdout)
	}
}

// TestFollowStopsWhenTheTokenIsRefused: a 401 or 403 while following ends
// it at once (polling with the same token cannot succeed) with the
// answer's code and message, the job's ID to follow it again, and a
// non-zero exit (as for a refused first request); never with the token.
func TestFollowStopsWhenTheTokenIsRefused(t *testing.T) {
	t.Parallel()
	const token = "admin-token-not-to-be-shown"
	for _, c := range []struct {
		status int
		code   string
		exit   int
	}{{http.StatusUnauthorized, "UNAUTHORIZED", 1}, {http.StatusForbidden, "DENIED", 2}} {
		srv, calls := scriptedAdmin(t, func(n int32, w http.ResponseWriter) {
			if n == 1 {
				answerJob(w, false)
				return
			}
			ocierr.Write(w, c.status, ocierr.New(c.code, "the admin API needs the admin token"))
		})
		exit, stdout, stderr := followJob(srv, token, time.Millisecond)
		want := fmt.Sprintf("mirror at %s refused to show job j1: %d (%s: the admin API needs the admin token); it goes on there "+
			"(follow it again with a valid admin token: mirror jobs --follow j1)\n", srv.URL, c.status, c.code)
		if exit != c.exit || mirrorLines(stderr) != want || calls.Load() != 2 {
			t.Errorf("%d: exit %d after %d requests, stderr:\n%s\nwant exit %d after 2, stderr:\n%s", c.status, exit, calls.Load(), stderr, c.exit, want)
		}
		if strings.Contains(stderr+stdout, token) {
			t.Errorf("%d: the output holds the token", c.status)
		}
	}
}

// mirrorLines are the lines of a follower's stderr about the mirror (not
// the job's progress lines).
func mirrorLines(stderr string) string {
	var out strings.Builder
	for _, l := range strings.SplitAfter(stderr, "\n") {
		if strings.HasPrefix(l, "mirror ") {
			out.WriteString(l)
		}
	}
	return out.String()
}

// TestFollowGivesUpOnErrorAnswers: answered an error on every poll, the
// follower gives up after its retries with exit 1, naming the last status
// but not a body that is no OCI error (a proxy's page).
func TestFollowGivesUpOnErrorAnswers(t *testing.T) {
	t.Parallel()
	srv, calls := scriptedAdmin(t, func(n int32, w http.ResponseWriter) {
		w.WriteHeader(http.StatusBadGateway)
		_, _ = io.WriteString(w, "<html>502 Bad Gateway</html>")
	})
	code, _, stderr := followJob(srv, "t", time.Millisecond)
	if code != 1 || strings.Count(stderr, "answered 502; retrying") != 1 || !strings.Contains(stderr, "prefetch: lost the mirror: it answered 502\n") ||
		strings.Contains(stderr, "<html>") || calls.Load() != 21 {
		t.Errorf("exit %d after %d requests, stderr:\n%s", code, calls.Load(), stderr)
	}
}
