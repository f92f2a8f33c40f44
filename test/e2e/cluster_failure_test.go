//go:build e2e

package e2e

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/redis/go-redis/v9"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// owner returns the replica holding the lease of d (nil: none).
func (c *cluster) owner(t *testing.T, rdb *redis.Client, d digest.Digest) *mirror {
	v, err := rdb.Get(t.Context(), "ngc-mirror:cluster:lease:"+d.String()).Result()
	if err != nil {
		return nil
	}
	_, u, _ := strings.Cut(v, " ")
	for i, p := range c.peers {
		if p == u {
			return c.mirrors[i]
		}
	}
	return nil
}

// TestClusterOwnerKilledMidFill (#11): kill -9 of the replica filling a
// large layer, while 32 clients pull through the balancer: every client
// either completes with the right digests or fails and succeeds on retry
// (never wrong bytes); another replica takes the fill over from the
// upstream with Range; afterwards `mirror fsck` of the bucket is clean and
// the image pulls whole.
func TestClusterOwnerKilledMidFill(t *testing.T) {
	need(t, "crane")
	c := startCluster(t, 3)
	c.pause.Store(int64(40 * time.Millisecond)) // 8 MiB in ~5 s
	im := c.addImage(t, "nvidia/scaleout", "2.0", 8<<20, 1<<20)
	big := im.Layers[0].Digest
	rdb := redis.NewClient(mustRedisOptions(t, c.redis.URL))
	defer rdb.Close()

	type result struct {
		retried int
		errs    []error
	}
	done := make(chan result, 1)
	go func() {
		r, errs := c.pullAll(t.Context(), 32, 3, "nvidia/scaleout", "2.0")
		done <- result{r, errs}
	}()
	var victim *mirror
	testsupport.Eventually(t, 30*time.Second, "the big layer's fill to be under way", func() bool {
		victim = c.owner(t, rdb, big)
		// Under way, and relayed to another replica: the takeover then
		// resumes mid-blob.
		return victim != nil && c.sentOf(big) >= 2<<20 && scrape(t, victim, `ngc_mirror_peer_bytes_total{direction="out"}`) > 0
	})
	_ = victim.cmd.Process.Kill() // kill -9 mid-fill
	_ = victim.cmd.Wait()
	t.Logf("killed the owner at %d of %d bytes from the upstream", c.sentOf(big), len(c.blobs[big]))
	var retried int
	select {
	case r := <-done:
		retried = r.retried
		checkPulls(t, r.errs)
	case <-time.After(4 * time.Minute):
		t.Fatal("clients did not finish")
	}
	t.Logf("%d of 32 clients needed a retry; CDN ranges of the big layer: %q", retried, cdnRanges(c.up, big))
	for _, m := range c.mirrors {
		if m != victim {
			waitNoFills(t, m)
		}
	}
	if n := c.up.BlobFetches(big); n < 2 || n > 3 {
		t.Errorf("big layer fetched %d times from the upstream; want the dead owner's and a takeover (at most one more)", n)
	}
	resumed := false
	for _, r := range cdnRanges(c.up, big) {
		resumed = resumed || r != ""
	}
	if !resumed {
		t.Errorf("the takeover did not resume with Range: %q", cdnRanges(c.up, big))
	}
	// fsck of the shared bucket (through a survivor's configuration), on
	// the host, without the cluster secret that only serve's environment
	// holds: fsck does not speak the peer protocol (U1 F5).
	var survivor int
	for i, m := range c.mirrors {
		if m != victim {
			survivor = i
		}
	}
	out, code := runCLI(t, []string{"MIRROR_S3_SECRET_KEY=" + c.s3.SecretKey}, "fsck", "--config", c.configs[survivor])
	// It names the bucket it checked, not the spool directory (U1 F6).
	if code != 0 || !strings.Contains(out, "fsck: s3://") || !strings.Contains(out, ": clean (") {
		t.Fatalf("mirror fsck after the kill: exit %d\n%s", code, out)
	}
	mustRun(t, "crane", "validate", "--insecure", "--remote", c.lb+"/nvidia/scaleout:2.0")
}

func cdnRanges(up *ngctest.Upstream, d digest.Digest) []string {
	var out []string
	for _, r := range up.CDNRequests() {
		if r.Path == "/blobs/"+d.String() {
			out = append(out, r.Range)
		}
	}
	return out
}

func mustRedisOptions(t *testing.T, u string) *redis.Options {
	t.Helper()
	o, err := redis.ParseURL(u)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// TestClusterRedisLost (#11): with Redis gone the replicas keep serving
// and fill alone; their metrics and /readyz say so.
func TestClusterRedisLost(t *testing.T) {
	need(t, "crane")
	c := startCluster(t, 2)
	im := c.addImage(t, "nvidia/scaleout", "3.0", 1<<20, 1<<20)
	c.redis.Stop()
	for _, m := range c.mirrors {
		m := m
		testsupport.Eventually(t, 15*time.Second, "ngc_mirror_cluster_coordinated 0", func() bool {
			return scrape(t, m, "ngc_mirror_cluster_coordinated") == 0
		})
		code, rep := readyz(t, m)
		if code != http.StatusOK || rep["cluster"] != "uncoordinated" {
			t.Fatalf("/readyz without Redis: %d %v, want 200 and cluster uncoordinated", code, rep)
		}
	}
	c.mustPullAll(t, 4, 0, "nvidia/scaleout", "3.0")
	mustRun(t, "crane", "validate", "--insecure", "--remote", c.lb+"/nvidia/scaleout:3.0")
	for _, b := range im.Blobs() {
		if c.up.BlobFetches(b.Digest) < 1 {
			t.Errorf("blob %s never fetched", b.Digest)
		}
	}
}
