//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	mcluster "github.com/ngc-mirror/ngc-mirror/internal/cluster"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/state/redistest"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// clusterSecret is the replicas' shared secret in these tests (not a real
// one); the logs must never show it.
const clusterSecret = "e2e-cluster-secret-0123456789"

// cluster is N mirror processes sharing a real Redis and a real S3 bucket
// (versitygw, behind a counting proxy), behind a real HAProxy that
// balances round-robin, pulling from the NGC-like upstream whose CDN
// serves blobs at a throttled rate.
type cluster struct {
	up       *ngctest.Upstream
	redis    *redistest.Server
	s3       storage.S3Options
	mirrors  []*mirror
	peers    []string // advertise URL of mirrors[i]
	configs  []string // config file of mirrors[i]
	lb       string   // host:port of HAProxy
	haproxy  *testsupport.Process
	blobs    map[digest.Digest][]byte
	sent     sync.Map // digest → *atomic.Int64: blob bytes the CDN sent
	uploaded atomic.Int64
	pause    atomic.Int64 // nanoseconds between 64 KiB chunks of a CDN blob body
}

// imageBlobs adds a single-platform image of layers of the given sizes as
// repository:tag and returns it.
func (c *cluster) addImage(t *testing.T, repository, tag string, sizes ...int64) *ngctest.Image {
	t.Helper()
	var layers []v1.Layer
	for _, n := range sizes {
		l, err := ngctest.NewLayer(n, false)
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, l)
	}
	im, err := ngctest.BuildImage(v1.Platform{OS: "linux", Architecture: "amd64"}, false, layers...)
	if err != nil {
		t.Fatal(err)
	}
	c.up.AddImage(repository, false, im, tag)
	for _, b := range im.Blobs() {
		c.blobs[b.Digest] = b.Body
	}
	return im
}

func (c *cluster) sentOf(d digest.Digest) int64 {
	v, _ := c.sent.LoadOrStore(d, new(atomic.Int64))
	return v.(*atomic.Int64).Load()
}

// serveCDN answers the CDN's blob GETs itself (after the fake recorded
// them): Range honoured, 64 KiB at a time with c.pause between chunks, and
// every byte written counted.
func (c *cluster) serveCDN(w http.ResponseWriter, r *http.Request) bool {
	if !c.up.IsCDN(r) || r.Method != http.MethodGet {
		return false
	}
	d := digest.Digest(strings.TrimPrefix(r.URL.Path, "/blobs/"))
	body, ok := c.blobs[d]
	if !ok {
		return false
	}
	var off int64
	status := http.StatusOK
	if rg := r.Header.Get("Range"); rg != "" {
		v := strings.TrimSuffix(strings.TrimPrefix(rg, "bytes="), "-")
		off, _ = strconv.ParseInt(v, 10, 64)
		status = http.StatusPartialContent
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", off, len(body)-1, len(body)))
	}
	w.Header().Set("Content-Type", "binary/octet-stream")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)-int(off)))
	w.WriteHeader(status)
	v, _ := c.sent.LoadOrStore(d, new(atomic.Int64))
	sent := v.(*atomic.Int64)
	for p := off; p < int64(len(body)); {
		n := min(int64(64<<10), int64(len(body))-p)
		m, err := w.Write(body[p : p+n])
		sent.Add(int64(m))
		if err != nil {
			return true
		}
		w.(http.Flusher).Flush()
		p += n
		select {
		case <-time.After(time.Duration(c.pause.Load())):
		case <-r.Context().Done():
			return true
		}
	}
	return true
}

// startCluster starts Redis, versitygw behind a proxy counting the bytes
// of blob uploads, n mirror replicas and HAProxy in front of them.
func startCluster(t *testing.T, n int) *cluster {
	t.Helper()
	need(t, "haproxy", "redis-server", "versitygw")
	c := &cluster{up: ngctest.New(ngctest.Options{}), blobs: map[digest.Digest][]byte{}}
	t.Cleanup(c.up.Close)
	c.up.SetFault(c.serveCDN)
	c.redis = redistest.Start(t)
	c.s3 = testsupport.StartS3(t)
	target, _ := url.Parse(c.s3.Endpoint)
	rp := httputil.NewSingleHostReverseProxy(target) // keeps the Host header: signatures hold
	counting := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/_uploads/") && !strings.HasSuffix(r.URL.Path, ".live") {
			r.Body = &countReader{r: r.Body, n: &c.uploaded}
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(counting.Close)
	for range n {
		peer := freeAddr(t)
		cfg := testsupport.WriteConfig(t, fmt.Sprintf(`storage:
  driver: s3
  s3:
    bucket: %s
    region: %s
    endpoint: %s
    path_style: true
    access_key: %s
state:
  redis_url: %s
prefetch:
  enabled: false
cluster:
  advertise: http://%s
  listen: %s
  heartbeat: 300ms
`, c.s3.Bucket, c.s3.Region, counting.URL, c.s3.AccessKey, c.redis.URL, peer, peer))
		dataDir := t.TempDir()
		m := startMirrorAt(t, c.up.URL(), dataDir, cfg, "MIRROR_S3_SECRET_KEY="+c.s3.SecretKey, "MIRROR_CLUSTER_SECRET="+clusterSecret)
		c.mirrors = append(c.mirrors, m)
		c.peers = append(c.peers, "http://"+peer)
		c.configs = append(c.configs, cfg)
	}
	for _, m := range c.mirrors {
		m := m
		testsupport.Eventually(t, 15*time.Second, "every replica to see all members", func() bool {
			return scrape(t, m, "ngc_mirror_cluster_members") == float64(n)
		})
	}
	c.startHAProxy(t)
	return c
}

type countReader struct {
	r io.ReadCloser
	n *atomic.Int64
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

func (c *countReader) Close() error { return c.r.Close() }

// startHAProxy balances the replicas round-robin, per request, and takes a
// replica out when its /readyz fails (a connection refused is retried on
// another one).
func (c *cluster) startHAProxy(t *testing.T) {
	t.Helper()
	c.lb = freeAddr(t)
	var servers strings.Builder
	for i, m := range c.mirrors {
		fmt.Fprintf(&servers, "  server m%d %s check inter 500ms fall 2 rise 1\n", i, m.addr)
	}
	cfg := filepath.Join(t.TempDir(), "haproxy.cfg")
	conf := `global
  maxconn 2000
defaults
  mode http
  timeout connect 2s
  timeout client 2m
  timeout server 2m
  timeout check 5s
  retries 3
  option redispatch
frontend registry
  bind ` + c.lb + `
  default_backend mirrors
backend mirrors
  balance roundrobin
  option httpchk GET /readyz
` + servers.String()
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	log := &syncBuffer{}
	cmd := exec.Command("haproxy", "-db", "-f", cfg)
	cmd.Stdout, cmd.Stderr = log, log
	p, err := testsupport.Start(t, cmd, os.Interrupt)
	if err != nil {
		t.Fatal(err)
	}
	c.haproxy = p
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("haproxy log:\n%s", log.String())
		}
	})
	testsupport.Eventually(t, 15*time.Second, "HAProxy to balance to the replicas", func() bool {
		resp, err := http.Get("http://" + c.lb + "/v2/")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

// sum adds one sample over the running replicas.
func (c *cluster) sum(t *testing.T, sample string, skip ...*mirror) float64 {
	t.Helper()
	var s float64
	for _, m := range c.mirrors {
		if !containsMirror(skip, m) {
			s += scrape(t, m, sample)
		}
	}
	return s
}

func containsMirror(ms []*mirror, m *mirror) bool {
	for _, x := range ms {
		if x == m {
			return true
		}
	}
	return false
}

// errWrongBytes is a pull that received content not matching its digest:
// never acceptable (a cut connection is).
var errWrongBytes = errors.New("wrong bytes")

// registryPull pulls repository:tag from base like a registry client
// (manifest, then config and layers) on its own connections, checking
// every digest and size.
func registryPull(ctx context.Context, base, repository, tag string) error {
	c := &http.Client{Transport: &http.Transport{}}
	defer c.CloseIdleConnections()
	get := func(path, accept string) ([]byte, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+base+"/v2/"+repository+path, nil)
		if accept != "" {
			req.Header.Set("Accept", accept)
		}
		resp, err := c.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("GET %s: status %d", path, resp.StatusCode)
		}
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return nil, fmt.Errorf("GET %s: %w after %d bytes", path, err, len(b))
		}
		if resp.ContentLength >= 0 && int64(len(b)) != resp.ContentLength {
			return nil, fmt.Errorf("GET %s: %d of %d bytes", path, len(b), resp.ContentLength)
		}
		return b, nil
	}
	raw, err := get("/manifests/"+tag, "application/vnd.docker.distribution.manifest.v2+json")
	if err != nil {
		return err
	}
	var mf struct {
		Config struct {
			Digest digest.Digest `json:"digest"`
			Size   int64         `json:"size"`
		} `json:"config"`
		Layers []struct {
			Digest digest.Digest `json:"digest"`
			Size   int64         `json:"size"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(raw, &mf); err != nil {
		return fmt.Errorf("manifest: %w", err)
	}
	want := map[digest.Digest]int64{mf.Config.Digest: mf.Config.Size}
	for _, l := range mf.Layers {
		want[l.Digest] = l.Size
	}
	for d, size := range want {
		b, err := get("/blobs/"+d.String(), "")
		if err != nil {
			return err
		}
		if int64(len(b)) != size || digest.FromBytes(b) != d {
			return fmt.Errorf("%w: blob %s: %d bytes hashing to %s", errWrongBytes, d, len(b), digest.FromBytes(b))
		}
	}
	return nil
}

// pullAll runs clients registry pulls through the balancer at once, each
// retried up to retries times after a failure that is not wrong bytes. It
// returns how many needed a retry and each client's final error.
func (c *cluster) pullAll(ctx context.Context, clients, retries int, repository, tag string) (int, []error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	var retried atomic.Int32
	errs := make([]error, clients)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for try := 0; ; try++ {
				err := registryPull(ctx, c.lb, repository, tag)
				if err == nil || errors.Is(err, errWrongBytes) || try >= retries {
					errs[i] = err
					return
				}
				if try == 0 {
					retried.Add(1)
				}
				select {
				case <-ctx.Done():
					errs[i] = ctx.Err()
					return
				case <-time.After(500 * time.Millisecond):
				}
			}
		}()
	}
	wg.Wait()
	return int(retried.Load()), errs
}

// mustPullAll is pullAll failing the test on any client's error.
func (c *cluster) mustPullAll(t *testing.T, clients, retries int, repository, tag string) int {
	t.Helper()
	retried, errs := c.pullAll(t.Context(), clients, retries, repository, tag)
	checkPulls(t, errs)
	return retried
}

func checkPulls(t *testing.T, errs []error) {
	t.Helper()
	for i, err := range errs {
		if err != nil {
			t.Errorf("client %d: %v", i, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
}

func imageBytes(im *ngctest.Image) int64 {
	var n int64
	for _, b := range im.Blobs() {
		n += int64(len(b.Body))
	}
	return n
}

// TestClusterOneFetchPerBlob (#11): 32 clients pull a cold 5-blob image at
// once through HAProxy in front of 3 replicas sharing Redis and an S3
// bucket. Each blob is fetched from the upstream exactly once (upstream
// blob bytes ÷ image size = 1.00), written to the bucket once, and streamed
// from its owner to the other replicas; crane and skopeo then pull it
// whole through the balancer.
func TestClusterOneFetchPerBlob(t *testing.T) {
	need(t, "crane", "skopeo")
	c := startCluster(t, 3)
	c.pause.Store(int64(20 * time.Millisecond)) // 2 MiB in ~0.6 s: clients arrive mid-fill
	im := c.addImage(t, "nvidia/scaleout", "1.0", 2<<20, 2<<20, 1<<20, 3<<20)
	c.mustPullAll(t, 32, 0, "nvidia/scaleout", "1.0")
	for _, m := range c.mirrors {
		waitNoFills(t, m)
	}
	size := imageBytes(im)
	var sent int64
	for _, b := range im.Blobs() {
		if n := c.up.BlobFetches(b.Digest); n != 1 {
			t.Errorf("blob %s fetched %d times from the upstream, want 1", b.Digest, n)
		}
		sent += c.sentOf(b.Digest)
	}
	ratio := float64(sent) / float64(size)
	t.Logf("upstream blob bytes %d ÷ image size %d = %.2f; bytes uploaded to S3 %d (%.2f of the image)",
		sent, size, ratio, c.uploaded.Load(), float64(c.uploaded.Load())/float64(size))
	if sent != size {
		t.Errorf("upstream blob bytes ÷ image size = %.4f, want 1.00", ratio)
	}
	if got := c.uploaded.Load(); got != size {
		t.Errorf("blob uploads to the shared bucket: %d bytes, want the image's %d (each blob once)", got, size)
	}
	if owned := c.sum(t, "ngc_mirror_fills_owned_total"); owned != float64(len(im.Blobs())) {
		t.Errorf("fills owned across replicas: %v, want %d (one per blob)", owned, len(im.Blobs()))
	}
	if peer := c.sum(t, `ngc_mirror_peer_blobs_total{result="ok"}`); peer < 1 {
		t.Errorf("no blob was streamed from a peer (ngc_mirror_peer_blobs_total{result=\"ok\"} = %v)", peer)
	}
	if in, out := c.sum(t, `ngc_mirror_peer_bytes_total{direction="in"}`), c.sum(t, `ngc_mirror_peer_bytes_total{direction="out"}`); in != out || in == 0 {
		t.Errorf("peer bytes in %v, out %v: want equal and not 0", in, out)
	}
	t.Logf("streamed from peers: %v blobs, %v bytes", c.sum(t, `ngc_mirror_peer_blobs_total{result="ok"}`), c.sum(t, `ngc_mirror_peer_bytes_total{direction="in"}`))
	// Real clients through the balancer.
	ref := c.lb + "/nvidia/scaleout:1.0"
	mustRun(t, "crane", "validate", "--insecure", "--remote", ref)
	dir := filepath.Join(t.TempDir(), "pulled")
	if out, err := skopeoCopy(t, ref, dir); err != nil {
		t.Fatalf("skopeo copy through the balancer: %v\n%s", err, out)
	}
	for _, b := range im.Blobs() {
		data, err := os.ReadFile(filepath.Join(dir, b.Digest.Encoded()))
		if err != nil || digest.FromBytes(data) != b.Digest {
			t.Fatalf("skopeo's copy of blob %s: %v", b.Digest, err)
		}
	}
	for _, b := range im.Blobs() {
		if n := c.up.BlobFetches(b.Digest); n != 1 {
			t.Errorf("after the real clients, blob %s fetched %d times", b.Digest, n)
		}
	}
	var logs strings.Builder
	for _, m := range c.mirrors {
		logs.WriteString(m.log.String())
	}
	if strings.Contains(logs.String(), clusterSecret) {
		t.Error("a replica's log shows the cluster secret")
	}
	// A peer request is never forwarded: a blob the replica neither fills
	// nor holds is 404, and nothing is fetched for it.
	other := c.addImage(t, "nvidia/other", "1.0", 64<<10)
	_, _, _, perr := mcluster.NewPeer([]byte(clusterSecret), nil, nil).Get(t.Context(), c.peers[0], other.Layers[0].Digest, 0)
	if !errors.Is(perr, mcluster.ErrNotServed) || c.up.BlobFetches(other.Layers[0].Digest) != 0 {
		t.Errorf("signed peer request for an uncached blob: %v, upstream fetches %d; want ErrNotServed, 0", perr, c.up.BlobFetches(other.Layers[0].Digest))
	}
	// The peer endpoint is not for anonymous clients.
	resp, err := http.Get(c.peers[0] + "/peer/v1/blobs/" + im.Layers[0].Digest.String())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("anonymous peer request: %d, want 401", resp.StatusCode)
	}
}
