package main

import (
	"context"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// The set-up the tests of this package share: `mirror serve` as a process
// of its own (mirrorProcess, startMirror) or in this one (serveEnv,
// startServe), and the wait for it to
// listen (waitHealthy).

// TestMain lets a test run this binary as the mirror command: with
// MIRROR_TEST_MAIN set to its arguments ("serve"), the re-executed test
// binary is `mirror serve` as main runs it, a process of its own.
func TestMain(m *testing.M) {
	if args := os.Getenv("MIRROR_TEST_MAIN"); args != "" {
		os.Args = append([]string{"mirror"}, strings.Fields(args)...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// mirrorProcess starts `mirror serve` as a process of its own with env
// (MIRROR_CONFIG among it) and returns it with its stderr.
func mirrorProcess(t *testing.T, env map[string]string) (*testsupport.Process, *lockedBuffer) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "MIRROR_TEST_MAIN=serve")
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	stderr := &lockedBuffer{}
	cmd.Stderr = stderr
	p, err := testsupport.Start(t, cmd, os.Interrupt)
	if err != nil {
		t.Fatal(err)
	}
	return p, stderr
}

// startMirror starts `mirror serve` as a process of its own
// (mirrorProcess) in front of upstream and waits until it answers
// /healthz. Its environment is env over defaults: a free loopback
// MIRROR_ADDR, no configuration file (MIRROR_CONFIG "") and a data
// directory of its own. It returns the process, its base URL
// ("http://127.0.0.1:port") and its stderr.
func startMirror(t *testing.T, upstream string, env map[string]string) (*testsupport.Process, string, *lockedBuffer) {
	t.Helper()
	full := map[string]string{"MIRROR_ADDR": testsupport.FreeAddr(t), "MIRROR_CONFIG": "", "MIRROR_UPSTREAM": upstream,
		"MIRROR_DATA_DIR": t.TempDir()}
	maps.Copy(full, env)
	p, stderr := mirrorProcess(t, full)
	base := "http://" + full["MIRROR_ADDR"]
	c := &http.Client{Timeout: 30 * time.Second}
	defer c.CloseIdleConnections()
	waitHealthy(t, c, base)
	return p, base, stderr
}

// serveEnv is the environment of a plain mirror on addr in front of
// upstream, with its own data directory, quiet logs and a cache budget
// (so that eviction runs); tests add to it.
func serveEnv(t *testing.T, addr, upstream string) map[string]string {
	return map[string]string{"MIRROR_ADDR": addr, "MIRROR_UPSTREAM": upstream, "MIRROR_DATA_DIR": t.TempDir(),
		"MIRROR_LOG_LEVEL": "error", "MIRROR_CACHE_MAX_SIZE": "1GiB"}
}

// startServe loads the configuration as `mirror serve` does, from cfgFile
// ("" for none) and env (the only environment it sees), and runs serve
// until ctx ends; the channel gets serve's result.
func startServe(ctx context.Context, t *testing.T, cfgFile string, env map[string]string) <-chan error {
	t.Helper()
	cfg, err := config.Load(cfgFile, func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	policy, err := newPolicy(cfg)
	if err != nil {
		t.Fatal(err)
	}
	rules, err := compileRules(cfg)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- serve(ctx, cfg, policy, rules) }()
	return errc
}

// waitHealthy waits (30 s at most) until base ("http://127.0.0.1:port")
// answers /healthz.
func waitHealthy(t *testing.T, c *http.Client, base string) {
	t.Helper()
	testsupport.Eventually(t, 30*time.Second, "the mirror at "+base+" to listen", func() bool {
		resp, err := c.Get(base + "/healthz")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil
	})
}
