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
	"strconv"
	"testing"
	"time"
)

// Server is a running redis-server.
type Server struct {
	URL  string
	Addr string
	cmd  *exec.Cmd
	dir  string
	port int
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
	s := &Server{dir: t.TempDir()}
	s.port = freePort(t)
	s.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port))
	s.URL = "redis://" + s.Addr + "/0"
	s.start(t, bin)
	t.Cleanup(s.Stop)
	return s
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func (s *Server) start(t testing.TB, bin string) {
	t.Helper()
	s.cmd = exec.Command(bin, "--bind", "127.0.0.1", "--port", strconv.Itoa(s.port),
		"--save", "", "--appendonly", "no", "--dir", s.dir, "--protected-mode", "yes",
		"--logfile", filepath.Join(s.dir, "redis.log"))
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("starting redis-server: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.DialTimeout("tcp", s.Addr, 100*time.Millisecond); err == nil {
			c.Close()
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	log, _ := os.ReadFile(filepath.Join(s.dir, "redis.log"))
	t.Fatalf("redis-server did not listen on %s: %s", s.Addr, log)
}

// Stop kills the server (its data is gone: nothing is saved).
func (s *Server) Stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	_, _ = s.cmd.Process.Wait()
	s.cmd = nil
}

// Restart starts the server again on the same port after Stop.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	if s.cmd != nil {
		t.Fatal("redistest: Restart while running")
	}
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatal(err)
	}
	s.start(t, bin)
}

// String describes the server for logs.
func (s *Server) String() string { return fmt.Sprintf("redis-server at %s", s.Addr) }
