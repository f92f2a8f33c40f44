//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/redis/go-redis/v9"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/state/redistest"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// runCLI runs the mirror binary as a command-line client with env.
func runCLI(t *testing.T, env []string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, mirrorBin, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	code := 0
	if err != nil {
		code = cmd.ProcessState.ExitCode()
	}
	return string(out), code
}

// TestPrefetchCLIThenOffline: `mirror prefetch --platform linux/amd64` on
// a new monthly release fetches that platform, `mirror tags` says so, and
// skopeo then pulls the amd64 image with the upstream gone, while arm64
// (never fetched) fails. Bad input exits 2 with a clear error.
func TestPrefetchCLIThenOffline(t *testing.T) {
	need(t, "skopeo")
	up, _ := newUpstream(t)
	rel, err := up.AddRelease(ngctest.PytorchRepo, "24.05-py3", 256<<10)
	if err != nil {
		t.Fatal(err)
	}
	dataDir := t.TempDir()
	m := startMirrorAt(t, up.URL(), dataDir, "")
	env := []string{"MIRROR_ADDR=" + m.addr, "MIRROR_DATA_DIR=" + dataDir}

	out, code := runCLI(t, env, "prefetch", "nvidia/pytorch:24.05-py3", "--platform", "linux/amd64")
	if code != 0 || !strings.Contains(out, "prefetched nvidia/pytorch:24.05-py3") {
		t.Fatalf("mirror prefetch: exit %d\n%s", code, out)
	}
	for _, b := range rel.Child("linux/amd64").Blobs() {
		if n := up.BlobFetches(b.Digest); n != 1 {
			t.Errorf("amd64 blob fetched %d times", n)
		}
	}
	out, code = runCLI(t, env, "tags", "nvidia/pytorch", "--monthly")
	if code != 0 {
		t.Fatalf("mirror tags: exit %d\n%s", code, out)
	}
	var row string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "24.05-py3 ") {
			row = l
		}
	}
	if f := strings.Fields(row); len(f) < 6 || f[1] != "24.05" || f[2] != "py3" || !strings.Contains(row, "partial (linux/amd64)") {
		t.Errorf("mirror tags row for 24.05-py3 = %q\n%s", row, out)
	}

	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"prefetch", "nvidia/pytorch"}, 2, "TAG_INVALID"},
		{[]string{"prefetch", "nvidia/pytorch:24.05-py3", "--platform", "linux/s390x"}, 2, "PLATFORM_INVALID"},
		{[]string{"prefetch", "nvidia/nope:1"}, 2, "MANIFEST_UNKNOWN"},
		{[]string{"prefetch", "nvidia/pytorch:24.05-py3", "--token", "wrong"}, 1, "UNAUTHORIZED"},
		{[]string{"tags", "nvidia/nope"}, 2, "NAME_UNKNOWN"},
	} {
		out, code := runCLI(t, env, c.args...)
		if code != c.code || !strings.Contains(out, c.want) {
			t.Errorf("mirror %v: exit %d, want %d with %s\n%s", c.args, code, c.code, c.want, out)
		}
	}

	// Again: everything is cached, and the CLI says so instead of a rate.
	out, code = runCLI(t, env, "prefetch", "nvidia/pytorch:24.05-py3", "--platform", "linux/amd64")
	if code != 0 || !strings.Contains(out, "nvidia/pytorch:24.05-py3: already cached") || strings.Contains(out, "/s") {
		t.Errorf("second mirror prefetch: exit %d\n%s", code, out)
	}
	testJobsCLI(t, up, env)

	up.Close()
	tmp := t.TempDir()
	pull := func(arch string) (string, error) {
		return run(t, 2*time.Minute, "skopeo", "--override-os", "linux", "--override-arch", arch, "--insecure-policy",
			"copy", "--retry-times", "0", "--src-tls-verify=false",
			"docker://"+m.addr+"/nvidia/pytorch:24.05-py3", "dir:"+filepath.Join(tmp, arch))
	}
	if out, err := pull("amd64"); err != nil {
		t.Fatalf("offline pull of the prefetched platform: %v\n%s", err, out)
	}
	if out, err := pull("arm64"); err == nil {
		t.Errorf("offline pull of arm64 succeeded, but it was never fetched\n%s", out)
	}
	token, _ := os.ReadFile(filepath.Join(dataDir, "admin-token"))
	waitLog(t, m, " route=manifest ") // access log lines follow the responses
	assertNoSecrets(t, up, m.log.String(), strings.TrimSpace(string(token)))
}

// testJobsCLI: `mirror jobs` lists jobs, `jobs cancel` stops a running
// one (its downloads stalled at the upstream), `jobs --follow` reports how
// it ended; cancelling an ended or unknown job says so.
func testJobsCLI(t *testing.T, up *ngctest.Upstream, env []string) {
	t.Helper()
	if _, err := up.AddRelease(ngctest.PytorchRepo, "24.06-py3", 256<<10); err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !up.IsCDN(r) {
			return false
		}
		select { // every blob download waits: the job stays running
		case <-release:
			return false
		case <-r.Context().Done():
			return true
		}
	})
	defer func() { close(release); up.SetFault(nil) }()
	out, code := runCLI(t, env, "prefetch", "nvidia/pytorch:24.06-py3", "--detach")
	id := strings.TrimSpace(out)
	if code != 0 || len(id) != 16 {
		t.Fatalf("mirror prefetch --detach: exit %d\n%s", code, out)
	}
	if !testsupport.Until(30*time.Second, 200*time.Millisecond, func() bool {
		out, code = runCLI(t, env, "jobs", "--state", "running")
		f := jobRow(out, id)
		return code == 0 && len(f) > 2 && f[1] == "running" && f[2] == "nvidia/pytorch:24.06-py3"
	}) {
		t.Fatalf("mirror jobs --state running never listed %s: exit %d\n%s", id, code, out)
	}
	if out, code = runCLI(t, env, "jobs", "cancel", id); code != 0 || !strings.Contains(out, "cancelled job "+id) {
		t.Fatalf("mirror jobs cancel: exit %d\n%s", code, out)
	}
	if out, code = runCLI(t, env, "jobs", "--follow", id); code != 1 || !strings.Contains(out, "cancelled") {
		t.Errorf("mirror jobs --follow of the cancelled job: exit %d\n%s", code, out)
	}
	out, code = runCLI(t, env, "jobs")
	if f := jobRow(out, id); code != 0 || !strings.HasPrefix(out, "ID ") || len(f) < 2 || f[1] != "cancelled" || !strings.Contains(out, "nvidia/pytorch:24.05-py3") {
		t.Errorf("mirror jobs: exit %d\n%s", code, out)
	}
	var doneID string
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 2 && f[1] == "done" {
			doneID = f[0]
		}
	}
	if out, code = runCLI(t, env, "jobs", "cancel", doneID); code != 1 || !strings.Contains(out, "JOB_ENDED") {
		t.Errorf("mirror jobs cancel of a done job %q: exit %d\n%s", doneID, code, out)
	}
	if out, code = runCLI(t, env, "jobs", "cancel", "nope"); code != 2 || !strings.Contains(out, "JOB_UNKNOWN") {
		t.Errorf("mirror jobs cancel nope: exit %d\n%s", code, out)
	}
	if out, code = runCLI(t, env, "jobs", "--follow", doneID); code != 0 || !strings.Contains(out, "already cached") {
		t.Errorf("mirror jobs --follow of the done job: exit %d\n%s", code, out)
	}
}

// jobRow returns the fields of job id's row in `mirror jobs` output.
func jobRow(out, id string) []string {
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 0 && f[0] == id {
			return f
		}
	}
	return nil
}

// scrape returns the value of one sample line of the mirror's /metrics.
func scrape(t *testing.T, m *mirror, sample string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + m.addr + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 16<<20))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), sample+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	t.Fatalf("no sample %s in /metrics", sample)
	return 0
}

// TestTwoMirrorsShareRedis: two mirror processes on one Redis with a rule
// ticking every second: exactly one leads, every tick runs once (one
// claim per tick run), and after kill -9 of the leader the other takes
// over within the lock's expiry.
func TestTwoMirrorsShareRedis(t *testing.T) {
	up, fx := newUpstream(t)
	srv := redistest.Start(t)
	cfg := testsupport.WriteConfig(t, `
tracking:
  poll: "@yearly"
prefetch:
  auto: {enabled: false}
  rules:
    - name: tick
      repositories: [nvidia/pytorch]
      tags: {exact: ["17.12"]}
      platforms: [linux/arm64]
      schedule: "@every 1s"
`)
	a := startMirrorWithConfig(t, up.URL(), cfg, "MIRROR_REDIS_URL="+srv.URL)
	b := startMirrorWithConfig(t, up.URL(), cfg, "MIRROR_REDIS_URL="+srv.URL)
	const ticks, leader = `ngc_mirror_scheduler_ticks_total{kind="rule"}`, "ngc_mirror_scheduler_leader"
	if !testsupport.Until(30*time.Second, 200*time.Millisecond, func() bool { return scrape(t, a, ticks)+scrape(t, b, ticks) >= 4 }) {
		t.Fatal("no ticks")
	}
	if la, lb := scrape(t, a, leader), scrape(t, b, leader); la+lb != 1 {
		t.Fatalf("leader gauges %v and %v; want exactly one leader", la, lb)
	}
	lead, other := a, b
	if scrape(t, b, leader) == 1 {
		lead, other = b, a
	}
	if n := scrape(t, other, ticks); n != 0 {
		t.Errorf("the follower ran %v ticks", n)
	}
	// The job the ticks queue (one image) ran once: arm64 blobs fetched once.
	for _, bl := range fx.Pytorch.Child("linux/arm64").Blobs() {
		testsupport.Until(20*time.Second, 100*time.Millisecond, func() bool { return up.BlobFetches(bl.Digest) > 0 })
		if n := up.BlobFetches(bl.Digest); n != 1 {
			t.Errorf("blob %s fetched %d times", bl.Digest, n)
		}
	}

	ledTicks := scrape(t, lead, ticks)
	_ = lead.cmd.Process.Kill() // kill -9: the lock is not released, it expires
	if !testsupport.Until(40*time.Second, 200*time.Millisecond, func() bool { return scrape(t, other, leader) == 1 && scrape(t, other, ticks) >= 2 }) {
		t.Fatalf("the surviving mirror did not take over\n%s", other.log.String())
	}
	opt, err := redis.ParseURL(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	rc := redis.NewClient(opt)
	defer rc.Close()
	otherTicks := scrape(t, other, ticks)
	keys, err := rc.Keys(t.Context(), "ngc-mirror:claim:tick:tick:*").Result()
	if err != nil {
		t.Fatal(err)
	}
	// Each tick run claimed its own key (a tick may land between the reads).
	if total := ledTicks + otherTicks; float64(len(keys)) < total || float64(len(keys)) > total+2 {
		t.Errorf("%d ticks claimed, %v run (%v by the killed leader)", len(keys), total, ledTicks)
	}
}

// TestScheduledGC: with cache.gc_schedule the mirror removes a blob no
// cached manifest refers to, and keeps a pulled image's blobs.
func TestScheduledGC(t *testing.T) {
	need(t, "skopeo")
	up, fx := newUpstream(t)
	dataDir := t.TempDir()
	cfg := testsupport.WriteConfig(t, "cache:\n  gc_schedule: \"@every 1s\"\n  gc_grace: 0s\ntracking:\n  poll: \"@yearly\"\n")
	m := startMirrorAt(t, up.URL(), dataDir, cfg)
	if out, err := skopeoCopy(t, m.addr+"/"+ngctest.CUDARepo+":"+ngctest.CUDATag, filepath.Join(t.TempDir(), "cuda")); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	orphan := []byte("a blob no manifest refers to")
	d := digest.FromBytes(orphan)
	p := cachePath(t, dataDir, storage.BlobPath{Digest: d})
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, orphan, 0o644); err != nil {
		t.Fatal(err)
	}
	if !testsupport.Until(20*time.Second, 200*time.Millisecond, func() bool {
		_, err := os.Stat(p)
		return os.IsNotExist(err)
	}) {
		t.Fatalf("the orphan blob is still there\n%s", m.log.String())
	}
	for _, b := range fx.CUDA.Blobs() {
		if _, err := os.Stat(cachePath(t, dataDir, storage.BlobPath{Digest: b.Digest})); err != nil {
			t.Errorf("a pulled image's blob was collected: %v", err)
		}
	}
	// The line follows the removal: wait for it rather than look once.
	waitLog(t, m, "scheduled gc")
}

// TestTasksWithoutPrefetch: with prefetch.enabled false the mirror still
// polls tags and runs scheduled gc on their schedules (prefetch jobs are
// what needs prefetch enabled).
func TestTasksWithoutPrefetch(t *testing.T) {
	up, _ := newUpstream(t)
	cfg := testsupport.WriteConfig(t, `
cache:
  gc_schedule: "@every 1s"
tracking:
  repositories: [nvidia/pytorch]
  poll: "@every 1s"
prefetch:
  enabled: false
`)
	m := startMirrorWithConfig(t, up.URL(), cfg)
	const tasks, polls = `ngc_mirror_scheduler_ticks_total{kind="task"}`, `ngc_mirror_tag_polls_total{result="success"}`
	if !testsupport.Until(30*time.Second, 200*time.Millisecond, func() bool { return scrape(t, m, tasks) >= 1 && scrape(t, m, polls) >= 1 }) {
		t.Fatalf("no scheduled gc or tag poll with prefetch disabled: %v task ticks, %v polls", scrape(t, m, tasks), scrape(t, m, polls))
	}
	if !strings.Contains(m.log.String(), "scheduled gc") {
		t.Error("no scheduled gc in the log")
	}
}
