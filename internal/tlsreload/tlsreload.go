// Package tlsreload serves a TLS certificate that is reloaded from its files
// when they change or when asked (SIGHUP), without dropping connections:
// handshakes after a reload get the new certificate, open connections keep
// theirs.
package tlsreload

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// Reloader holds the current certificate of a cert/key file pair.
type Reloader struct {
	certFile, keyFile string
	log               *slog.Logger

	mu      sync.RWMutex
	cert    *tls.Certificate
	modTime time.Time
}

// New loads the pair once; an unreadable or invalid pair is an error.
func New(certFile, keyFile string, log *slog.Logger) (*Reloader, error) {
	r := &Reloader{certFile: certFile, keyFile: keyFile, log: log}
	if err := r.Reload(); err != nil {
		return nil, err
	}
	return r, nil
}

// Reload reads the pair again. On error the previous certificate stays.
func (r *Reloader) Reload() error {
	cert, err := tls.LoadX509KeyPair(r.certFile, r.keyFile)
	if err != nil {
		return fmt.Errorf("tls: loading %s and %s: %w", r.certFile, r.keyFile, err)
	}
	mt := r.latestModTime()
	r.mu.Lock()
	r.cert, r.modTime = &cert, mt
	r.mu.Unlock()
	return nil
}

func (r *Reloader) latestModTime() time.Time {
	var latest time.Time
	for _, f := range []string{r.certFile, r.keyFile} {
		if fi, err := os.Stat(f); err == nil && fi.ModTime().After(latest) {
			latest = fi.ModTime()
		}
	}
	return latest
}

// GetCertificate is for tls.Config.GetCertificate.
func (r *Reloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.cert, nil
}

// Watch reloads the pair when either file's modification time changes,
// checking every interval, until ctx ends.
func (r *Reloader) Watch(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.mu.RLock()
		seen := r.modTime
		r.mu.RUnlock()
		if mt := r.latestModTime(); mt.After(seen) {
			if err := r.Reload(); err != nil {
				r.log.Warn("TLS certificate changed but could not be loaded; keeping the old one", "err", err)
			} else {
				r.log.Info("TLS certificate reloaded")
			}
		}
	}
}

// Config returns a server TLS configuration (TLS 1.2 or later) that serves
// the current certificate. net/http adds HTTP/2 to it.
func (r *Reloader) Config() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: r.GetCertificate}
}
