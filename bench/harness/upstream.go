package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

// innerHeader marks a CDN request that the meter already wrapped, so that
// re-entering the fake's own handler does not wrap it again.
const innerHeader = "X-Bench-Metered"

// meter sits in front of the fake's CDN (through ngctest's fault hook): it
// counts the blob bytes the CDN writes, per digest, and when a limiter is
// set it paces them through that shared token bucket, as one uplink would.
// The fake's own handler still answers (signature, expiry, Range).
type meter struct {
	up *ngctest.Upstream

	mu    sync.Mutex
	bytes map[string]int64 // digest → body bytes written by the CDN

	lim atomic.Pointer[limiter]
}

func newMeter(up *ngctest.Upstream) *meter {
	m := &meter{up: up, bytes: map[string]int64{}}
	up.SetFault(m.fault)
	return m
}

func (m *meter) fault(w http.ResponseWriter, r *http.Request) bool {
	if !m.up.IsCDN(r) || r.Header.Get(innerHeader) != "" {
		return false
	}
	r.Header.Set(innerHeader, "1")
	mw := &meteredWriter{
		ResponseWriter: w,
		m:              m,
		dgst:           strings.TrimPrefix(r.URL.Path, "/blobs/"),
		lim:            m.lim.Load(),
		ctx:            r.Context(),
	}
	m.up.CDN.Config.Handler.ServeHTTP(mw, r)
	return true
}

// setRate paces all CDN bodies together at bytesPerSec (0: unlimited).
func (m *meter) setRate(bytesPerSec float64) {
	if bytesPerSec <= 0 {
		m.lim.Store(nil)
		return
	}
	m.lim.Store(&limiter{rate: bytesPerSec, burst: 20 * time.Millisecond})
}

func (m *meter) add(d string, n int) {
	m.mu.Lock()
	m.bytes[d] += int64(n)
	m.mu.Unlock()
}

// sum returns the CDN body bytes written so far for the digests ds.
func (m *meter) sum(ds []digest.Digest) int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var n int64
	for _, d := range ds {
		n += m.bytes[d.String()]
	}
	return n
}

type meteredWriter struct {
	http.ResponseWriter
	m    *meter
	dgst string
	lim  *limiter
	ctx  context.Context
}

func (w *meteredWriter) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), 64<<10)]
		if w.lim != nil {
			if err := w.lim.wait(w.ctx, len(chunk)); err != nil {
				return written, err
			}
		}
		n, err := w.ResponseWriter.Write(chunk)
		written += n
		w.m.add(w.dgst, n)
		if err != nil {
			return written, err
		}
		p = p[n:]
	}
	return written, nil
}

func (w *meteredWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// limiter is a token bucket on a virtual clock: each chunk reserves its
// transmission time after the previous reservations; a sender sleeps until
// its reservation ends. Oversleeping is compensated (the clock is virtual)
// up to burst.
type limiter struct {
	rate  float64 // bytes per second
	burst time.Duration

	mu   sync.Mutex
	next time.Time
}

func (l *limiter) wait(ctx context.Context, n int) error {
	l.mu.Lock()
	now := time.Now()
	if floor := now.Add(-l.burst); l.next.Before(floor) {
		l.next = floor
	}
	l.next = l.next.Add(time.Duration(float64(n) / l.rate * float64(time.Second)))
	until := l.next
	l.mu.Unlock()
	d := time.Until(until)
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// genBlob returns size bytes from a fast deterministic PRNG (splitmix64)
// seeded by seed, filled in parallel; its content is incompressible and
// distinct per seed.
func genBlob(seed uint64, size int64) []byte {
	b := make([]byte, size)
	const chunk = 16 << 20
	var wg sync.WaitGroup
	sem := make(chan struct{}, runtime.GOMAXPROCS(0))
	for off := int64(0); off < size; off += chunk {
		end := min(off+chunk, size)
		wg.Add(1)
		sem <- struct{}{}
		go func(p []byte, s uint64) {
			defer wg.Done()
			fillPRNG(p, s)
			<-sem
		}(b[off:end], seed*0x9e3779b97f4a7c15^uint64(off/chunk+1)*0xd1b54a32d192ed03)
	}
	wg.Wait()
	return b
}

func fillPRNG(p []byte, s uint64) {
	next := func() uint64 {
		s += 0x9e3779b97f4a7c15
		z := s
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
		z = (z ^ (z >> 27)) * 0x94d049bb133111eb
		return z ^ (z >> 31)
	}
	i := 0
	for ; i+8 <= len(p); i += 8 {
		binary.LittleEndian.PutUint64(p[i:i+8], next())
	}
	if i < len(p) {
		var tail [8]byte
		binary.LittleEndian.PutUint64(tail[:], next())
		copy(p[i:], tail[:])
	}
}

// makeBlobs generates n blobs of size bytes (seeds seed, seed+1, …) and
// their digests, hashing them in parallel.
func makeBlobs(seed uint64, n int, size int64, mediaType string) []ngctest.Content {
	out := make([]ngctest.Content, n)
	for i := range out {
		out[i] = ngctest.Content{MediaType: mediaType, Body: genBlob(seed+uint64(i), size)}
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, runtime.GOMAXPROCS(0))
	for i := range out {
		wg.Add(1)
		sem <- struct{}{}
		go func(c *ngctest.Content) {
			defer wg.Done()
			c.Digest = digest.FromBytes(c.Body)
			<-sem
		}(&out[i])
	}
	wg.Wait()
	return out
}

const (
	mtSchema2Manifest = "application/vnd.docker.distribution.manifest.v2+json"
	mtSchema2Config   = "application/vnd.docker.container.image.v1+json"
	mtSchema2Layer    = "application/vnd.docker.image.rootfs.diff.tar.gzip"
)

var manifestAccept = strings.Join([]string{
	"application/vnd.oci.image.index.v1+json",
	"application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.oci.image.manifest.v1+json",
	mtSchema2Manifest,
}, ", ")

type descriptor struct {
	MediaType string        `json:"mediaType"`
	Size      int64         `json:"size"`
	Digest    digest.Digest `json:"digest"`
}

type schema2Manifest struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Config        descriptor   `json:"config"`
	Layers        []descriptor `json:"layers"`
}

// benchImage builds a Docker schema2 image from layer blobs. The layers are
// PRNG bytes, not tar+gzip: only registries read them here, never a
// container runtime, and neither the mirror nor the peer looks inside.
func benchImage(layers []ngctest.Content) *ngctest.Image {
	cfg := map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"config":       map[string]any{"Cmd": []string{"/bin/sh"}},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": digestsOf(layers)},
	}
	cfgRaw, _ := json.Marshal(cfg)
	config := ngctest.Content{MediaType: mtSchema2Config, Digest: digest.FromBytes(cfgRaw), Body: cfgRaw}
	m := schema2Manifest{
		SchemaVersion: 2,
		MediaType:     mtSchema2Manifest,
		Config:        descriptor{MediaType: config.MediaType, Size: int64(len(cfgRaw)), Digest: config.Digest},
	}
	for _, l := range layers {
		m.Layers = append(m.Layers, descriptor{MediaType: mtSchema2Layer, Size: int64(len(l.Body)), Digest: l.Digest})
	}
	raw, _ := json.MarshalIndent(m, "", "   ")
	return &ngctest.Image{
		Manifest: ngctest.Content{MediaType: mtSchema2Manifest, Digest: digest.FromBytes(raw), Body: raw},
		Config:   config,
		Layers:   layers,
		Platform: "linux/amd64",
	}
}

func digestsOf(cs []ngctest.Content) []digest.Digest {
	out := make([]digest.Digest, len(cs))
	for i, c := range cs {
		out[i] = c.Digest
	}
	return out
}

// imageSize is the bytes of an image's blobs (config and layers), what a
// pull must fetch from the upstream besides the manifest.
func imageSize(im *ngctest.Image) int64 {
	var n int64
	for _, b := range im.Blobs() {
		n += int64(len(b.Body))
	}
	return n
}
