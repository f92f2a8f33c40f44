//go:build e2e

// Package e2e pulls images through the real mirror binary with real clients
// (skopeo, crane, a Docker daemon) from the NGC-like test upstream, all on
// loopback. Run with `go test -tags e2e ./test/e2e` (make test does). A
// missing client fails the test: .ci/install.sh installs them.
package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

var mirrorBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "ngc-mirror-e2e-")
	if err != nil {
		panic(err)
	}
	mirrorBin = filepath.Join(dir, "mirror")
	out, err := exec.Command("go", "build", "-o", mirrorBin, "github.com/ngc-mirror/ngc-mirror/cmd/mirror").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building the mirror: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed: run .ci/install.sh (this test never skips silently)", tool)
		}
	}
}

// mirror is a running mirror process.
type mirror struct {
	addr string
	log  *syncBuffer
	cmd  *exec.Cmd
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func freeAddr(t *testing.T) string { t.Helper(); return testsupport.FreeAddr(t) }

// startMirror runs the mirror binary against upstream with extra env.
func startMirror(t *testing.T, upstreamURL string, env ...string) *mirror {
	t.Helper()
	return startMirrorAt(t, upstreamURL, t.TempDir(), "", env...)
}

// startMirrorWithConfig runs the mirror with a YAML config file.
func startMirrorWithConfig(t *testing.T, upstreamURL, config string, env ...string) *mirror {
	t.Helper()
	return startMirrorAt(t, upstreamURL, t.TempDir(), config, env...)
}

// startMirrorAt runs the mirror with its cache in dataDir, and a config file
// unless config is "".
func startMirrorAt(t *testing.T, upstreamURL, dataDir, config string, env ...string) *mirror {
	t.Helper()
	m := &mirror{addr: freeAddr(t), log: &syncBuffer{}}
	args := []string{"serve"}
	if config != "" {
		args = append(args, "--config", config)
	}
	m.cmd = exec.Command(mirrorBin, args...)
	m.cmd.Env = append(os.Environ(),
		"MIRROR_ADDR="+m.addr,
		"MIRROR_UPSTREAM="+upstreamURL,
		"MIRROR_DATA_DIR="+dataDir,
		"MIRROR_LOG_LEVEL=debug",
	)
	m.cmd.Env = append(m.cmd.Env, env...)
	m.cmd.Stdout, m.cmd.Stderr = m.log, m.log
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = m.cmd.Process.Kill()
		_ = m.cmd.Wait()
		if t.Failed() {
			t.Logf("mirror log:\n%s", m.log.String())
		}
	})
	probe, scheme := http.DefaultClient, "http://"
	for _, e := range env {
		if strings.HasPrefix(e, "MIRROR_TLS_CERT_FILE=") {
			// Only to see that it listens; TestTLSPull checks the certificate.
			probe = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
			scheme = "https://"
		}
	}
	var err error
	if !testsupport.Until(15*time.Second, 50*time.Millisecond, func() bool {
		var resp *http.Response
		if resp, err = probe.Get(scheme + m.addr + "/healthz"); err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	}) {
		t.Fatalf("mirror did not start: %v\n%s", err, m.log.String())
	}
	return m
}

func newUpstream(t *testing.T) (*ngctest.Upstream, *ngctest.Fixture) {
	t.Helper()
	up := ngctest.New(ngctest.Options{})
	t.Cleanup(up.Close)
	fx, err := up.Populate(256 << 10)
	if err != nil {
		t.Fatal(err)
	}
	return up, fx
}

func run(t *testing.T, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// runStdin runs a command with stdin.
func runStdin(t *testing.T, stdin, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := run(t, 3*time.Minute, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func skopeoCopy(t *testing.T, src, dst string, extra ...string) (string, error) {
	args := append([]string{"--insecure-policy", "copy", "--all", "--retry-times", "0", "--src-tls-verify=false"}, extra...)
	args = append(args, "docker://"+src, "dir:"+dst)
	return run(t, 3*time.Minute, "skopeo", args...)
}

// sameTree fails unless the two directories hold the same files with the
// same bytes.
func sameTree(t *testing.T, a, b string) {
	t.Helper()
	read := func(root string) map[string][]byte {
		files := map[string][]byte{}
		_ = filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
			if err != nil || fi.IsDir() {
				return err
			}
			rel, _ := filepath.Rel(root, p)
			files[rel], err = os.ReadFile(p)
			return err
		})
		return files
	}
	fa, fb := read(a), read(b)
	if len(fa) == 0 || len(fa) != len(fb) {
		t.Fatalf("%s has %d files, %s has %d", a, len(fa), b, len(fb))
	}
	for k, v := range fa {
		if !bytes.Equal(v, fb[k]) {
			t.Fatalf("%s differs between %s and %s", k, a, b)
		}
	}
}

// TestSkopeoByteIdentical: skopeo copies a manifest list and a three-level
// OCI index through the mirror and straight from the upstream; the results
// are byte-identical. Then the upstream stops and the mirror still serves
// both, by tag and by digest.
func TestSkopeoByteIdentical(t *testing.T) {
	need(t, "skopeo")
	up, fx := newUpstream(t)
	m := startMirror(t, up.URL())
	upHost := up.Host()
	tmp := t.TempDir()
	images := []struct{ ref string }{
		{ngctest.PytorchRepo + ":" + ngctest.PytorchTag},
		{ngctest.DCGMRepo + ":" + ngctest.DCGMTag},
	}
	for i, im := range images {
		direct := filepath.Join(tmp, fmt.Sprintf("direct-%d", i))
		via := filepath.Join(tmp, fmt.Sprintf("mirror-%d", i))
		if out, err := skopeoCopy(t, upHost+"/"+im.ref, direct); err != nil {
			t.Fatalf("skopeo from upstream: %v\n%s", err, out)
		}
		if out, err := skopeoCopy(t, m.addr+"/"+im.ref, via); err != nil {
			t.Fatalf("skopeo through mirror: %v\n%s", err, out)
		}
		sameTree(t, direct, via)
	}
	for _, r := range up.CDNRequests() {
		if r.Auth != "" {
			t.Fatal("the mirror or skopeo sent Authorization to the CDN")
		}
	}

	up.Close()
	offline := []string{
		ngctest.PytorchRepo + ":" + ngctest.PytorchTag,
		ngctest.PytorchRepo + "@" + fx.Pytorch.Manifest.Digest.String(),
		ngctest.DCGMRepo + "@" + fx.DCGM.Manifest.Digest.String(),
	}
	for i, ref := range offline {
		dst := filepath.Join(tmp, fmt.Sprintf("offline-%d", i))
		if out, err := skopeoCopy(t, m.addr+"/"+ref, dst); err != nil {
			t.Fatalf("offline pull of %s: %v\n%s", ref, err, out)
		}
		want := filepath.Join(tmp, "mirror-0")
		if strings.HasPrefix(ref, ngctest.DCGMRepo) {
			want = filepath.Join(tmp, "mirror-1")
		}
		sameTree(t, want, dst)
	}
}

// TestCranePull: crane pulls the multi-arch image and a three-level name
// through the mirror in OCI layout; every blob matches the upstream's.
func TestCranePull(t *testing.T) {
	need(t, "crane")
	up, fx := newUpstream(t)
	m := startMirror(t, up.URL())
	for _, tc := range []struct {
		ref string
		im  *ngctest.Image
	}{
		{ngctest.PytorchRepo + ":" + ngctest.PytorchTag, fx.Pytorch},
		{ngctest.DCGMRepo + ":" + ngctest.DCGMTag, fx.DCGM},
	} {
		got := mustRun(t, "crane", "manifest", "--insecure", m.addr+"/"+tc.ref)
		if got != string(tc.im.Manifest.Body) {
			t.Fatalf("crane manifest %s differs from upstream", tc.ref)
		}
		dir := t.TempDir()
		mustRun(t, "crane", "pull", "--insecure", "--format=oci", m.addr+"/"+tc.ref, dir)
		for _, b := range tc.im.Blobs() {
			p := filepath.Join(dir, "blobs", "sha256", b.Digest.Encoded())
			data, err := os.ReadFile(p)
			if err != nil {
				t.Fatalf("crane pull lacks blob %s: %v", b.Digest, err)
			}
			if digest.FromBytes(data) != b.Digest {
				t.Fatalf("blob %s corrupt", b.Digest)
			}
		}
		mustRun(t, "crane", "validate", "--insecure", "--remote", m.addr+"/"+tc.ref)
	}
}

// TestDockerPull: a real Docker daemon pulls through the mirror and ends up
// with the image ID of the upstream's linux/amd64 image.
func TestDockerPull(t *testing.T) {
	need(t, "dockerd", "docker")
	up, fx := newUpstream(t)
	m := startMirror(t, up.URL())
	sock := startDockerd(t)
	ref := m.addr + "/" + ngctest.PytorchRepo + ":" + ngctest.PytorchTag
	out, err := run(t, 5*time.Minute, "docker", "-H", "unix://"+sock, "pull", ref)
	if err != nil {
		t.Fatalf("docker pull: %v\n%s", err, out)
	}
	id := strings.TrimSpace(mustRun(t, "docker", "-H", "unix://"+sock, "image", "inspect", "--format", "{{.Id}}", ref))
	want := fx.Pytorch.Child("linux/amd64").Config.Digest.String()
	if id != want {
		t.Fatalf("docker image ID %s, want %s", id, want)
	}
	// A three-level name, by digest.
	ref = m.addr + "/" + ngctest.DCGMRepo + "@" + fx.DCGM.Manifest.Digest.String()
	if out, err := run(t, 5*time.Minute, "docker", "-H", "unix://"+sock, "pull", ref); err != nil {
		t.Fatalf("docker pull %s: %v\n%s", ref, err, out)
	}
}

// startDockerd starts a private Docker daemon (no networking, vfs storage),
// with extra daemon flags, and returns its socket path. It fails loudly
// when the daemon cannot start.
func startDockerd(t *testing.T, extra ...string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the Docker daemon test must run as root")
	}
	dir, err := os.MkdirTemp("", "e2e-dockerd-")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "docker.sock")
	log := &syncBuffer{}
	cmd := exec.Command("dockerd",
		"--iptables=false", "--ip6tables=false", "--bridge=none",
		"--storage-driver=vfs",
		"--data-root", filepath.Join(dir, "data"),
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "docker.pid"),
		"-H", "unix://"+sock,
	)
	cmd.Args = append(cmd.Args, extra...)
	cmd.Stdout, cmd.Stderr = log, log
	t.Cleanup(func() { // after the daemon stopped (cleanups run last-registered first)
		_ = exec.Command("umount", "-R", filepath.Join(dir, "data")).Run()
		_ = os.RemoveAll(dir)
	})
	if _, err := testsupport.Start(t, cmd, os.Interrupt); err != nil {
		t.Fatalf("DOCKER DAEMON DID NOT START: %v", err)
	}
	var out []byte
	if !testsupport.Until(60*time.Second, 200*time.Millisecond, func() bool {
		out, err = exec.Command("docker", "-H", "unix://"+sock, "version").CombinedOutput()
		return err == nil
	}) {
		t.Fatalf("DOCKER DAEMON DID NOT START within 60 s: %v\n%s\ndaemon log:\n%s", err, out, log.String())
	}
	return sock
}

// cachePath is the file of spec in a filesystem cache in dataDir.
func cachePath(t *testing.T, dataDir string, spec storage.PathSpec) string {
	t.Helper()
	p, err := storage.Path(spec)
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dataDir, filepath.FromSlash(p))
}
