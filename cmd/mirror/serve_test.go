package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
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

	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

// TestServeStopsEveryGoroutine: serve runs its components (HTTPS, the TLS
// reloader and its SIGHUP handler, eviction, tracking, the scheduler,
// fills) until its context ends and returns only once each has, closing
// its upstream connections, so no goroutine it started outlives it
// (goleak, checked while the upstream still runs; under -race in make
// test).
func TestServeStopsEveryGoroutine(t *testing.T) {
	up := ngctest.New(ngctest.Options{})
	defer up.Close() // after the check: its connections would end the mirror's
	fx, err := up.Populate(64 << 10)
	if err != nil {
		t.Fatal(err)
	}
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	certFile, keyFile := selfSigned(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	env := map[string]string{"MIRROR_ADDR": addr, "MIRROR_UPSTREAM": up.URL(), "MIRROR_DATA_DIR": t.TempDir(),
		"MIRROR_LOG_LEVEL": "error", "MIRROR_CACHE_MAX_SIZE": "1GiB",
		"MIRROR_TLS_CERT_FILE": certFile, "MIRROR_TLS_KEY_FILE": keyFile}
	cfg, err := config.Load("", func(k string) string { return env[k] })
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
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- serve(ctx, cfg, policy, rules) }()

	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}} // 127.0.0.1 only
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 30 * time.Second}
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
	for i := 0; ; i++ {
		resp, err := c.Get("https://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
			break
		}
		if i == 300 {
			t.Fatalf("serve did not listen: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// A cold pull: upstream token, manifest, fills, eviction index, pull
	// history.
	get("/v2/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag)
	for _, b := range fx.CUDA.Blobs() {
		get("/v2/" + ngctest.CUDARepo + "/blobs/" + b.Digest.String())
	}
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
