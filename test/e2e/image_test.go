//go:build e2e

package e2e

import (
	"archive/tar"
	"bytes"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// baseImageTar writes a minimal root filesystem for the image's base: the
// host's CA certificates, the distroless "nonroot" user (65532) and /tmp.
// No registry is reachable in the tests, so the base is made here and
// loaded with docker import.
func baseImageTar(t *testing.T) string {
	t.Helper()
	certs, err := os.ReadFile("/etc/ssl/certs/ca-certificates.crt")
	if err != nil {
		t.Fatalf("the host's CA certificates (Debian's ca-certificates): %v", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	now := time.Now()
	for _, d := range []struct {
		name string
		mode int64
	}{{"etc/", 0o755}, {"etc/ssl/", 0o755}, {"etc/ssl/certs/", 0o755}, {"tmp/", 0o1777}} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d.name, Mode: d.mode, ModTime: now}); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []struct {
		name string
		body []byte
	}{
		{"etc/ssl/certs/ca-certificates.crt", certs},
		{"etc/passwd", []byte("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")},
		{"etc/group", []byte("root:x:0:\nnonroot:x:65532:\n")},
	} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: 0o644, Size: int64(len(f.body)), ModTime: now}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(f.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "base.tar")
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// copyFile copies the repository file rel into dir under the same name.
func copyFile(t *testing.T, dir, rel string) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", rel))
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestDockerImage builds the repository's Dockerfile with a real Docker
// daemon (its "prebuilt" target: a static binary built here, on a base
// image made locally), runs the image with a named volume for the cache,
// and pulls through it with that daemon.
func TestDockerImage(t *testing.T) {
	need(t, "dockerd", "docker")
	up, fx := newUpstream(t)
	sock := startDockerd(t)
	docker := func(args ...string) string {
		t.Helper()
		out, err := run(t, 5*time.Minute, "docker", append([]string{"-H", "unix://" + sock}, args...)...)
		if err != nil {
			t.Fatalf("docker %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(out)
	}

	ctxDir := t.TempDir()
	copyFile(t, ctxDir, "Dockerfile")
	copyFile(t, ctxDir, "configs/mirror.yaml")
	build := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(ctxDir, "bin", "mirror"), "github.com/ngc-mirror/ngc-mirror/cmd/mirror")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the static binary: %v\n%s", err, out)
	}
	docker("import", baseImageTar(t), "ngc-mirror-e2e-base:local")
	docker("build", "--target", "prebuilt", "--build-arg", "BASE=ngc-mirror-e2e-base:local", "-t", "ngc-mirror:e2e", ctxDir)
	if user := docker("image", "inspect", "--format", "{{.Config.User}}", "ngc-mirror:e2e"); user != "65532:65532" {
		t.Errorf("image user %q, want the non-root 65532:65532", user)
	}

	addr := freeAddr(t)
	docker("run", "-d", "--name", "mirror", "--network", "host", "-v", "ngc-cache:/data",
		"-e", "MIRROR_ADDR="+addr, "-e", "MIRROR_UPSTREAM="+up.URL(), "ngc-mirror:e2e")
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := run(t, time.Minute, "docker", "-H", "unix://"+sock, "logs", "mirror")
			t.Logf("mirror container log:\n%s", out)
		}
	})
	var err error
	if !testsupport.Until(60*time.Second, 200*time.Millisecond, func() bool {
		resp, rerr := http.Get("http://" + addr + "/readyz")
		if err = rerr; err != nil {
			return false
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			err = &httpStatusError{resp.StatusCode, string(body)}
		}
		return err == nil
	}) {
		t.Fatalf("the mirror container is not ready: %v (state %s)", err, docker("inspect", "--format", "{{.State.Status}}", "mirror"))
	}

	ref := addr + "/" + ngctest.PytorchRepo + ":" + ngctest.PytorchTag
	docker("pull", ref)
	want := fx.Pytorch.Child("linux/amd64").Config.Digest.String()
	if id := docker("image", "inspect", "--format", "{{.Id}}", ref); id != want {
		t.Fatalf("docker image ID %s, want %s", id, want)
	}
	// The cache in the volume (written by the non-root user) serves a
	// second pull without the upstream.
	blobs := fx.Pytorch.Child("linux/amd64").Blobs()
	before := map[string]int{}
	for _, b := range blobs {
		before[b.Digest.String()] = up.BlobFetches(b.Digest)
	}
	docker("rmi", ref)
	docker("pull", ref)
	for _, b := range blobs {
		if n := up.BlobFetches(b.Digest); n != before[b.Digest.String()] || n != 1 {
			t.Errorf("blob %s fetched from the upstream %d times (%d before the second pull); want once: the volume keeps the cache", b.Digest, n, before[b.Digest.String()])
		}
	}
}

type httpStatusError struct {
	status int
	body   string
}

func (e *httpStatusError) Error() string { return http.StatusText(e.status) + ": " + e.body }
