package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// ---------------------------------------------------------------------------
// Case 8: scale-out (issue 11). Two arms, one after the other: 1 and 3
// mirror replicas behind HAProxy (round-robin, per request), each arm with
// its own Redis (membership, blob leases) and its own bucket on versitygw
// (the shared cache, redirect off: the replicas stream every byte). Per
// arm, 32 clients (-cluster-clients) pull a cold image from the throttled
// upstream at once, then pull it again -reps times from the cache.
// Printed as 3 replicas ÷ 1 replica: upstream blob bytes ÷ image size,
// cold wall time, cache-hit aggregate throughput; and, from each replica's
// /metrics, how the balancer spread the bytes served.

// benchClusterSecret is the replicas' shared peer secret (not a secret: it
// lives for one run, on loopback).
const benchClusterSecret = "ngcmirrorbench-cluster-0123456789"

// clusterArm is one arm's processes.
type clusterArm struct {
	n        int
	redis    *proc
	gw       *proc
	replicas []*proc
	lb       *proc // HAProxy; lb.base is what the clients use
}

func (a *clusterArm) procs() []*proc {
	if a == nil {
		return nil
	}
	return append([]*proc{a.lb, a.gw, a.redis}, a.replicas...)
}

// stop ends the balancer first, then the replicas (a clean shutdown
// leaves the membership), then the stores.
func (a *clusterArm) stop() {
	if a == nil {
		return
	}
	a.lb.stop()
	for _, r := range a.replicas {
		r.stop()
	}
	a.gw.stop()
	a.redis.stop()
}

// armResult is what one arm measured.
type armResult struct {
	n         int
	ratio     float64       // upstream blob bytes ÷ image size, cold
	coldWall  time.Duration // 32 clients, cold
	hotRate   float64       // MiB/s aggregate, median over reps
	hotWalls  []float64     // s, each rep
	coldShare []int64       // blob body bytes each replica served, cold
	hotShare  []int64       // the same, hot (all reps)
	hotReqs   []int64       // blob GETs each replica answered, hot
	owned     float64       // fills owned (upstream fetches), sum over replicas
	peerBlobs float64       // blobs streamed from a peer, sum
	peerBytes float64       // bytes in from peers, sum
	hotUp     int           // upstream requests during the hot runs
	cpuBusy   float64       // machine CPU busy fraction during the hot runs
}

// startArm starts Redis, versitygw, n replicas on them and HAProxy in
// front of the replicas, and waits until every replica sees n members.
func (h *harness) startArm(ctx context.Context, n int, redisBin, haproxyBin string) (*clusterArm, error) {
	a := &clusterArm{n: n}
	h.arm = a
	dir := filepath.Join(h.cfg.work, fmt.Sprintf("cluster-%d", n))
	rdir := filepath.Join(dir, "redis")
	if err := os.MkdirAll(rdir, 0o750); err != nil {
		return a, err
	}
	addr, err := freeAddr()
	if err != nil {
		return a, err
	}
	_, port, _ := net.SplitHostPort(addr)
	a.redis, err = startProcListening(ctx, fmt.Sprintf("redis-%d", n), addr, filepath.Join(h.cfg.work, fmt.Sprintf("redis-%d.log", n)), redisBin,
		[]string{"--bind", "127.0.0.1", "--port", port, "--save", "", "--appendonly", "no", "--dir", rdir, "--protected-mode", "yes"}, baseEnv())
	if err != nil {
		return a, err
	}
	redisURL := "redis://" + addr + "/0"
	if a.gw, err = h.startGateway(ctx, fmt.Sprintf("versitygw-cluster-%d", n), filepath.Join(dir, "versitygw")); err != nil {
		return a, err
	}
	for i := range n {
		name := fmt.Sprintf("replica-%d-of-%d", i+1, n)
		data := filepath.Join(dir, name)
		if err := os.MkdirAll(data, 0o750); err != nil {
			return a, err
		}
		addr, err1 := freeAddr()
		peer, err2 := freeAddr()
		if err := errors.Join(err1, err2); err != nil {
			return a, err
		}
		// As README "Scale-out" has it: Redis, the bucket, the peer
		// listener. Prefetch off (nothing but the clients' pulls), the
		// default heartbeat (2 s).
		cfg := fmt.Sprintf(`storage:
  driver: s3
  s3:
    bucket: %s
    region: %s
    endpoint: %s
    path_style: true
    access_key: %s
    redirect: false
state:
  redis_url: %s
prefetch:
  enabled: false
cluster:
  advertise: http://%s
  listen: %s
`, s3Bucket, s3Region, a.gw.base, s3AccessKey, redisURL, peer, peer)
		cfgPath := filepath.Join(dir, name+".yaml")
		if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
			return a, err
		}
		// /readyz is 200 once the replica is registered in the membership.
		p, err := startProc(ctx, name, addr, "/readyz", filepath.Join(h.cfg.work, name+".log"), h.cfg.mirrorBin,
			[]string{"serve", "--config", cfgPath}, baseEnv(
				"MIRROR_ADDR="+addr,
				"MIRROR_UPSTREAM="+h.up.URL(),
				"MIRROR_DATA_DIR="+data,
				"MIRROR_LOG_LEVEL=warn",
				"MIRROR_ACCESS_LOG=false",
				"MIRROR_S3_SECRET_KEY="+s3SecretKey,
				"MIRROR_CLUSTER_SECRET="+benchClusterSecret,
			))
		if err != nil {
			return a, err
		}
		a.replicas = append(a.replicas, p)
	}
	// Each replica learns of the others with its heartbeat.
	for _, r := range a.replicas {
		deadline := time.Now().Add(30 * time.Second)
		for {
			m, err := scrapeMetrics(ctx, r.base)
			if err == nil && m["ngc_mirror_cluster_members"] == float64(n) {
				break
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				return a, fmt.Errorf("%s sees %v members after 30 s, want %d (%v)", r.name, m["ngc_mirror_cluster_members"], n, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	lbAddr, err := freeAddr()
	if err != nil {
		return a, err
	}
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfgPath, []byte(haproxyConfig(lbAddr, a.replicas)), 0o600); err != nil {
		return a, err
	}
	a.lb, err = startProc(ctx, fmt.Sprintf("haproxy-%d", n), lbAddr, "/v2/", filepath.Join(h.cfg.work, fmt.Sprintf("haproxy-%d.log", n)), haproxyBin,
		[]string{"-db", "-f", cfgPath}, baseEnv())
	if err != nil {
		return a, err
	}
	logf("case 8: %d replica(s) behind HAProxy %s (pid %d); Redis %s, versitygw %s", n, a.lb.base, a.lb.pid(), addr, a.gw.base)
	return a, nil
}

// haproxyConfig balances the replicas round-robin, per request (HTTP mode
// with keep-alive balances each request, not each connection), with the
// health check of deploy/haproxy/scale-out.cfg. Timeouts are idle limits.
func haproxyConfig(addr string, replicas []*proc) string {
	var b strings.Builder
	fmt.Fprintf(&b, `global
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 2m
  timeout server 2m
  timeout check 5s
frontend registry
  bind %s
  default_backend mirrors
backend mirrors
  balance roundrobin
  option httpchk GET /readyz
  http-check expect status 200
`, addr)
	for i, r := range replicas {
		fmt.Fprintf(&b, "  server m%d %s check inter 2s fall 2 rise 2\n", i+1, strings.TrimPrefix(r.base, "http://"))
	}
	return b.String()
}

// scrapeMetrics reads a replica's /metrics into sample (name with labels,
// as exposed) → value.
func scrapeMetrics(ctx context.Context, base string) (map[string]float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := newClient(1).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s/metrics: %s", base, resp.Status)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 16<<20))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if l == "" || l[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(l[i+1:], 64); err == nil {
			out[l[:i]] = v
		}
	}
	return out, sc.Err()
}

// sumPrefix adds the samples whose name (with labels) starts with prefix
// and that contain every one of the label matchers in has.
func sumPrefix(m map[string]float64, prefix string, has ...string) float64 {
	var s float64
	for k, v := range m {
		if !strings.HasPrefix(k, prefix) {
			continue
		}
		ok := true
		for _, x := range has {
			ok = ok && strings.Contains(k, x)
		}
		if ok {
			s += v
		}
	}
	return s
}

// replicaCounters is what case 8 reads from each replica's metrics: body
// bytes served to clients (ngc_mirror_served_bytes_total, all sources),
// blob GETs answered (ngc_mirror_http_requests_total, route blob), fills
// owned and blobs and bytes streamed in from peers.
type replicaCounters struct {
	served, blobReqs, owned, peerBlobs, peerBytes, inFlight float64
}

func (a *clusterArm) counters(ctx context.Context) ([]replicaCounters, error) {
	out := make([]replicaCounters, len(a.replicas))
	for i, r := range a.replicas {
		m, err := scrapeMetrics(ctx, r.base)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", r.name, err)
		}
		out[i] = replicaCounters{
			served:    sumPrefix(m, "ngc_mirror_served_bytes_total"),
			blobReqs:  sumPrefix(m, "ngc_mirror_http_requests_total{", `route="blob"`, `method="GET"`),
			owned:     sumPrefix(m, "ngc_mirror_fills_owned_total"),
			peerBlobs: sumPrefix(m, "ngc_mirror_peer_blobs_total{", `result="ok"`),
			peerBytes: sumPrefix(m, "ngc_mirror_peer_bytes_total{", `direction="in"`),
			inFlight:  sumPrefix(m, "ngc_mirror_fills_in_flight"),
		}
	}
	return out, nil
}

// cpuTicks returns the machine's busy and total CPU ticks from the "cpu"
// line of /proc/stat (busy: all but idle and iowait).
func cpuTicks() (busy, total int64, err error) {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	line, _, _ := strings.Cut(string(raw), "\n")
	f := strings.Fields(line)
	if len(f) < 6 || f[0] != "cpu" {
		return 0, 0, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	for i, s := range f[1:] {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, 0, err
		}
		total += v
		if i != 3 && i != 4 { // idle, iowait
			busy += v
		}
	}
	return busy, total, nil
}

// runArm measures one arm: a cold pull of a new image by the clients at
// once, then -reps cache-hit pulls of it.
func (h *harness) runArm(ctx context.Context, a *clusterArm, seed uint64) (armResult, error) {
	r := armResult{n: a.n}
	const tag = "v1"
	repo := fmt.Sprintf("nvidia/bench/cluster-%d", a.n)
	im := benchImage(makeBlobs(seed, h.cfg.coldLayers, h.cfg.coldLayerSize, mtSchema2Layer))
	h.up.AddImage(repo, false, im, tag)
	defer func() {
		for _, b := range im.Blobs() {
			h.up.RemoveBlob(b.Digest)
		}
	}()
	size := imageSize(im)
	digests := digestsOf(im.Blobs())
	k := h.cfg.clusterClients
	c0, err := a.counters(ctx)
	if err != nil {
		return r, err
	}

	// Cold: the upstream throttled as in case 2.
	before := h.meter.sum(digests)
	h.meter.setRate(float64(h.cfg.coldRate))
	c := newClient(k * 3)
	timeout := 2*time.Minute + time.Duration(float64(size*int64(k))/float64(h.cfg.coldRate)*1.5*float64(time.Second))
	r.coldWall, err = concurrently(k, func(j int) error {
		return pullImage(ctx, c, a.lb.base, repo, tag, true, timeout)
	})
	h.meter.setRate(0)
	c.CloseIdleConnections()
	r.ratio = float64(h.meter.sum(digests)-before) / float64(size)
	logf("case 8: %d replica(s), %d clients cold: wall %s, upstream bytes / image size %.3f, err %v", a.n, k, r.coldWall.Round(time.Millisecond), r.ratio, err)
	if err != nil {
		return r, fmt.Errorf("cold pull: %w", err)
	}
	// The last byte reaches the clients once a blob is verified; its
	// commit to the bucket follows. Wait until no fill runs anywhere, so
	// that the hot pulls are served from the bucket.
	var c1 []replicaCounters
	for deadline := time.Now().Add(time.Minute); ; {
		if c1, err = a.counters(ctx); err != nil {
			return r, err
		}
		var running float64
		for _, x := range c1 {
			running += x.inFlight
		}
		if running == 0 {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return r, fmt.Errorf("%v fills still running a minute after the cold pull", running)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for i := range a.replicas {
		r.coldShare = append(r.coldShare, int64(c1[i].served-c0[i].served))
		r.owned += c1[i].owned - c0[i].owned
		r.peerBlobs += c1[i].peerBlobs - c0[i].peerBlobs
		r.peerBytes += c1[i].peerBytes - c0[i].peerBytes
	}

	// Hot: the same clients pull the cached image, -reps times.
	upBefore := len(h.up.Requests())
	b0, t0, cpuErr := cpuTicks()
	var rates []float64
	var errs []error
	for rep := 0; rep < h.cfg.reps; rep++ {
		c := newClient(k * 3)
		wall, err := concurrently(k, func(j int) error {
			return pullImage(ctx, c, a.lb.base, repo, tag, j == 0, timeout)
		})
		c.CloseIdleConnections()
		if err != nil {
			errs = append(errs, fmt.Errorf("cache-hit pull %d: %w", rep+1, err))
			continue
		}
		r.hotWalls = append(r.hotWalls, wall.Seconds())
		rates = append(rates, float64(size)*float64(k)/mib/wall.Seconds())
	}
	b1, t1, cpuErr2 := cpuTicks()
	if cpuErr == nil && cpuErr2 == nil && t1 > t0 {
		r.cpuBusy = float64(b1-b0) / float64(t1-t0)
	}
	r.hotRate = median(rates)
	r.hotUp = len(h.up.Requests()) - upBefore
	c2, err := a.counters(ctx)
	if err != nil {
		return r, errors.Join(append(errs, err)...)
	}
	for i := range a.replicas {
		r.hotShare = append(r.hotShare, int64(c2[i].served-c1[i].served))
		r.hotReqs = append(r.hotReqs, int64(c2[i].blobReqs-c1[i].blobReqs))
	}
	logf("case 8: %d replica(s), %d clients cache-hit: %.0f MiB/s aggregate (median of %d), served per replica %v bytes, machine CPU busy %.0f%%",
		a.n, k, r.hotRate, len(rates), r.hotShare, r.cpuBusy*100)
	for _, p := range a.procs() {
		if !p.alive() {
			errs = append(errs, fmt.Errorf("%s exited (%v):\n%s", p.name, p.waitErr, tail(p.logPath, 10)))
		}
	}
	return r, errors.Join(errs...)
}

// shares formats per-replica byte counts as percentages of their sum.
func shares(xs []int64) string {
	var sum int64
	for _, x := range xs {
		sum += x
	}
	if sum <= 0 {
		return "n/a"
	}
	parts := make([]string, len(xs))
	for i, x := range xs {
		parts[i] = fmt.Sprintf("%.0f%%", float64(x)*100/float64(sum))
	}
	return strings.Join(parts, " / ") + fmt.Sprintf(" of %.0f MiB", float64(sum)/mib)
}

func (h *harness) case8(ctx context.Context) error {
	var missing []string
	bins := map[string]string{}
	for _, b := range []string{"redis-server", "haproxy", "versitygw"} {
		name := b
		if b == "versitygw" && h.cfg.versitygwBin != "" {
			name = h.cfg.versitygwBin
		}
		p, err := exec.LookPath(name)
		if err != nil {
			missing = append(missing, b)
		}
		bins[b] = p
	}
	if len(missing) > 0 {
		h.add(row{Case: "8", Measure: "1 vs 3 replicas behind HAProxy", Mirror: "n/a", Target: "report", Verdict: "—"})
		return fmt.Errorf("not on PATH: %s (.ci/install.sh installs them)", strings.Join(missing, ", "))
	}
	res := map[int]armResult{}
	var errs []error
	for i, n := range []int{1, 3} {
		if ctx.Err() != nil {
			break
		}
		a, err := h.startArm(ctx, n, bins["redis-server"], bins["haproxy"])
		if err == nil {
			var r armResult
			r, err = h.runArm(ctx, a, 8000+uint64(i)*64)
			res[n] = r
		}
		a.stop()
		h.arm = nil
		if err != nil {
			errs = append(errs, fmt.Errorf("%d replica(s): %w", n, err))
		}
	}
	one, three := res[1], res[3]
	k := h.cfg.clusterClients
	ratioOf := func(x, y float64) string {
		if x <= 0 || y <= 0 {
			return "n/a"
		}
		return fmt.Sprintf("%.2fx", y/x)
	}
	f2 := func(r armResult, s string) string {
		if r.n == 0 {
			return "n/a"
		}
		return s
	}
	isOne := func(x float64) bool { return x > 0.995 && x < 1.005 }
	h.add(row{Case: "8", Measure: fmt.Sprintf("%d clients, cold image: upstream blob bytes / image size", k),
		Static: f2(one, fmt.Sprintf("%.2f", one.ratio)), Mirror: f2(three, fmt.Sprintf("%.2f", three.ratio)),
		Ratio: ratioOf(one.ratio, three.ratio), Target: "1.00 with 1 and 3", Verdict: verdict(isOne(one.ratio) && isOne(three.ratio))})
	h.add(row{Case: "8", Measure: fmt.Sprintf("%d clients, cold image: wall time (all clients done)", k),
		Static: f2(one, fmt.Sprintf("%.2f s", one.coldWall.Seconds())), Mirror: f2(three, fmt.Sprintf("%.2f s", three.coldWall.Seconds())),
		Ratio: ratioOf(one.coldWall.Seconds(), three.coldWall.Seconds()), Target: "report", Verdict: "—"})
	h.add(row{Case: "8", Measure: fmt.Sprintf("cold: fills owned (upstream fetches) / blobs streamed from a peer, all replicas (image: %d blobs)", h.cfg.coldLayers+1),
		Static: f2(one, fmt.Sprintf("%.0f / %.0f", one.owned, one.peerBlobs)), Mirror: f2(three, fmt.Sprintf("%.0f / %.0f (%.0f MiB)", three.owned, three.peerBlobs, three.peerBytes/mib)),
		Target: "report", Verdict: "—"})
	h.add(row{Case: "8", Measure: "cold: bytes served to clients per replica (its metrics)",
		Static: f2(one, shares(one.coldShare)), Mirror: f2(three, shares(three.coldShare)), Target: "report", Verdict: "—"})
	h.add(row{Case: "8", Measure: fmt.Sprintf("%d clients, cache hit: aggregate throughput, median of %d", k, h.cfg.reps),
		Static: f2(one, fmt.Sprintf("%.0f MiB/s", one.hotRate)), Mirror: f2(three, fmt.Sprintf("%.0f MiB/s", three.hotRate)),
		Ratio: ratioOf(one.hotRate, three.hotRate), Target: "report (see notes)", Verdict: "—"})
	h.add(row{Case: "8", Measure: "cache hit: bytes served to clients per replica (its metrics); blob GETs per replica",
		Static: f2(one, shares(one.hotShare)+fmt.Sprintf("; %v", one.hotReqs)), Mirror: f2(three, shares(three.hotShare)+fmt.Sprintf("; %v", three.hotReqs)),
		Target: "report", Verdict: "—"})
	h.add(row{Case: "8", Measure: "cache hit: machine CPU busy (/proc/stat, all cores)",
		Static: f2(one, fmt.Sprintf("%.0f%%", one.cpuBusy*100)), Mirror: f2(three, fmt.Sprintf("%.0f%%", three.cpuBusy*100)), Target: "report", Verdict: "—"})
	for _, r := range []armResult{one, three} {
		if r.hotUp > 0 {
			h.note("Case 8: with %d replica(s), the cache-hit pulls sent the upstream %d requests.", r.n, r.hotUp)
		}
	}
	h.note("Case 8: static column = 1 replica, mirror column = 3 replicas, ratio = 3 ÷ 1. Each arm: its own redis-server and versitygw bucket, the replicas (storage s3, redirect off, cluster on) behind HAProxy (balance roundrobin, per request); image = %d layers × %s + config, new per arm; %d clients pull it at once (manifest, then 3 blobs at a time each) from the upstream throttled to %s/s, then %d times from the cache. Everything shares this machine's %d cores and loopback: 3 replicas add no NIC and no CPU here, so the cache-hit ratio shows the cost of spreading, not the gain of more hosts; the per-replica split shows the balancer spreading the load.",
		h.cfg.coldLayers, fmtBytes(h.cfg.coldLayerSize), k, fmtBytes(h.cfg.coldRate), h.cfg.reps, runtime.NumCPU())
	return errors.Join(errs...)
}
