package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/ngc-mirror/ngc-mirror/internal/access"
	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// TestServeStopsEveryGoroutine: serve runs its components (HTTPS, the TLS
// reloader and its SIGHUP handler, eviction, tracking, the scheduler,
// fills) until its context ends and returns only once each has, closing
// its upstream connections, those of a further upstream too, so no
// goroutine it started outlives it (goleak, checked while the upstreams
// still run; under -race in make test).
func TestServeStopsEveryGoroutine(t *testing.T) {
	up := ngctest.New(ngctest.Options{})
	defer up.Close() // after the check: its connections would end the mirror's
	fx, err := up.Populate(64 << 10)
	if err != nil {
		t.Fatal(err)
	}
	up2 := ngctest.New(ngctest.Options{})
	defer up2.Close()
	fx2, err := up2.Populate(64 << 10)
	if err != nil {
		t.Fatal(err)
	}
	cfgFile := testsupport.WriteConfig(t, "upstreams:\n  ghcr.example: {url: \""+up2.URL()+"\"}\n")
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	certFile, keyFile := selfSigned(t)
	addr := testsupport.FreeAddr(t)
	env := serveEnv(t, addr, up.URL())
	env["MIRROR_TLS_CERT_FILE"], env["MIRROR_TLS_KEY_FILE"] = certFile, keyFile
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := startServe(ctx, t, cfgFile, env)

	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}} // 127.0.0.1 only
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	waitHealthy(t, c, "https://"+addr)
	get := func(path string) {
		t.Helper()
		resp, err := c.Get("https://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if _, err := io.Copy(io.Discard, resp.Body); err != nil || resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d %v", path, resp.StatusCode, err)
		}
	}
	// A cold pull: upstream token, manifest, fills, eviction index, pull
	// history.
	get("/v2/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag)
	for _, b := range fx.CUDA.Blobs() {
		get("/v2/" + ngctest.CUDARepo + "/blobs/" + b.Digest.String())
	}
	// The same through the further upstream, by its prefix (public: it has
	// no credentials).
	get("/v2/ghcr.example/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag)
	for _, b := range fx2.CUDA.Blobs() {
		get("/v2/ghcr.example/" + ngctest.CUDARepo + "/blobs/" + b.Digest.String())
	}
	if n := up2.BlobFetches(fx2.CUDA.Layers[0].Digest); n != 1 {
		t.Fatalf("the further upstream served its layer %d times, want 1", n)
	}
	// /readyz reports every upstream by registry name; the further one
	// down leaves the mirror ready (its cache serves).
	up2.SetFault(ngctest.Offline)
	resp, err := c.Get("https://" + addr + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	var rep struct {
		Status    string
		Upstreams map[string]struct{ Status string }
	}
	err = json.NewDecoder(resp.Body).Decode(&rep)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || rep.Status != "ready" ||
		rep.Upstreams["nvcr.io"].Status != "ok" || rep.Upstreams["ghcr.example"].Status != "unreachable" {
		t.Fatalf("/readyz with the further upstream offline: %d %+v (%v)", resp.StatusCode, rep, err)
	}
	up2.SetFault(nil)
	tr.CloseIdleConnections()

	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("serve: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("serve did not return within a minute of its context ending")
	}
}

// selfSigned writes a certificate and key for 127.0.0.1.
func selfSigned(t *testing.T) (certFile, keyFile string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	for p, b := range map[string]*pem.Block{certFile: {Type: "CERTIFICATE", Bytes: der}, keyFile: {Type: "EC PRIVATE KEY", Bytes: keyDER}} {
		if err := os.WriteFile(p, pem.EncodeToMemory(b), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return certFile, keyFile
}

// TestPolicyOfFurtherUpstreams: a further upstream without credentials is
// public; one with credentials is not (it needs rules, like the private
// org), and in pass-through mode an NGC key never opens it.
func TestPolicyOfFurtherUpstreams(t *testing.T) {
	t.Parallel()
	cfgFile := testsupport.WriteConfig(t, `upstreams:
  docker.io: {url: "https://registry-1.docker.io"}
  ghcr.io: {url: "https://ghcr.io", username: bot, password: tok}
`)
	for _, mode := range []string{"none", "passthrough"} {
		cfg, err := config.Load(cfgFile, func(k string) string {
			return map[string]string{"MIRROR_ACCESS_MODE": mode}[k]
		})
		if err != nil {
			t.Fatal(err)
		}
		p, err := newPolicy(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Authorize(t.Context(), access.Identity{}, "docker.io/library/ubuntu"); err != nil {
			t.Errorf("%s: anonymous docker.io/library/ubuntu: %v", mode, err)
		}
		if err := p.Authorize(t.Context(), access.Identity{}, "nvidia/pytorch"); err != nil {
			t.Errorf("%s: anonymous nvidia/pytorch: %v", mode, err)
		}
		if err := p.Authorize(t.Context(), access.Identity{}, "ghcr.io/org/private"); err == nil {
			t.Errorf("%s: anonymous ghcr.io/org/private was allowed", mode)
		}
	}
}

// TestPolicyRulesWithDefaultRegistry: access rules and public namespaces
// written with nvcr.io/ in front (as a client names the image) apply to
// nvcr.io's repositories, which the mirror names bare: a rule for
// nvcr.io/myorg/** lets its user pull myorg/team/x and no one else.
func TestPolicyRulesWithDefaultRegistry(t *testing.T) {
	t.Parallel()
	cfgFile := testsupport.WriteConfig(t, `access:
  mode: htpasswd
  htpasswd_file: `+ngctest.WriteHtpasswd(t, "alice", "alice-pw", "bob", "bob-pw")+`
  public_namespaces: [nvcr.io/nvidia]
  rules:
    - {repositories: ["nvcr.io/myorg/**"], users: [alice]}
`)
	cfg, err := config.Load(cfgFile, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	p, err := newPolicy(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		user, repo string
		allowed    bool
	}{
		{"alice", "myorg/team/x", true},
		{"bob", "myorg/team/x", false},
		{"", "myorg/team/x", false},
		{"", "nvidia/pytorch", true},
	} {
		err := p.Authorize(t.Context(), access.Identity{User: c.user}, c.repo)
		if (err == nil) != c.allowed {
			t.Errorf("%q pulling %s: %v, want allowed %v", c.user, c.repo, err, c.allowed)
		}
	}
}
