// Command harness is ngc-mirror's benchmark suite (issue 3). It starts the
// NGC-like upstream (internal/ngctest) in-process, the mirror binary, CNCF
// Distribution in proxy mode (the peer) and a static file server (the
// physical limit) as subprocesses on 127.0.0.1, runs the cases side by side
// and prints a markdown table with ratios. See bench/README.md.
//
//	harness -mirror BIN [-peer BIN] [-cases 1,2,3,4,5,6] [-blob-size 1GiB] ...
//
// It never fails because a target was missed; it exits non-zero only when it
// cannot set up (a server does not start).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

// size is a byte count flag that accepts KiB, MiB and GiB suffixes.
type size int64

func (s *size) String() string { return fmtBytes(int64(*s)) }
func (s *size) Set(v string) error {
	mult := int64(1)
	for suf, m := range map[string]int64{"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30} {
		if n, ok := strings.CutSuffix(v, suf); ok && (len(suf) == 3 || !strings.HasSuffix(n, "i")) {
			v, mult = n, m
			break
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
	if err != nil || n < 0 {
		return fmt.Errorf("not a size: %q", v)
	}
	*s = size(n * mult)
	return nil
}

func fmtBytes(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%dGiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return strconv.FormatInt(n, 10)
}

type config struct {
	mirrorBin, peerBin string
	work               string
	keep               bool
	peerFirst          bool
	cases              map[int]bool
	out                string

	blobSize    int64 // cases 1 and 4
	smallSize   int64 // case 4's second size (0: skip)
	case4Rounds int   // case 4: cold rounds (with a peer, each round is both servers; ABBA order)
	clients     int   // cases 1 and 4
	reps        int   // case 1

	coldNs        []int // case 2
	coldLayers    int
	coldLayerSize int64
	coldRate      int64 // bytes per second

	ttfbSamples int // case 3
	ttfbSize    int64

	manifestRequests    int // case 5
	manifestConcurrency int

	versitygwBin string // case 6 ("": versitygw on PATH)
	s3BlobSize   int64

	scaleNs []int // case 7: cache sizes (blobs)

	clusterClients int // case 8: concurrent clients per pull
}

func main() {
	var (
		serveStatic = flag.String("serve-static", "", "internal: serve this directory with http.FileServer (the static baseline)")
		listen      = flag.String("listen", "", "internal: address for -serve-static")
		c           config
		casesFlag   = flag.String("cases", "1,2,3,4,5,6", "cases to run, comma separated")
		nsFlag      = flag.String("cold-n", "1,8,32", "case 2: concurrent clients per round")
		scaleFlag   = flag.String("scale-n", "20000,200000", "case 7: cache sizes in blobs (the first is the baseline of the growth ratios)")
		blobSize    = size(1 << 30)
		smallSize   = size(-1)
		layerSize   = size(16 << 20)
		rate        = size(32 << 20)
		ttfbSize    = size(16 << 20)
	)
	flag.StringVar(&c.mirrorBin, "mirror", "", "mirror binary (go build ./cmd/mirror)")
	flag.StringVar(&c.peerBin, "peer", "", "CNCF Distribution registry binary (v3.1.2); empty: peer columns are n/a")
	flag.StringVar(&c.work, "work", "", "work directory for data dirs and logs (default: a new temporary directory, removed at the end)")
	flag.BoolVar(&c.keep, "keep", false, "keep the work directory")
	flag.BoolVar(&c.peerFirst, "peer-first", false, "run each case's peer phase before the mirror's (default: the mirror first)")
	flag.StringVar(&c.out, "out", "", "also write the results (markdown) to this file")
	flag.Var(&blobSize, "blob-size", "cases 1 and 4: blob size")
	flag.Var(&smallSize, "small-blob-size", "case 4: second, smaller blob size to show RSS independence of size (default blob-size/8; 0 skips)")
	flag.IntVar(&c.case4Rounds, "case4-rounds", 2, "case 4: cold phases per server, in ABBA order with the peer (each with new blobs)")
	flag.IntVar(&c.clients, "clients", 8, "cases 1 and 4: concurrent clients")
	flag.IntVar(&c.reps, "reps", 3, "case 1: repetitions (median reported)")
	flag.IntVar(&c.coldLayers, "cold-layers", 4, "case 2: layers per image")
	flag.Var(&layerSize, "cold-layer-size", "case 2: layer size")
	flag.Var(&rate, "cold-rate", "case 2: upstream (CDN) rate per second, shared by all its connections")
	flag.IntVar(&c.ttfbSamples, "ttfb-samples", 7, "case 3: cold blobs measured (after one warm-up)")
	flag.Var(&ttfbSize, "ttfb-size", "case 3: blob size")
	flag.IntVar(&c.manifestRequests, "manifest-requests", 10000, "case 5: requests per measurement")
	flag.IntVar(&c.manifestConcurrency, "manifest-concurrency", 16, "case 5: concurrent connections")
	flag.StringVar(&c.versitygwBin, "versitygw", "", "cases 6, 7 and 8: versitygw binary (default: versitygw on PATH)")
	flag.IntVar(&c.clusterClients, "cluster-clients", 32, "case 8: concurrent clients pulling the image")
	flag.Parse()

	if *serveStatic != "" {
		log.Fatal(runStatic(*serveStatic, *listen))
	}
	c.blobSize, c.coldLayerSize, c.coldRate, c.ttfbSize = int64(blobSize), int64(layerSize), int64(rate), int64(ttfbSize)
	c.smallSize = int64(smallSize)
	if c.smallSize < 0 {
		c.smallSize = c.blobSize / 8
	}
	// Case 6 moves every byte through a real S3 server several times per
	// run: a modest default, and -blob-size when it is given.
	c.s3BlobSize = 256 << 20
	flag.Visit(func(f *flag.Flag) {
		if f.Name == "blob-size" {
			c.s3BlobSize = c.blobSize
		}
	})
	c.cases = map[int]bool{}
	for _, f := range strings.Split(*casesFlag, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 8 {
			log.Fatalf("-cases: %q is not a case (1-8)", f)
		}
		c.cases[n] = true
	}
	for _, f := range strings.Split(*nsFlag, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			log.Fatalf("-cold-n: %q", f)
		}
		c.coldNs = append(c.coldNs, n)
	}
	for _, f := range strings.Split(*scaleFlag, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 100 {
			log.Fatalf("-scale-n: %q (at least 100)", f)
		}
		c.scaleNs = append(c.scaleNs, n)
	}
	if c.mirrorBin == "" {
		log.Fatal("-mirror is required")
	}
	os.Exit(run(c))
}

// harness is one benchmark run.
type harness struct {
	cfg    config
	up     *ngctest.Upstream
	meter  *meter
	mirror *proc
	peer   *proc
	static *proc
	peerNA string // why the peer is unavailable, if it is

	// Case 6: the S3 store and the two mirrors on it (nil until it runs).
	s3gw, s3proxied, s3redirect *proc
	// Case 8: the running arm's processes (nil between arms).
	arm *clusterArm

	mirrorData string
	dropFailed bool // dropCaches could not drop the page cache (noted once)
	rows       []row
	notes      []string
	started    time.Time
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s  "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

func run(c config) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	h := &harness{cfg: c, started: time.Now()}
	if h.cfg.work == "" {
		dir, err := os.MkdirTemp("", "ngc-mirror-bench-")
		if err != nil {
			logf("work dir: %v", err)
			return 1
		}
		h.cfg.work = dir
		if !c.keep {
			defer os.RemoveAll(dir)
		}
	}
	defer h.close()
	if err := h.setup(ctx); err != nil {
		logf("setup failed: %v", err)
		return 1
	}
	// Order: small and fast first; case 4's large blobs are reused by case 1.
	type step struct {
		n int
		f func(context.Context) error
	}
	var bigBlobs []ngctest.Content
	steps := []step{
		{5, h.case5},
		{3, h.case3},
		{2, h.case2},
		{4, func(ctx context.Context) error {
			var err error
			bigBlobs, err = h.case4(ctx)
			return err
		}},
		{1, func(ctx context.Context) error { return h.case1(ctx, bigBlobs) }},
		{6, h.case6},
		{7, h.case7},
		{8, h.case8},
	}
	for _, s := range steps {
		if !c.cases[s.n] {
			continue
		}
		if ctx.Err() != nil {
			break
		}
		t0 := time.Now()
		logf("case %d: start", s.n)
		if err := s.f(ctx); err != nil {
			logf("case %d: %v", s.n, err)
			h.note("Case %d did not complete: %v", s.n, err)
		}
		logf("case %d: done in %s", s.n, time.Since(t0).Round(time.Second))
		for _, p := range h.procs() {
			if p != nil && !p.alive() {
				h.note("%s exited during case %d (%v):\n%s", p.name, s.n, p.waitErr, tail(p.logPath, 10))
			}
		}
	}
	out := h.report()
	fmt.Print(out)
	if c.out != "" {
		if err := os.WriteFile(c.out, []byte(out), 0o644); err != nil {
			logf("writing %s: %v", c.out, err)
		}
	}
	if ctx.Err() != nil {
		return 130
	}
	return 0
}

func (h *harness) setup(ctx context.Context) error {
	h.up = ngctest.New(ngctest.Options{TokenTTL: 2 * time.Hour})
	h.meter = newMeter(h.up)
	logf("upstream: registry %s, CDN %s", h.up.URL(), h.up.CDN.URL)

	h.mirrorData = filepath.Join(h.cfg.work, "mirror-data")
	if err := os.MkdirAll(h.mirrorData, 0o750); err != nil {
		return err
	}
	addr, err := freeAddr()
	if err != nil {
		return err
	}
	h.mirror, err = startProc(ctx, "mirror", addr, "/v2/", filepath.Join(h.cfg.work, "mirror.log"), h.cfg.mirrorBin,
		[]string{"serve"}, baseEnv(
			"MIRROR_ADDR="+addr,
			"MIRROR_UPSTREAM="+h.up.URL(),
			"MIRROR_DATA_DIR="+h.mirrorData,
			"MIRROR_LOG_LEVEL=warn",
		))
	if err != nil {
		return err
	}
	logf("mirror: %s (pid %d)", h.mirror.base, h.mirror.pid())

	self, err := os.Executable()
	if err != nil {
		return err
	}
	if addr, err = freeAddr(); err != nil {
		return err
	}
	h.static, err = startProc(ctx, "static", addr, "/v2/", filepath.Join(h.cfg.work, "static.log"), self,
		[]string{"-serve-static", h.mirrorData, "-listen", addr}, baseEnv())
	if err != nil {
		return err
	}
	logf("static file server: %s (pid %d), serving %s", h.static.base, h.static.pid(), h.mirrorData)

	if h.cfg.peerBin == "" {
		h.peerNA = "no peer binary given (-peer)"
		return nil
	}
	peerRoot := filepath.Join(h.cfg.work, "peer-data")
	if err := os.MkdirAll(peerRoot, 0o750); err != nil {
		return err
	}
	if addr, err = freeAddr(); err != nil {
		return err
	}
	cfgPath := filepath.Join(h.cfg.work, "peer.yml")
	if err := os.WriteFile(cfgPath, []byte(peerConfig(addr, peerRoot, h.up.URL())), 0o644); err != nil {
		return err
	}
	h.peer, err = startProc(ctx, "peer", addr, "/v2/", filepath.Join(h.cfg.work, "peer.log"), h.cfg.peerBin,
		[]string{"serve", cfgPath}, baseEnv(
			// No collector here: keep the exporters off (spans are still
			// created: the sampler is fixed at 1 in v3.1.2).
			"OTEL_TRACES_EXPORTER=none", "OTEL_METRICS_EXPORTER=none", "OTEL_LOGS_EXPORTER=none",
		))
	if err != nil {
		h.peerNA = "peer did not start: " + firstLine(err.Error())
		logf("%s", err)
		h.peer = nil
		return nil
	}
	logf("peer (distribution %s): %s (pid %d)", filepath.Base(h.cfg.peerBin), h.peer.base, h.peer.pid())
	return nil
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

// procs returns the server subprocesses (nil where one is not running).
func (h *harness) procs() []*proc {
	return append([]*proc{h.mirror, h.peer, h.static, h.s3proxied, h.s3redirect, h.s3gw}, h.arm.procs()...)
}

func (h *harness) close() {
	for _, p := range h.procs() {
		p.stop()
	}
	if h.up != nil {
		h.up.Close()
	}
}

func (h *harness) note(format string, args ...any) {
	h.notes = append(h.notes, fmt.Sprintf(format, args...))
}

// row is one line of the results table. Empty cells print as "—".
type row struct {
	Case, Measure, Static, Mirror, Peer, Ratio, Target, Verdict string
}

func (h *harness) add(r row) { h.rows = append(h.rows, r) }

func (h *harness) report() string {
	var b strings.Builder
	fmt.Fprintf(&b, "\n## Results\n\n")
	fmt.Fprintf(&b, "Run %s, %s total. Machine: %s.\n\n", h.started.UTC().Format("2006-01-02 15:04 UTC"),
		time.Since(h.started).Round(time.Second), machine())
	if h.cfg.cases[1] || h.cfg.cases[2] || h.cfg.cases[3] || h.cfg.cases[4] || h.cfg.cases[5] {
		fmt.Fprintf(&b, "Settings: blob %s (case 4: %s, %d cold rounds), %d clients, case 2 %s over %d layers of %s at %s/s, case 3 %d × %s, case 5 %d requests × %d connections.\n\n",
			fmtBytes(h.cfg.blobSize), case4Sizes(h.cfg), max(h.cfg.case4Rounds, 1), h.cfg.clients, fmtInts(h.cfg.coldNs), h.cfg.coldLayers,
			fmtBytes(h.cfg.coldLayerSize), fmtBytes(h.cfg.coldRate), h.cfg.ttfbSamples, fmtBytes(h.cfg.ttfbSize),
			h.cfg.manifestRequests, h.cfg.manifestConcurrency)
	}
	if h.cfg.cases[6] {
		fmt.Fprintf(&b, "Case 6: blob %s, 1 and %d clients, %d reps, TTFB %d samples; static column = direct GETs from versitygw (the presigned URL).\n\n",
			fmtBytes(h.cfg.s3BlobSize), h.cfg.clients, h.cfg.reps, max(h.cfg.ttfbSamples, 1))
	}
	if h.cfg.cases[7] {
		fmt.Fprintf(&b, "Case 7: caches of %s small blobs (%d B; every 100th %s, old and unreferenced) plus a manifest per %d, on disk and on S3 (versitygw), budget 95%% of the cache; mirror column = the measure.\n\n",
			fmtInts(h.cfg.scaleNs), scaleSmall, fmtBytes(scaleBig), scaleLayers)
	}
	if h.peerNA != "" {
		fmt.Fprintf(&b, "Peer: n/a (%s).\n\n", h.peerNA)
	}
	b.WriteString("| case | measure | static | mirror | peer | ratio | target | verdict |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- |\n")
	dash := func(s string) string {
		if s == "" {
			return "—"
		}
		return strings.ReplaceAll(s, "|", "\\|")
	}
	for _, r := range h.rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s |\n", dash(r.Case), dash(r.Measure), dash(r.Static),
			dash(r.Mirror), dash(r.Peer), dash(r.Ratio), dash(r.Target), dash(r.Verdict))
	}
	if len(h.notes) > 0 {
		b.WriteString("\nNotes:\n\n")
		for _, n := range h.notes {
			fmt.Fprintf(&b, "- %s\n", strings.ReplaceAll(n, "\n", "\n  "))
		}
	}
	return b.String()
}

// case4Sizes names case 4's blob sizes ("128MiB and 1GiB", or one).
func case4Sizes(c config) string {
	if c.smallSize > 0 && c.smallSize != c.blobSize {
		return fmtBytes(c.smallSize) + " and " + fmtBytes(c.blobSize)
	}
	return fmtBytes(c.blobSize)
}

func fmtInts(ns []int) string {
	s := make([]string, len(ns))
	for i, n := range ns {
		s[i] = strconv.Itoa(n)
	}
	return "N=" + strings.Join(s, ",")
}

func machine() string {
	mem := "?"
	if kb, err := memTotalKB(); err == nil {
		mem = fmt.Sprintf("%.1f GiB RAM", float64(kb)/(1<<20))
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return fmt.Sprintf("%d CPUs, %s, Linux %s, %s", runtime.NumCPU(), mem, strings.TrimSpace(string(kernel)), runtime.Version())
}

func memTotalKB() (int64, error) {
	raw, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(l, "MemTotal:"); ok {
			return strconv.ParseInt(strings.Fields(v)[0], 10, 64)
		}
	}
	return 0, io.EOF
}
