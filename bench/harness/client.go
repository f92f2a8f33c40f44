package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
)

// newClient returns an HTTP client for loopback benchmarking: keep-alive,
// no proxy, no compression. Every request also carries its own context
// deadline.
func newClient(conns int) *http.Client {
	return &http.Client{Transport: &http.Transport{
		Proxy:                 nil,
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:          conns * 2,
		MaxIdleConnsPerHost:   conns * 2,
		MaxConnsPerHost:       0,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: 2 * time.Minute,
		DisableCompression:    true,
		WriteBufferSize:       64 << 10,
		ReadBufferSize:        64 << 10,
	}}
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}

// fetchResult is one GET's outcome.
type fetchResult struct {
	bytes     int64
	header    time.Duration // until the response headers
	firstByte time.Duration // until the first body byte
	total     time.Duration
	// lastWait is how long the last byte came after all the others (when
	// wantSize is known): the mirror holds it back until the blob is
	// verified and committed.
	lastWait time.Duration
}

// fetch GETs url with a timeout, reads the whole body into a 1 MiB buffer
// (hashing it when want is set) and checks the status, the size (when
// wantSize >= 0) and the digest.
func fetch(ctx context.Context, c *http.Client, url string, hdr http.Header, timeout time.Duration, wantSize int64, want digest.Digest) (fetchResult, error) {
	var res fetchResult
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return res, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	start := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		return res, err
	}
	defer resp.Body.Close()
	res.header = time.Since(start)
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return res, fmt.Errorf("GET %s: %s: %s", url, resp.Status, body)
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var h hash.Hash
	if want != "" {
		h = sha256.New()
	}
	var penultimate time.Duration
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			if res.bytes == 0 {
				res.firstByte = time.Since(start)
			}
			res.bytes += int64(n)
			if penultimate == 0 && wantSize > 0 && res.bytes >= wantSize-1 {
				penultimate = time.Since(start)
			}
			if h != nil {
				h.Write(buf[:n])
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return res, fmt.Errorf("GET %s: after %d bytes: %w", url, res.bytes, rerr)
		}
	}
	res.total = time.Since(start)
	if penultimate > 0 {
		res.lastWait = res.total - penultimate
	}
	if wantSize >= 0 && res.bytes != wantSize {
		return res, fmt.Errorf("GET %s: got %d bytes, want %d", url, res.bytes, wantSize)
	}
	if h != nil && "sha256:"+hex.EncodeToString(h.Sum(nil)) != want.String() {
		return res, fmt.Errorf("GET %s: content does not match %s", url, want)
	}
	return res, nil
}

// pullImage pulls repo:tag from base like a client does: the manifest,
// then the config and layers, three blobs at a time (Docker's default
// max-concurrent-downloads). Sizes are always checked, digests when
// verify is set.
func pullImage(ctx context.Context, c *http.Client, base, repo, tag string, verify bool, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v2/"+repo+"/manifests/"+tag, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", manifestAccept)
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	resp.Body.Close()
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("manifest %s:%s: %s: %s", repo, tag, resp.Status, raw)
	}
	var m schema2Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return fmt.Errorf("manifest %s:%s: %w", repo, tag, err)
	}
	var refs []blobRef
	for _, b := range append([]descriptor{m.Config}, m.Layers...) {
		r := blobRef{url: base + "/v2/" + repo + "/blobs/" + b.Digest.String(), size: b.Size}
		if verify {
			r.want = b.Digest
		}
		refs = append(refs, r)
	}
	return getBlobs(ctx, c, refs, timeout)
}

// blobRef is one blob to GET: its URL, its size in bytes and, when it is
// to be checked, its digest.
type blobRef struct {
	url  string
	size int64
	want digest.Digest // "": not checked
}

// getBlobs GETs refs three at a time (Docker's default
// max-concurrent-downloads) and returns every failure joined.
func getBlobs(ctx context.Context, c *http.Client, refs []blobRef, timeout time.Duration) error {
	sem := make(chan struct{}, 3)
	errc := make(chan error, len(refs))
	var wg sync.WaitGroup
	for _, b := range refs {
		wg.Add(1)
		sem <- struct{}{}
		go func(b blobRef) {
			defer wg.Done()
			defer func() { <-sem }()
			_, err := fetch(ctx, c, b.url, nil, timeout, b.size, b.want)
			errc <- err
		}(b)
	}
	wg.Wait()
	close(errc)
	var errs []error
	for err := range errc {
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// concurrently runs f(i) for i in [0, n) together, released at once, and
// returns the wall time until the last one ended and the first error.
func concurrently(n int, f func(i int) error) (time.Duration, error) {
	var wg sync.WaitGroup
	gate := make(chan struct{})
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-gate
			errs[i] = f(i)
		}(i)
	}
	start := time.Now()
	close(gate)
	wg.Wait()
	wall := time.Since(start)
	var first error
	failed := 0
	for _, err := range errs {
		if err != nil {
			failed++
			if first == nil {
				first = err
			}
		}
	}
	if failed > 1 {
		first = fmt.Errorf("%w (and %d more failures)", first, failed-1)
	}
	return wall, first
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	idx := int(p/100*float64(len(s))+0.5) - 1
	idx = min(max(idx, 0), len(s)-1)
	return s[idx]
}
