// Package redistest starts a throwaway redis-server (Debian's package) on a
// free loopback port for tests. MIRROR_TEST_REDIS_URL names an existing
// server instead. Without either, tests skip, unless
// MIRROR_TEST_REQUIRE_REDIS=1 (set by `make test`), when they fail.
package redistest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/state"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// Server is a running redis-server.
type Server struct {
	URL  string
	Addr string
	p    *testsupport.Process
	dir  string
	port string
}

// Start starts a server that is stopped when t ends. Each call gets its
// own server (and so an empty database).
func Start(t testing.TB) *Server {
	t.Helper()
	if u := os.Getenv("MIRROR_TEST_REDIS_URL"); u != "" {
		return &Server{URL: u}
	}
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("MIRROR_TEST_REQUIRE_REDIS") == "1" {
			t.Fatalf("redis-server not found (apt-get install redis-server, or .ci/install.sh)")
		}
		t.Skip("redis-server not installed; set MIRROR_TEST_REQUIRE_REDIS=1 to fail instead")
	}
	s := &Server{dir: t.TempDir(), Addr: testsupport.FreeAddr(t)}
	_, s.port, _ = net.SplitHostPort(s.Addr)
	s.URL = "redis://" + s.Addr + "/0"
	s.start(t, bin)
	t.Cleanup(s.Stop)
	return s
}

func (s *Server) start(t testing.TB, bin string) {
	t.Helper()
	cmd := exec.Command(bin, "--bind", "127.0.0.1", "--port", s.port,
		"--save", "", "--appendonly", "no", "--dir", s.dir, "--protected-mode", "yes",
		"--logfile", filepath.Join(s.dir, "redis.log"))
	p, err := testsupport.Start(t, cmd, os.Kill)
	if err != nil {
		t.Fatalf("starting redis-server: %v", err)
	}
	s.p = p
	if testsupport.Until(10*time.Second, 20*time.Millisecond, func() bool {
		c, err := net.DialTimeout("tcp", s.Addr, 100*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err == nil
	}) {
		return
	}
	log, _ := os.ReadFile(filepath.Join(s.dir, "redis.log"))
	t.Fatalf("redis-server did not listen on %s: %s", s.Addr, log)
}

// Stop kills the server (its data is gone: nothing is saved).
func (s *Server) Stop() {
	if s.p == nil {
		return
	}
	s.p.Kill()
	s.p = nil
}

// Restart starts the server again on the same port after Stop.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	if s.p != nil {
		t.Fatal("redistest: Restart while running")
	}
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatal(err)
	}
	s.start(t, bin)
}

// Open returns a state store on the server (default options), closed
// when t ends: each call another client, as replicas sharing it have.
func (s *Server) Open(t testing.TB) *state.Redis {
	t.Helper()
	r, err := state.OpenRedis(s.URL, state.RedisOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// String describes the server for logs.
func (s *Server) String() string { return fmt.Sprintf("redis-server at %s", s.Addr) }
