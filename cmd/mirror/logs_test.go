package main

import (
	"log/slog"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// TestLogsOfTokenRequestsRefusalsAndFailedLogins: in a mirror process with
// htpasswd users, token requests and paths refused for a ".." segment get
// an access log line like every registry request, and a failed login is
// logged in the slog format of every other line (distribution's htpasswd
// authenticator logs through logrus), never in logrus's own and never
// with the password.
func TestLogsOfTokenRequestsRefusalsAndFailedLogins(t *testing.T) {
	up := ngctest.New(ngctest.Options{})
	defer up.Close()
	_, base, stderr := startMirror(t, up.URL(), map[string]string{"MIRROR_ACCESS_MODE": "htpasswd",
		"MIRROR_HTPASSWD_FILE": ngctest.WriteHtpasswd(t, "alice", "alice-pw")})
	c := &http.Client{Timeout: 30 * time.Second}
	defer c.CloseIdleConnections()
	do := func(path, user, pw string) int {
		req, _ := http.NewRequest(http.MethodGet, base+path, nil)
		if user != "" {
			req.SetBasicAuth(user, pw)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if s := do("/auth/token?service=mirror&scope=repository:nvidia/cuda:pull", "alice", "not-alices-password"); s != http.StatusUnauthorized {
		t.Errorf("token with a wrong password: %d, want 401", s)
	}
	if s := do("/auth/token?service=mirror&scope=repository:nvidia/cuda:pull", "alice", "alice-pw"); s != http.StatusOK {
		t.Errorf("token for alice: %d, want 200", s)
	}
	if s := do("/v2/nvidia/../myorg/team/private-image/manifests/1.0", "", ""); s != http.StatusBadRequest {
		t.Errorf("a .. path: %d, want 400", s)
	}

	want := []*regexp.Regexp{
		regexp.MustCompile(`level=INFO msg=request component=proxy method=GET route=other path=/auth/token status=401 .*client=127\.0\.0\.1`),
		regexp.MustCompile(`level=INFO msg=request component=proxy method=GET route=other path=/auth/token status=200 `),
		regexp.MustCompile(`level=INFO msg=request component=proxy method=GET route=other path=/v2/nvidia/\.\./myorg/team/private-image/manifests/1\.0 status=400 `),
		regexp.MustCompile(`level=INFO msg="user failed to authenticate" component=distribution error=.* username=alice`),
	}
	ok := testsupport.Until(10*time.Second, 20*time.Millisecond, func() bool {
		for _, re := range want {
			if !re.MatchString(stderr.String()) {
				return false
			}
		}
		return true
	})
	if !ok {
		for _, re := range want {
			if !re.MatchString(stderr.String()) {
				t.Errorf("no log line matches %s", re)
			}
		}
		t.Fatalf("the log:\n%s", stderr)
	}
	for _, line := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
		if !strings.HasPrefix(line, "time=") || !regexp.MustCompile(` level=(DEBUG|INFO|WARN|ERROR) `).MatchString(line) || strings.Contains(line, "go.version") {
			t.Errorf("a log line not in the slog format:\n%s", line)
		}
	}
	for _, secret := range []string{"not-alices-password", "alice-pw", "scope="} {
		if strings.Contains(stderr.String(), secret) {
			t.Errorf("the log holds %q:\n%s", secret, stderr)
		}
	}
}

// TestLogrusHookDropsPasswords: what distribution logs through logrus
// comes out as slog lines at the mapped level, without a field named
// like a password (its htpasswd controller logs the one it provisions).
func TestLogrusHookDropsPasswords(t *testing.T) {
	var buf lockedBuffer
	h := slogHook{log: slog.New(slog.NewTextHandler(&buf, nil))}
	e := logrus.NewEntry(logrus.New()).WithFields(logrus.Fields{"user": "docker", "password": "s3cret", "go.version": "go1"})
	e.Level, e.Message = logrus.WarnLevel, "htpasswd is missing, provisioning with default user"
	if err := h.Fire(e); err != nil {
		t.Fatal(err)
	}
	if out := buf.String(); !strings.Contains(out, `level=WARN msg="htpasswd is missing, provisioning with default user" user=docker`) ||
		strings.Contains(out, "s3cret") || strings.Contains(out, "go.version") {
		t.Errorf("hook output: %s", out)
	}
}
