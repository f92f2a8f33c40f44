package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is a server subprocess: the mirror, the peer registry, the static
// file server, case 6's S3 store (versitygw) and mirrors, or case 8's
// replicas, Redis and HAProxy.
type proc struct {
	name    string
	base    string // http://127.0.0.1:PORT
	logPath string
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// freeAddr returns a free 127.0.0.1 port (closed again: the child binds it).
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// baseEnv is a minimal environment for the children: no proxy settings,
// no NGC_API_KEY, no REGISTRY_* overrides from the caller's shell.
func baseEnv(extra ...string) []string {
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	return append(env, extra...)
}

// startProc starts bin with args and waits until GET <base><readyPath>
// answers 200.
func startProc(ctx context.Context, name, addr, readyPath, logPath, bin string, args, env []string) (*proc, error) {
	return startProcReady(ctx, name, addr, logPath, bin, args, env, readyPath,
		func(r *http.Response) bool { return r.StatusCode == http.StatusOK })
}

// startProcReady starts bin with args and waits until GET <base><readyPath>
// gets an answer that ready accepts.
func startProcReady(ctx context.Context, name, addr, logPath, bin string, args, env []string, readyPath string, ready func(*http.Response) bool) (*proc, error) {
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil}}
	return startProcProbe(ctx, name, addr, logPath, bin, args, env, func() bool {
		resp, err := c.Get("http://" + addr + readyPath)
		if err != nil {
			return false
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return ready(resp)
	})
}

// startProcListening starts bin with args and waits until addr accepts a
// TCP connection (a server that does not speak HTTP: redis-server).
func startProcListening(ctx context.Context, name, addr, logPath, bin string, args, env []string) (*proc, error) {
	return startProcProbe(ctx, name, addr, logPath, bin, args, env, func() bool {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return false
		}
		conn.Close()
		return true
	})
}

// startProcProbe starts bin with args, its output to logPath, and polls
// ready every 50 ms until it reports true (within 60 s) or the process
// exits.
func startProcProbe(ctx context.Context, name, addr, logPath, bin string, args, env []string, ready func() bool) (*proc, error) {
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = lf, lf
	// The children die with the harness even if it is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &proc{name: name, base: "http://" + addr, logPath: logPath, cmd: cmd, exited: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		lf.Close()
		close(p.exited)
	}()
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case <-p.exited:
			return nil, fmt.Errorf("%s exited before it was ready (%v):\n%s", name, p.waitErr, tail(logPath, 20))
		case <-ctx.Done():
			p.stop()
			return nil, ctx.Err()
		default:
		}
		if ready() {
			return p, nil
		}
		if time.Now().After(deadline) {
			p.stop()
			return nil, fmt.Errorf("%s not ready after 60 s:\n%s", name, tail(logPath, 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop ends the process: SIGTERM, then SIGKILL after 10 s.
func (p *proc) stop() {
	if p == nil {
		return
	}
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

func (p *proc) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

func tail(path string, n int) string {
	raw, err := os.ReadFile(path)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "  " + strings.Join(lines, "\n  ")
}

// peerConfig is a CNCF Distribution v3 configuration for a pull-through
// cache of upstream, as documented in configuration/configuration.go
// (Proxy: remoteurl) of v3.1.2. The access log is off and the blob
// descriptor cache is in memory, as in the project's example config.
func peerConfig(addr, root, upstream string) string {
	return fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  cache:
    blobdescriptor: inmemory
http:
  addr: %s
proxy:
  remoteurl: %s
`, root, addr, upstream)
}

// runStatic is the static file server baseline (-serve-static): Go's
// http.FileServer over dir, in its own process like the servers it is
// compared with.
func runStatic(dir, addr string) error {
	srv := &http.Server{
		Addr:              addr,
		Handler:           http.FileServer(http.Dir(dir)),
		ReadHeaderTimeout: 10 * time.Second,
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/v2/", func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("{}")) })
	mux.Handle("/", srv.Handler)
	srv.Handler = mux
	return srv.ListenAndServe()
}

// procStatusKB reads a "Key:   N kB" line of /proc/<pid>/status.
func procStatusKB(pid int, key string) (int64, error) {
	f, err := os.Open(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || k != key {
			continue
		}
		fields := strings.Fields(v)
		if len(fields) == 0 {
			break
		}
		return strconv.ParseInt(fields[0], 10, 64)
	}
	return 0, fmt.Errorf("%s not in /proc/%d/status", key, pid)
}

// resetPeakRSS resets the process's VmHWM to its current RSS
// (proc(5): writing 5 to /proc/<pid>/clear_refs).
func resetPeakRSS(pid int) error {
	return os.WriteFile(filepath.Join("/proc", strconv.Itoa(pid), "clear_refs"), []byte("5"), 0)
}

// rssSampler records the largest VmRSS seen, every 20 ms, as a cross-check
// of VmHWM (and a fallback where clear_refs is not allowed).
type rssSampler struct {
	pid  int
	stop chan struct{}
	done chan struct{}
	mu   sync.Mutex
	max  int64
}

func sampleRSS(pid int) *rssSampler {
	s := &rssSampler{pid: pid, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			if kb, err := procStatusKB(pid, "VmRSS"); err == nil {
				s.mu.Lock()
				s.max = max(s.max, kb)
				s.mu.Unlock()
			}
			select {
			case <-s.stop:
				return
			case <-t.C:
			}
		}
	}()
	return s
}

// end stops sampling and returns the largest VmRSS seen, in KiB.
func (s *rssSampler) end() int64 {
	close(s.stop)
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.max
}

// peakRSS measures a process's peak RSS (KiB) over f: VmHWM after a reset,
// and the sampled VmRSS maximum.
func peakRSS(pid int, f func() error) (hwm, sampled int64, err error) {
	resetErr := resetPeakRSS(pid)
	s := sampleRSS(pid)
	err = f()
	sampled = s.end()
	if resetErr != nil {
		return -1, sampled, err
	}
	hwm, herr := procStatusKB(pid, "VmHWM")
	if herr != nil {
		return -1, sampled, errors.Join(err, herr)
	}
	return hwm, sampled, err
}

// procIO is the storage I/O accounting of /proc/<pid>/io: bytes the process
// caused to be written to disk (write_bytes, counted when a page is
// dirtied) and dirty bytes dropped before writeback (cancelled_write_bytes:
// a file truncated or deleted first).
type procIO struct{ write, cancelled int64 }

func readProcIO(pid int) (procIO, error) {
	raw, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "io"))
	if err != nil {
		return procIO{}, err
	}
	var io procIO
	for _, l := range strings.Split(string(raw), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		switch k {
		case "write_bytes":
			io.write = n
		case "cancelled_write_bytes":
			io.cancelled = n
		}
	}
	return io, nil
}

// procCPU returns the CPU time (user + system) the process has used, from
// /proc/<pid>/stat (utime and stime, in USER_HZ = 100 ticks per second on
// Linux).
func procCPU(pid int) (time.Duration, error) {
	raw, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	i := strings.LastIndexByte(string(raw), ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(raw[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	// f[0] is field 3 (state): utime and stime are fields 14 and 15.
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(ut+st) * (time.Second / 100), nil
}
