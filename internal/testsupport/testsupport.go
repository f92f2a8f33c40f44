// Package testsupport is what the tests of several packages share:
// waiting for a condition within a bound (Until, Eventually), running a
// helper process a test needs and stopping it (Start), free loopback
// addresses (FreeAddr), a mirror configuration file (WriteConfig), a real S3 server (StartS3, versitygw) and running a
// test on every storage driver of the cache (ForEachDriver). Only tests
// import it.
package testsupport

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Until calls cond every interval until it returns true or timeout has
// passed, and reports whether it did. The caller fails with its own
// message: a bound, not a timing assertion.
func Until(timeout, interval time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(interval)
	}
	return true
}

// Eventually polls cond every 20 ms until it holds, and fails the test
// when timeout passes first, naming what it waited for.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	if !Until(timeout, 20*time.Millisecond, cond) {
		t.Fatalf("timed out after %v waiting for %s", timeout, what)
	}
}

// FreeAddr returns a loopback address ("127.0.0.1:port") with a port that
// was free a moment ago, for a server the test starts.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// WriteConfig writes yaml to mirror.yaml in a new temporary directory of
// the test and returns the file's path.
func WriteConfig(t testing.TB, yaml string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "mirror.yaml")
	if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// Process is a helper process started by Start.
type Process struct {
	Cmd  *exec.Cmd
	sig  os.Signal
	done chan struct{}
}

// Start starts cmd and stops it when the test ends (Stop). stop is the
// signal that asks it to end (os.Kill: kill it at once).
func Start(t testing.TB, cmd *exec.Cmd, stop os.Signal) (*Process, error) {
	t.Helper()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Process{Cmd: cmd, sig: stop, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(p.Stop)
	return p, nil
}

// Exited returns a channel closed once the process has ended.
func (p *Process) Exited() <-chan struct{} { return p.done }

// Stop sends the stop signal and waits up to 15 s for the process, then
// kills it. Stopping an ended process does nothing.
func (p *Process) Stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.Cmd.Process.Signal(p.sig)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		_ = p.Cmd.Process.Kill()
		<-p.done
	}
}

// Kill kills the process (kill -9) and waits for it.
func (p *Process) Kill() {
	_ = p.Cmd.Process.Kill()
	<-p.done
}
