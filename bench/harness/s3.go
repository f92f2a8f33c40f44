package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// ---------------------------------------------------------------------------
// Case 6: cache-hit throughput with the cache on S3 (versitygw on loopback):
// the mirror proxying the bytes (redirect off), the mirror answering 307 to
// a presigned URL that the client follows (redirect on), and, as the
// baseline, direct GETs of the same object from the store.

// Credentials of the benchmark's store (not secrets: it lives for one run,
// on loopback).
const (
	s3AccessKey = "ngcmirrorbench"
	s3SecretKey = "ngcmirrorbench-secret-0123456789"
	s3Bucket    = "registry"
	s3Region    = "us-east-1"
)

// s3Env is the environment (KEY=value) that puts a mirror's cache in the
// benchmark's bucket on the versitygw at endpoint ("http://127.0.0.1:port",
// startGateway's), path-style; redirect is off unless the caller adds
// MIRROR_S3_REDIRECT=true.
func s3Env(endpoint string) []string {
	return []string{"MIRROR_STORAGE_DRIVER=s3", "MIRROR_S3_BUCKET=" + s3Bucket, "MIRROR_S3_REGION=" + s3Region,
		"MIRROR_S3_ENDPOINT=" + endpoint, "MIRROR_S3_PATH_STYLE=true",
		"MIRROR_S3_ACCESS_KEY=" + s3AccessKey, "MIRROR_S3_SECRET_KEY=" + s3SecretKey}
}

// startS3 starts versitygw (posix backend, data under the work dir), creates
// the bucket, and starts two mirrors on it: redirect off and redirect on.
// Each has its own data dir (the spool of running fills); the cache is the
// bucket they share.
func (h *harness) startS3(ctx context.Context) error {
	if h.cfg.versitygwBin == "" {
		if _, err := exec.LookPath("versitygw"); err != nil {
			return errors.New("versitygw is not installed (not on PATH; -versitygw BIN names it)")
		}
	}
	root := filepath.Join(h.cfg.work, "versitygw-data")
	var err error
	if h.s3gw, err = h.startGateway(ctx, "versitygw", root); err != nil {
		return err
	}
	logf("versitygw: %s (pid %d), posix backend in %s", h.s3gw.base, h.s3gw.pid(), root)
	for _, m := range []struct {
		p        **proc
		name     string
		redirect bool
	}{{&h.s3proxied, "mirror-s3", false}, {&h.s3redirect, "mirror-s3-redirect", true}} {
		data := filepath.Join(h.cfg.work, m.name+"-data")
		if err := os.MkdirAll(data, 0o750); err != nil {
			return err
		}
		addr, err := freeAddr()
		if err != nil {
			return err
		}
		*m.p, err = startProc(ctx, m.name, addr, "/v2/", filepath.Join(h.cfg.work, m.name+".log"), h.cfg.mirrorBin,
			[]string{"serve"}, baseEnv(append(s3Env(h.s3gw.base),
				"MIRROR_ADDR="+addr,
				"MIRROR_UPSTREAM="+h.up.URL(),
				"MIRROR_DATA_DIR="+data,
				"MIRROR_LOG_LEVEL=warn",
				fmt.Sprintf("MIRROR_S3_REDIRECT=%t", m.redirect),
			)...))
		if err != nil {
			return err
		}
		logf("%s: %s (pid %d), redirect %t", m.name, (*m.p).base, (*m.p).pid(), m.redirect)
	}
	return nil
}

// location GETs url without following a redirect and returns the 307's
// Location.
func location(ctx context.Context, url string) (string, error) {
	c := newClient(1)
	defer c.CloseIdleConnections()
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	resp.Body.Close()
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusTemporaryRedirect || loc == "" {
		return "", fmt.Errorf("GET %s: %s, not a 307 with a Location: %.200s", url, resp.Status, body)
	}
	return loc, nil
}

// firstByte GETs url (following redirects) and returns the time until the
// first body byte; the rest of the body is not read.
func firstByte(ctx context.Context, c *http.Client, url string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("GET: %s", resp.Status)
	}
	var b [1]byte
	if _, err := io.ReadFull(resp.Body, b[:]); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

func (h *harness) case6(ctx context.Context) error {
	const repo = "nvidia/bench/s3-hit"
	sz := h.cfg.s3BlobSize
	if err := h.startS3(ctx); err != nil {
		h.add(row{Case: "6", Measure: "S3 cache-hit throughput", Mirror: "n/a", Target: "report", Verdict: "—"})
		return err
	}
	t0 := time.Now()
	b := makeBlobs(6000, 1, sz, "application/octet-stream")[0]
	h.up.AddBlob(repo, b)
	defer h.up.RemoveBlob(b.Digest)
	logf("case 6: generated 1 × %s in %s", fmtBytes(sz), time.Since(t0).Round(time.Millisecond))

	path := "/v2/" + repo + "/blobs/" + b.Digest.String()
	// Warm the bucket through the redirect-off mirror (a cold fill from the
	// fake upstream, committed to S3), then check that both mirrors now
	// answer from the bucket: the proxied one with the right bytes, the
	// redirect one with a 307 whose target has them too.
	t0 = time.Now()
	if _, err := fetch(ctx, newClient(1), h.s3proxied.base+path, nil, 10*time.Minute, sz, b.Digest); err != nil {
		return fmt.Errorf("warming the S3 cache: %w", err)
	}
	logf("case 6: cold fill into S3 in %s", time.Since(t0).Round(time.Millisecond))
	var loc string
	var err error
	// The fill's client gets its last byte once the blob is verified; the
	// commit to S3 follows. Until then a GET joins the fill (200, no
	// redirect): wait for the 307.
	for deadline := time.Now().Add(2 * time.Minute); ; {
		if loc, err = location(ctx, h.s3redirect.base+path); err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("the redirect mirror does not redirect: %w", err)
	}
	if !strings.HasPrefix(loc, h.s3gw.base+"/") {
		return fmt.Errorf("the redirect goes to %.60s..., not to versitygw at %s", loc, h.s3gw.base)
	}
	for _, u := range []string{h.s3proxied.base + path, h.s3redirect.base + path, loc} {
		if _, err := fetch(ctx, newClient(1), u, nil, 10*time.Minute, sz, b.Digest); err != nil {
			return fmt.Errorf("checking the cached blob: %w", err)
		}
	}
	before := len(h.up.Requests())

	// The baseline is the presigned URL itself (valid 20 minutes, well
	// beyond this case): the store's own GET path, no mirror in between.
	targets := []struct{ name, url string }{
		{"direct", loc},
		{"proxied", h.s3proxied.base + path},
		{"redirect", h.s3redirect.base + path},
	}
	var errs []error
	// CPU time of the mirror on each path while that path is measured (each
	// mirror is idle otherwise). versitygw's is not split by path: with the
	// paths interleaved, its deferred work (GC) lands in the next path's
	// window.
	cpuProcs := map[string]*proc{"proxied": h.s3proxied, "redirect": h.s3redirect}
	cpuOf := func(p *proc) time.Duration {
		if p == nil {
			return 0
		}
		d, err := procCPU(p.pid())
		if err != nil {
			return 0
		}
		return d
	}
	for _, n := range []int{1, h.cfg.clients} {
		rates := map[string][]float64{}
		mirrorCPU, served := map[string]time.Duration{}, map[string]int64{}
		for rep := 0; rep < h.cfg.reps; rep++ {
			// Interleaved, so that drift hits all alike, and rotated, so
			// that no path always runs first.
			for i := range targets {
				t := targets[(i+rep)%len(targets)]
				c := newClient(n)
				m0 := cpuOf(cpuProcs[t.name])
				wall, err := concurrently(n, func(int) error {
					_, err := fetch(ctx, c, t.url, nil, 10*time.Minute, sz, "")
					return err
				})
				c.CloseIdleConnections()
				if err != nil {
					errs = append(errs, fmt.Errorf("%s, %d clients: %w", t.name, n, err))
					continue
				}
				mirrorCPU[t.name] += cpuOf(cpuProcs[t.name]) - m0
				served[t.name] += sz * int64(n)
				rates[t.name] = append(rates[t.name], float64(sz)*float64(n)/mib/wall.Seconds())
			}
		}
		d, p, r := median(rates["direct"]), median(rates["proxied"]), median(rates["redirect"])
		logf("case 6: %d client(s): direct %.0f, proxied %.0f, redirect %.0f MiB/s (medians of %d)", n, d, p, r, h.cfg.reps)
		f := func(x float64) string {
			if x <= 0 {
				return "n/a"
			}
			return fmt.Sprintf("%.0f MiB/s", x)
		}
		ratio := func(x float64) string {
			if x <= 0 || d <= 0 {
				return "n/a"
			}
			return fmt.Sprintf("%.2fx direct S3", x/d)
		}
		h.add(row{Case: "6", Measure: fmt.Sprintf("S3 cache-hit %s blob, %d client(s), aggregate, proxied (redirect off)", fmtBytes(sz), n),
			Static: f(d), Mirror: f(p), Ratio: ratio(p), Target: "report", Verdict: "—"})
		h.add(row{Case: "6", Measure: fmt.Sprintf("S3 cache-hit %s blob, %d client(s), aggregate, redirect on (307 followed)", fmtBytes(sz), n),
			Static: f(d), Mirror: f(r), Ratio: ratio(r), Target: "report", Verdict: "—"})
		perGiB := func(name string) string {
			if served[name] == 0 {
				return "n/a"
			}
			return fmt.Sprintf("%.2f", mirrorCPU[name].Seconds()/(float64(served[name])/(1<<30)))
		}
		h.add(row{Case: "6", Measure: fmt.Sprintf("%d client(s): mirror CPU seconds per GiB served", n),
			Mirror: "proxied " + perGiB("proxied") + "; redirect " + perGiB("redirect"), Target: "report", Verdict: "—"})
	}

	// Time to first byte: one client, a connection kept between samples
	// where the server allows it (the body is not read to the end, so the
	// connection that carried it is closed).
	k := max(h.cfg.ttfbSamples, 1)
	ttfb := map[string][]float64{}
	clients := map[string]*http.Client{}
	for _, t := range targets {
		clients[t.name] = newClient(2)
	}
	for i := 0; i <= k; i++ {
		for _, t := range targets {
			d, err := firstByte(ctx, clients[t.name], t.url)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s, first byte: %w", t.name, err))
				continue
			}
			if i > 0 { // the first round warms up
				ttfb[t.name] = append(ttfb[t.name], msf(d))
			}
		}
	}
	for _, c := range clients {
		c.CloseIdleConnections()
	}
	cell := func(name string) string {
		if len(ttfb[name]) == 0 {
			return "n/a"
		}
		return fmt.Sprintf("%.1f ms (max %.1f)", median(ttfb[name]), maxf(ttfb[name]))
	}
	diff := func(name string) string {
		if len(ttfb[name]) == 0 || len(ttfb["direct"]) == 0 {
			return "n/a"
		}
		return fmt.Sprintf("+%.1f ms vs direct S3", median(ttfb[name])-median(ttfb["direct"]))
	}
	h.add(row{Case: "6", Measure: fmt.Sprintf("S3 cache-hit TTFB, median of %d, proxied (redirect off)", k), Static: cell("direct"), Mirror: cell("proxied"), Ratio: diff("proxied"), Target: "report", Verdict: "—"})
	h.add(row{Case: "6", Measure: fmt.Sprintf("S3 cache-hit TTFB, median of %d, redirect on (307 followed)", k), Static: cell("direct"), Mirror: cell("redirect"), Ratio: diff("redirect"), Target: "report", Verdict: "—"})
	logf("case 6: TTFB direct %s, proxied %s, redirect %s", cell("direct"), cell("proxied"), cell("redirect"))

	if reqs := h.up.Requests()[before:]; len(reqs) > 0 {
		h.note("Case 6: the cache-hit runs sent the upstream %s.", breakdown(reqs))
	}
	h.note("Case 6: the cache is a bucket on versitygw (posix backend, --keep-alive, on this machine's disk), shared by two mirrors: redirect off (the mirror reads the object from S3 and streams it) and redirect on (307 to a presigned URL, which the client follows). The static column is the baseline: GETs of that presigned URL straight from versitygw. Medians of %d runs, interleaved direct/proxied/redirect (the order rotated each repetition); each run opens new connections. TTFB: %d whole-blob GETs per path after one warm-up, first body byte.", h.cfg.reps, k)
	return errors.Join(errs...)
}
