package main

import (
	"encoding/json"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// loopbackHAProxyConfig is deploy/haproxy/scale-out.cfg (the balancer of
// the compose scale-out profile) pointed at one mirror on loopback: bind on
// listen, one server at mirror, no Docker DNS resolver. Everything else,
// option forwardfor included, is the shipped file's.
func loopbackHAProxyConfig(t *testing.T, listen, mirror string) string {
	t.Helper()
	raw, err := os.ReadFile("../../deploy/haproxy/scale-out.cfg")
	if err != nil {
		t.Fatal(err)
	}
	cfg := string(raw)
	cfg = regexp.MustCompile(`(?m)^resolvers docker\n(?:[ \t]+.*\n)*`).ReplaceAllString(cfg, "")
	cfg = strings.ReplaceAll(cfg, " resolvers docker init-addr last,libc,none", "")
	cfg = regexp.MustCompile(`(?m)^(\s*)bind :5000$`).ReplaceAllString(cfg, "${1}bind "+listen)
	cfg = regexp.MustCompile(`(?m)^\s*server mirror-2 .*\n`).ReplaceAllString(cfg, "")
	cfg = regexp.MustCompile(`(?m)^(\s*)server mirror-1 .*$`).ReplaceAllString(cfg, "${1}server mirror-1 "+mirror)
	if strings.Contains(cfg, "resolvers") || !strings.Contains(cfg, "bind "+listen) || !strings.Contains(cfg, "server mirror-1 "+mirror) {
		t.Fatalf("deploy/haproxy/scale-out.cfg changed shape; adapt this test:\n%s", cfg)
	}
	p := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// clientFrom is an HTTP client whose connections come from the loopback
// address src (127.0.0.0/8 is all loopback on Linux): a client host of its
// own.
func clientFrom(src string) *http.Client {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 10 * time.Second}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: d.DialContext,
	}}
}

// TestClientIPBehindHAProxy: behind the shipped HAProxy configuration
// (real haproxy on loopback) with server.trusted_proxies naming it, the
// mirror tells its clients apart: each has its own requests_per_second
// budget (one client hitting 429 does not limit another), and the pull
// history and the access log name each client's address, not the
// balancer's. An X-Forwarded-For a client writes itself is never believed:
// through the balancer the right-most untrusted hop wins, and from a
// client reaching the mirror directly the header is ignored.
func TestClientIPBehindHAProxy(t *testing.T) {
	if _, err := exec.LookPath("haproxy"); err != nil {
		t.Fatal("haproxy is not installed: run .ci/install.sh")
	}
	up := ngctest.New(ngctest.Options{})
	defer up.Close()
	if _, err := up.Populate(4 << 10); err != nil {
		t.Fatal(err)
	}
	cfgFile := testsupport.WriteConfig(t, "server: {trusted_proxies: [127.0.0.1/32]}\nlimits: {requests_per_second: 1}\n")
	const token = "test-admin-token-0123456789"
	mirrorAddr := testsupport.FreeAddr(t)
	_, mirrorLog := mirrorProcess(t, map[string]string{"MIRROR_CONFIG": cfgFile, "MIRROR_ADDR": mirrorAddr,
		"MIRROR_UPSTREAM": up.URL(), "MIRROR_DATA_DIR": t.TempDir(), "MIRROR_ADMIN_TOKEN": token})
	lbAddr := testsupport.FreeAddr(t)
	lb := exec.Command("haproxy", "-db", "-f", loopbackHAProxyConfig(t, lbAddr, mirrorAddr))
	lbLog := &lockedBuffer{}
	lb.Stdout, lb.Stderr = lbLog, lbLog
	if _, err := testsupport.Start(t, lb, os.Interrupt); err != nil {
		t.Fatal(err)
	}

	get := func(c *http.Client, url string, header ...string) int {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		resp, err := c.Do(req)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	waiter := clientFrom("127.0.0.9")
	testsupport.Eventually(t, 30*time.Second, "the mirror answering through haproxy", func() bool {
		return get(waiter, "http://"+lbAddr+"/healthz") == http.StatusOK
	})

	manifest := "/v2/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag
	a, b, direct := clientFrom("127.0.0.2"), clientFrom("127.0.0.3"), clientFrom("127.0.0.4")
	// Client A pulls through the balancer, claiming another address.
	if s := get(a, "http://"+lbAddr+manifest, "X-Forwarded-For", "203.0.113.7"); s != http.StatusOK {
		t.Fatalf("A's pull through haproxy: %d\n%s", s, lbLog)
	}
	// A exhausts its budget...
	limited := false
	for range 50 {
		if get(a, "http://"+lbAddr+"/v2/") == http.StatusTooManyRequests {
			limited = true
			break
		}
	}
	if !limited {
		t.Fatal("client A was never rate limited (limits.requests_per_second: 1)")
	}
	// ...which is not B's.
	if s := get(b, "http://"+lbAddr+manifest); s != http.StatusOK {
		t.Errorf("client B's first pull through haproxy, right after A was limited: %d, want 200 (B has a budget of its own)", s)
	}
	// A client that reaches the mirror directly cannot name its address.
	if s := get(direct, "http://"+mirrorAddr+manifest, "X-Forwarded-For", "203.0.113.8"); s != http.StatusOK {
		t.Errorf("direct pull: %d", s)
	}

	// The pull history names A, B and the direct client.
	admin := clientFrom("127.0.0.6")
	var clients map[string]bool
	testsupport.Eventually(t, 30*time.Second, "three pulls in the pull history", func() bool {
		req, _ := http.NewRequest(http.MethodGet, "http://"+mirrorAddr+"/admin/v1/pulls", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := admin.Do(req)
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var body struct {
			Pulls []struct{ Client string }
		}
		if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&body) != nil {
			return false // 429 included: this client's budget refills each second
		}
		clients = map[string]bool{}
		for _, p := range body.Pulls {
			clients[p.Client] = true
		}
		return len(body.Pulls) >= 3
	})
	for _, want := range []string{"127.0.0.2", "127.0.0.3", "127.0.0.4"} {
		if !clients[want] {
			t.Errorf("the pull history lacks client %s: %v", want, clients)
		}
	}
	if len(clients) != 3 {
		t.Errorf("pull history clients: %v, want exactly A, B and the direct client", clients)
	}

	// So does the access log; the claimed addresses appear nowhere.
	testsupport.Eventually(t, 10*time.Second, "access log lines of A, B and the direct client", func() bool {
		l := mirrorLog.String()
		return strings.Contains(l, "client=127.0.0.2") && strings.Contains(l, "client=127.0.0.3") && strings.Contains(l, "client=127.0.0.4")
	})
	if l := mirrorLog.String(); strings.Contains(l, "203.0.113.") || strings.Contains(l, "route=manifest") && regexp.MustCompile(`route=manifest [^\n]*client=127\.0\.0\.1\b`).MatchString(l) {
		t.Errorf("the access log believed a client's own X-Forwarded-For, or named the balancer as a client:\n%s", l)
	}
}
