package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go/aws"
	"github.com/aws/aws-sdk-go/aws/credentials"
	"github.com/aws/aws-sdk-go/aws/session"
	"github.com/aws/aws-sdk-go/service/s3"
)

// ---------------------------------------------------------------------------
// Case 7: scale of the cache itself. For each driver (filesystem, S3 on
// versitygw) and each cache size N (20,000 and 200,000 small synthetic
// blobs, plus a manifest per 50 of them), the cache is written straight
// into the driver's directory (the filesystem cache, or versitygw's posix
// backend), then the mirror starts on it with a budget of 95% of it.
// Measured: time from exec to /readyz 200, the start-up listing (the
// "cache listed" log line: the evictor's seed), RSS once the first
// eviction pass is done (and the peak), and that pass (the "evicted" log
// line): planning over every object plus the removals. Printed with the
// ratio 200k / 20k: linear growth is 10x.

// Sizes of the synthetic cache.
const (
	scaleSmall    = 256      // bytes of most blobs
	scaleBig      = 16 << 10 // every 100th blob: old, unreferenced (what the pass evicts)
	scaleLayers   = 50       // small blobs per manifest
	scaleManifest = "application/vnd.oci.image.manifest.v1+json"
)

type scaleResult struct {
	objects  int64 // blobs + manifests
	bytes    int64
	ready    time.Duration // exec → /readyz 200
	listing  time.Duration // the start-up listing
	pass     time.Duration
	evicted  int64
	rssKB    int64 // after the pass
	hwmKB    int64 // peak
	writeDur time.Duration
}

// writeScaleCache writes n blobs and their manifests under root as the
// cache layout has them (/blobs/sha256/ab/<hex>, /manifests/..., /_layout)
// and returns the objects and bytes written. Files are written by a few
// workers; the content and the digests are computed in order.
func writeScaleCache(root string, n int) (objects, bytes int64, err error) {
	for _, kind := range []string{"blobs", "manifests"} {
		for i := range 256 {
			if err := os.MkdirAll(filepath.Join(root, kind, "sha256", fmt.Sprintf("%02x", i)), 0o755); err != nil {
				return 0, 0, err
			}
		}
	}
	type job struct {
		path  string
		body  []byte
		mtime time.Time
	}
	jobs := make(chan job, 256)
	errs := make(chan error, 4)
	for range 4 {
		go func() {
			var first error
			for j := range jobs {
				if first != nil {
					continue
				}
				if err := os.WriteFile(j.path, j.body, 0o644); err != nil {
					first = err
					continue
				}
				first = os.Chtimes(j.path, j.mtime, j.mtime)
			}
			errs <- first
		}()
	}
	put := func(kind string, raw []byte, sum [32]byte, mtime time.Time) string {
		hx := hex.EncodeToString(sum[:])
		jobs <- job{filepath.Join(root, kind, "sha256", hx[:2], hx), raw, mtime}
		objects++
		bytes += int64(len(raw))
		return "sha256:" + hx
	}
	now := time.Now()
	var layers []string
	for i := range n {
		size, mtime := scaleSmall, now.Add(-24*time.Hour+time.Duration(i)*time.Millisecond)
		if i%100 == 0 {
			size, mtime = scaleBig, now.Add(-48*time.Hour+time.Duration(i)*time.Millisecond)
		}
		// Distinct content: the index, then filler.
		buf := make([]byte, size)
		binary.BigEndian.PutUint64(buf, uint64(i))
		for j := 8; j < size; j++ {
			buf[j] = byte(j * 31)
		}
		d := put("blobs", buf, sha256.Sum256(buf), mtime)
		if size == scaleBig {
			continue // orphans: no manifest keeps them
		}
		if layers = append(layers, d); len(layers) < scaleLayers {
			continue
		}
		var b strings.Builder
		fmt.Fprintf(&b, `{"schemaVersion":2,"mediaType":%q,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":%d},"layers":[`,
			scaleManifest, layers[0], scaleSmall)
		for k, l := range layers[1:] {
			if k > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":%q,"size":%d}`, l, scaleSmall)
		}
		b.WriteString("]}")
		body := []byte(b.String())
		// Stored as the cache does: media type line, then the bytes (the
		// digest is of the bytes).
		put("manifests", append([]byte(scaleManifest+"\n"), body...), sha256.Sum256(body), now.Add(-time.Hour))
		layers = layers[:0]
	}
	close(jobs)
	for range 4 {
		if e := <-errs; e != nil && err == nil {
			err = e
		}
	}
	if err != nil {
		return objects, bytes, err
	}
	return objects, bytes, os.WriteFile(filepath.Join(root, "_layout"), []byte(`{"version":2}`), 0o644)
}

var (
	logDuration = regexp.MustCompile(`duration=([0-9.]+[a-zµ]+)`)
	logObjects  = regexp.MustCompile(`objects=([0-9]+)`)
)

// waitLog waits for a line containing msg in the log at path and returns
// it.
func waitLog(ctx context.Context, path, msg string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		f, err := os.Open(path)
		if err == nil {
			sc := bufio.NewScanner(f)
			sc.Buffer(make([]byte, 1<<20), 1<<20)
			for sc.Scan() {
				if strings.Contains(sc.Text(), msg) {
					f.Close()
					return sc.Text(), nil
				}
			}
			f.Close()
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no %q in %s after %s:\n%s", msg, path, timeout, tail(path, 10))
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func logField(re *regexp.Regexp, line string) string {
	if m := re.FindStringSubmatch(line); m != nil {
		return m[1]
	}
	return ""
}

// startGateway starts versitygw (posix backend in root) and creates the
// benchmark's bucket, whose objects are then the files under
// root/<bucket>.
func (h *harness) startGateway(ctx context.Context, name, root string) (*proc, error) {
	bin := h.cfg.versitygwBin
	if bin == "" {
		bin = "versitygw"
	}
	if err := os.MkdirAll(root, 0o750); err != nil {
		return nil, err
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	p, err := startProcReady(ctx, name, addr, filepath.Join(h.cfg.work, name+".log"), bin,
		[]string{"--port", addr, "--quiet", "--keep-alive", "posix", root},
		baseEnv("ROOT_ACCESS_KEY_ID="+s3AccessKey, "ROOT_SECRET_ACCESS_KEY="+s3SecretKey),
		"/", func(*http.Response) bool { return true })
	if err != nil {
		return nil, err
	}
	_ = os.Unsetenv("AWS_CA_BUNDLE")
	sess, err := session.NewSession(&aws.Config{
		Endpoint: aws.String(p.base), Region: aws.String(s3Region),
		Credentials:      credentials.NewStaticCredentials(s3AccessKey, s3SecretKey, ""),
		S3ForcePathStyle: aws.Bool(true), DisableSSL: aws.Bool(true), HTTPClient: newClient(1),
	})
	if err != nil {
		p.stop()
		return nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := s3.New(sess).CreateBucketWithContext(cctx, &s3.CreateBucketInput{Bucket: aws.String(s3Bucket)}); err != nil {
		p.stop()
		return nil, fmt.Errorf("creating the bucket: %w", err)
	}
	return p, nil
}

// scaleRun measures one driver at one cache size.
func (h *harness) scaleRun(ctx context.Context, drv string, n int) (scaleResult, error) {
	var r scaleResult
	dir := filepath.Join(h.cfg.work, fmt.Sprintf("scale-%s-%d", drv, n))
	defer os.RemoveAll(dir)
	data := filepath.Join(dir, "data")
	if err := os.MkdirAll(data, 0o750); err != nil {
		return r, err
	}
	env := []string{"MIRROR_UPSTREAM=" + h.up.URL(), "MIRROR_DATA_DIR=" + data, "MIRROR_LOG_LEVEL=info", "MIRROR_ACCESS_LOG=false"}
	root := data
	var gw *proc
	if drv == "s3" {
		gwRoot := filepath.Join(dir, "versitygw")
		var err error
		if gw, err = h.startGateway(ctx, "versitygw-scale", gwRoot); err != nil {
			return r, err
		}
		defer gw.stop()
		root = filepath.Join(gwRoot, s3Bucket)
		env = append(env, s3Env(gw.base)...)
	}
	t0 := time.Now()
	var err error
	if r.objects, r.bytes, err = writeScaleCache(root, n); err != nil {
		return r, fmt.Errorf("writing the cache: %w", err)
	}
	r.writeDur = time.Since(t0)
	logf("case 7: %s N=%d: %d objects, %s written in %s", drv, n, r.objects, fmtBytes(r.bytes), r.writeDur.Round(time.Millisecond))
	env = append(env, fmt.Sprintf("MIRROR_CACHE_MAX_SIZE=%d", r.bytes*95/100))
	addr, err := freeAddr()
	if err != nil {
		return r, err
	}
	logPath := filepath.Join(h.cfg.work, fmt.Sprintf("mirror-scale-%s-%d.log", drv, n))
	t0 = time.Now()
	m, err := startProcReady(ctx, "mirror-scale", addr, logPath, h.cfg.mirrorBin, []string{"serve"},
		baseEnv(append(env, "MIRROR_ADDR="+addr)...), "/readyz", func(resp *http.Response) bool { return resp.StatusCode == http.StatusOK })
	if err != nil {
		return r, err
	}
	defer m.stop()
	r.ready = time.Since(t0)
	line, err := waitLog(ctx, logPath, `msg="cache listed"`, 15*time.Minute)
	if err != nil {
		return r, err
	}
	if r.listing, err = time.ParseDuration(logField(logDuration, line)); err != nil {
		return r, fmt.Errorf("listing duration in %q: %w", line, err)
	}
	line, err = waitLog(ctx, logPath, `msg="evicted least recently used content"`, 15*time.Minute)
	if err != nil {
		return r, err
	}
	if r.pass, err = time.ParseDuration(logField(logDuration, line)); err != nil {
		return r, fmt.Errorf("pass duration in %q: %w", line, err)
	}
	r.evicted, _ = strconv.ParseInt(logField(logObjects, line), 10, 64)
	r.rssKB, _ = procStatusKB(m.pid(), "VmRSS")
	r.hwmKB, _ = procStatusKB(m.pid(), "VmHWM")
	logf("case 7: %s N=%d: ready %s, listing %s, pass %s (%d evicted), RSS %d KiB (peak %d KiB)", drv, n,
		r.ready.Round(time.Millisecond), r.listing, r.pass, r.evicted, r.rssKB, r.hwmKB)
	return r, nil
}

func (h *harness) case7(ctx context.Context) error {
	drivers := []string{"filesystem", "s3"}
	for _, drv := range drivers {
		var res []scaleResult
		for _, n := range h.cfg.scaleNs {
			r, err := h.scaleRun(ctx, drv, n)
			if err != nil {
				h.note("Case 7 (%s, N=%d) did not complete: %v", drv, n, err)
				break
			}
			res = append(res, r)
			c := fmt.Sprintf("7 %s", drv)
			label := fmt.Sprintf("N=%d blobs (+%d manifests, %s)", n, r.objects-int64(n), fmtSize(r.bytes))
			h.setCell(c, label+": start-up to /readyz 200", "mirror", ms(r.ready))
			h.setCell(c, label+": start-up listing (evictor seed)", "mirror", ms(r.listing))
			h.setCell(c, label+": first eviction pass", "mirror", fmt.Sprintf("%s (%d objects removed)", ms(r.pass), r.evicted))
			h.setCell(c, label+": RSS after the pass (peak)", "mirror", fmt.Sprintf("%.1f MiB (%.1f MiB)", float64(r.rssKB)/1024, float64(r.hwmKB)/1024))
		}
		if len(res) < 2 {
			continue
		}
		a, b := res[0], res[len(res)-1]
		growth := float64(b.objects) / float64(a.objects)
		c := fmt.Sprintf("7 %s", drv)
		target := fmt.Sprintf("≤ %.1fx (linear)", growth)
		ratio := func(measure string, x, y float64) {
			g := y / x
			h.add(row{Case: c, Measure: fmt.Sprintf("growth N=%d → N=%d: %s", h.cfg.scaleNs[0], h.cfg.scaleNs[len(res)-1], measure),
				Mirror: fmt.Sprintf("%.2fx", g), Ratio: fmt.Sprintf("%.2fx objects", growth), Target: target, Verdict: verdict(g <= growth*1.1)})
		}
		ratio("start-up to ready", float64(a.ready), float64(b.ready))
		ratio("start-up listing", float64(a.listing), float64(b.listing))
		ratio("eviction pass", float64(a.pass), float64(b.pass))
		ratio("RSS", float64(a.rssKB), float64(b.rssKB))
		perObj := float64(b.rssKB-a.rssKB) * 1024 / float64(b.objects-a.objects)
		h.add(row{Case: c, Measure: "RSS per cached object (difference of the two sizes)", Mirror: fmt.Sprintf("%.0f bytes", perObj)})
	}
	return nil
}

func fmtSize(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%d KiB", n>>10)
}
