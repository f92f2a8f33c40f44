package admin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/admin"
	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/prefetch"
	"github.com/ngc-mirror/ngc-mirror/internal/prefetch/prefetchtest"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

const token = "test-admin-token"

type api struct {
	t   *testing.T
	w   *prefetchtest.World
	srv *httptest.Server
}

func newAPI(t *testing.T) *api {
	return newAPIWith(t, prefetchtest.Options{Rules: []prefetch.RuleSpec{{
		Name: "dgx", Repositories: []string{ngctest.PytorchRepo}, Tags: config.TagSelect{Latest: 1}, Platforms: []string{"linux/amd64"}}}})
}

func newAPIWith(t *testing.T, o prefetchtest.Options) *api {
	w := prefetchtest.New(t, o)
	w.Start(t)
	srv := httptest.NewServer(admin.New(w.Sched, w.Tracker, w.Pull, admin.Options{Token: token, UpstreamHosts: []string{"nvcr.io"}}))
	t.Cleanup(srv.Close)
	return &api{t: t, w: w, srv: srv}
}

// call sends a request with the token and decodes the JSON answer into
// out (when not nil). It returns the status and the first error code.
func (a *api) call(method, path string, body string, out any) (int, string) {
	a.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, _ := http.NewRequest(method, a.srv.URL+path, rd)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		a.t.Errorf("%s %s: Content-Type %q", method, path, ct)
	}
	var env struct {
		Errors []struct{ Code, Message string } `json:"errors"`
	}
	if resp.StatusCode >= 300 {
		if err := json.Unmarshal(raw, &env); err != nil || len(env.Errors) == 0 || env.Errors[0].Message == "" {
			a.t.Errorf("%s %s: %d with a body that is not the error envelope: %s", method, path, resp.StatusCode, raw)
			return resp.StatusCode, ""
		}
		return resp.StatusCode, env.Errors[0].Code
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			a.t.Fatalf("%s %s: %v: %s", method, path, err, raw)
		}
	}
	return resp.StatusCode, ""
}

func TestTokenRequired(t *testing.T) {
	a := newAPI(t)
	for _, auth := range []string{"", "Bearer wrong", "Basic " + token, "Bearer " + token + "x"} {
		req, _ := http.NewRequest(http.MethodGet, a.srv.URL+admin.Prefix+"/jobs", nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || !bytes.Contains(body, []byte(`"UNAUTHORIZED"`)) || resp.Header.Get("WWW-Authenticate") == "" {
			t.Errorf("Authorization %q: %d %s", auth, resp.StatusCode, body)
		}
		if bytes.Contains(body, []byte(token)) {
			t.Error("the answer echoes the token")
		}
	}
}

func TestPrefetchAndListJobs(t *testing.T) {
	a := newAPI(t)
	var resp struct{ Jobs []state.Job }
	if st, code := a.call(http.MethodPost, admin.Prefix+"/prefetch", `{"image":"nvcr.io/nvidia/pytorch:17.12","platforms":["linux/arm64"]}`, &resp); st != http.StatusAccepted {
		t.Fatalf("prefetch: %d %s", st, code)
	}
	if len(resp.Jobs) != 1 || resp.Jobs[0].Repository != ngctest.PytorchRepo || resp.Jobs[0].Reference != "17.12" {
		t.Fatalf("jobs = %+v", resp.Jobs)
	}
	id := resp.Jobs[0].ID
	j := a.w.WaitJob(t, id, 20*time.Second)
	if j.State != state.JobDone {
		t.Fatalf("job = %+v", j)
	}
	var one state.Job
	if st, _ := a.call(http.MethodGet, admin.Prefix+"/jobs/"+id, "", &one); st != 200 || one.ID != id || one.BytesDone != one.BytesTotal {
		t.Errorf("GET job: %d %+v", st, one)
	}
	var list struct{ Jobs []state.Job }
	if st, _ := a.call(http.MethodGet, admin.Prefix+"/jobs?state=done", "", &list); st != 200 || len(list.Jobs) != 1 {
		t.Errorf("GET jobs: %d %+v", st, list)
	}

	// The tag list says what is cached: the index and arm64, not amd64.
	var tags struct{ Tags []admin.TagInfo }
	if st, code := a.call(http.MethodGet, admin.Prefix+"/tags?repository=nvidia/pytorch&monthly=true", "", &tags); st != 200 {
		t.Fatalf("tags: %d %s", st, code)
	}
	if len(tags.Tags) != 2 {
		t.Fatalf("tags = %+v", tags.Tags)
	}
	for _, tg := range tags.Tags {
		if tg.Cached != "partial" || len(tg.CachedPlatforms) != 1 || tg.CachedPlatforms[0] != "linux/arm64" || !tg.Monthly {
			t.Errorf("tag %s: cached %s %v", tg.Name, tg.Cached, tg.CachedPlatforms)
		}
	}
	var repos struct{ Repositories []admin.RepositoryInfo }
	if st, _ := a.call(http.MethodGet, admin.Prefix+"/repositories", "", &repos); st != 200 || len(repos.Repositories) == 0 || repos.Repositories[0].Tags != 2 {
		t.Errorf("repositories: %d %+v", st, repos)
	}

	// A configured rule, run now.
	if st, code := a.call(http.MethodPost, admin.Prefix+"/prefetch", `{"rule":"dgx"}`, &resp); st != http.StatusAccepted || len(resp.Jobs) != 1 || resp.Jobs[0].Rule != "dgx" {
		t.Errorf("run rule: %d %s %+v", st, code, resp.Jobs)
	}
	var rules struct {
		Rules  []admin.RuleInfo
		Leader bool
	}
	if st, _ := a.call(http.MethodGet, admin.Prefix+"/rules", "", &rules); st != 200 || len(rules.Rules) != 1 || !rules.Leader {
		t.Errorf("rules: %d %+v", st, rules)
	}
}

// TestNoRulesIsAnEmptyList: without rules, GET rules answers "rules": []
// (a list a script can iterate), not null.
func TestNoRulesIsAnEmptyList(t *testing.T) {
	a := newAPIWith(t, prefetchtest.Options{})
	var rules map[string]json.RawMessage
	if st, _ := a.call(http.MethodGet, admin.Prefix+"/rules", "", &rules); st != 200 || string(rules["rules"]) != "[]" {
		t.Fatalf("rules: %d %s", st, rules["rules"])
	}
}

func TestBadInputGetsClearErrors(t *testing.T) {
	a := newAPI(t)
	for _, c := range []struct {
		method, path, body string
		status             int
		code               string
	}{
		{"POST", "/prefetch", `{"image":"nvidia/pytorch"}`, 400, "TAG_INVALID"},
		{"POST", "/prefetch", `{"image":"NVIDIA/PyTorch:1"}`, 400, "NAME_INVALID"},
		{"POST", "/prefetch", `{"image":"nvidia/pytorch:bad:tag"}`, 400, "NAME_INVALID"},
		{"POST", "/prefetch", `{"image":"nvidia/pytorch:-bad"}`, 400, "TAG_INVALID"},
		{"POST", "/prefetch", `{"image":"nvidia/pytorch:"}`, 400, "TAG_INVALID"},
		{"POST", "/prefetch", `{"image":"nvidia/pytorch:bad%tag"}`, 400, "TAG_INVALID"},
		{"POST", "/prefetch", `{"image":"nvidia/pytorch@sha256:abc"}`, 400, "DIGEST_INVALID"},
		{"POST", "/prefetch", `{"image":"docker.io/library/ubuntu:22.04"}`, 400, "NAME_INVALID"},
		{"POST", "/prefetch", `{"image":"nvidia/pytorch:17.12"} trailing`, 400, "BAD_REQUEST"},
		{"POST", "/prefetch", `{"image":"nvidia/pytorch:17.12"}{"image":"x"}`, 400, "BAD_REQUEST"},
		{"POST", "/prefetch", `{"image":"` + strings.Repeat("a", 1<<20) + `"}`, 413, "BAD_REQUEST"},
		{"GET", "/jobs?state=bogus", ``, 400, "BAD_REQUEST"},
		{"POST", "/prefetch", `{"image":"nvidia/no-such-image:24.05-py3"}`, 404, "MANIFEST_UNKNOWN"},
		{"POST", "/prefetch", `{"image":"nvidia/pytorch:99.01-py3"}`, 404, "MANIFEST_UNKNOWN"},
		{"POST", "/prefetch", `{"image":"nvidia/pytorch:17.12","platforms":["amd64"]}`, 400, "PLATFORM_INVALID"},
		{"POST", "/prefetch", `{"image":"nvidia/pytorch:17.12","platforms":["linux/s390x"]}`, 400, "PLATFORM_INVALID"},
		{"POST", "/prefetch", `{"image":"nvidia/cuda:12.4.1-base-ubuntu22.04","platforms":["linux/arm64"]}`, 400, "PLATFORM_INVALID"},
		{"POST", "/prefetch", `{"rule":"nope"}`, 404, "RULE_UNKNOWN"},
		{"POST", "/prefetch", `{"spec":{"name":"x","repositories":["nvidia/pytorch"],"tags":{"regex":"("}}}`, 400, "RULE_INVALID"},
		{"POST", "/prefetch", `{"spec":{"repositories":[],"tags":{"latest":1}}}`, 400, "RULE_INVALID"},
		{"POST", "/prefetch", `{"spec":{"name":"dgx","repositories":["nvidia/cuda"],"tags":{"latest":1}}}`, 400, "RULE_INVALID"},
		{"POST", "/prefetch", `{"spec":{"name":"x","repositories":["nvidia/pytorch"],"tags":{"latest":1},"bandwidth":"ten"}}`, 400, "BAD_REQUEST"},
		{"POST", "/prefetch", `{"image":"nvidia/pytorch:17.12","rule":"dgx"}`, 400, "BAD_REQUEST"},
		{"POST", "/prefetch", `{"imag":"x"}`, 400, "BAD_REQUEST"},
		{"POST", "/prefetch", `not json`, 400, "BAD_REQUEST"},
		{"GET", "/prefetch", ``, 405, "UNSUPPORTED"},
		{"GET", "/jobs/nope", ``, 404, "JOB_UNKNOWN"},
		{"GET", "/tags", ``, 400, "NAME_INVALID"},
		{"GET", "/tags?repository=Bad//name", ``, 400, "NAME_INVALID"},
		{"GET", "/tags?repository=nvidia/no-such-image", ``, 404, "NAME_UNKNOWN"},
		{"GET", "/pulls?n=0", ``, 400, "BAD_REQUEST"},
		{"GET", "/tags?repository=nvidia/pytorch&monthly=maybe", ``, 400, "BAD_REQUEST"},
		{"GET", "/tags?repository=nvidia/pytorch&refresh=yes", ``, 400, "BAD_REQUEST"},
		{"GET", "/nothing", ``, 404, "NOT_FOUND"},
		// A registry's name alone or after another is no repository, nor
		// asked of the upstream as one.
		{"POST", "/prefetch", `{"image":"ghcr.io:1.0"}`, 400, "NAME_INVALID"},
		{"POST", "/prefetch", `{"image":"nvcr.io/docker.io:1"}`, 400, "NAME_INVALID"},
		{"GET", "/tags?repository=ghcr.io", ``, 400, "NAME_INVALID"},
		{"GET", "/tags?repository=nvcr.io/nvcr.io/nvidia/pytorch", ``, 400, "NAME_INVALID"},
		{"POST", "/prefetch", `{"spec":{"name":"x","repositories":["quay.io"],"tags":{"latest":1}}}`, 400, "RULE_INVALID"},
	} {
		st, code := a.call(c.method, admin.Prefix+c.path, c.body, nil)
		if st != c.status || code != c.code {
			t.Errorf("%s %s %s: %d %s, want %d %s", c.method, c.path, c.body, st, code, c.status, c.code)
		}
	}
	if jobs, _ := a.w.State.Jobs(context.Background()); len(jobs) != 0 {
		t.Errorf("bad requests queued jobs: %+v", jobs)
	}
}

// A single-platform image is checked against its config's platform.
func TestPrefetchSinglePlatformImage(t *testing.T) {
	a := newAPI(t)
	var resp struct{ Jobs []state.Job }
	if st, code := a.call(http.MethodPost, admin.Prefix+"/prefetch", `{"image":"nvidia/cuda:12.4.1-base-ubuntu22.04","platforms":["linux/amd64"]}`, &resp); st != http.StatusAccepted {
		t.Fatalf("amd64 image for linux/amd64: %d %s", st, code)
	}
	if j := a.w.WaitJob(t, resp.Jobs[0].ID, 20*time.Second); j.State != state.JobDone {
		t.Errorf("job = %+v", j)
	}
}

func TestParseImage(t *testing.T) {
	for in, want := range map[string][2]string{
		"nvidia/pytorch:24.05-py3":                      {"nvidia/pytorch", "24.05-py3"},
		"nvcr.io/nvidia/pytorch:24.05-py3":              {"nvidia/pytorch", "24.05-py3"},
		"nvidia/k8s/dcgm-exporter:3.3.5":                {"nvidia/k8s/dcgm-exporter", "3.3.5"},
		"nvidia/cuda@sha256:" + strings.Repeat("a", 64): {"nvidia/cuda", "sha256:" + strings.Repeat("a", 64)},
	} {
		repo, ref, err := admin.ParseImage(in, []string{"nvcr.io"})
		if err != nil || repo != want[0] || ref != want[1] {
			t.Errorf("ParseImage(%q) = %q %q %v", in, repo, ref, err)
		}
	}
}

// An ad hoc rule's concurrency and bandwidth apply to its jobs (a lower
// bound on time only).
func TestAdHocRuleBandwidth(t *testing.T) {
	a := newAPI(t)
	var resp struct{ Jobs []state.Job }
	body := `{"spec":{"name":"slow","repositories":["nvidia/pytorch"],"tags":{"exact":["17.12"]},"platforms":["linux/arm64"],"bandwidth":65536,"concurrency":1}}`
	start := time.Now()
	if st, code := a.call(http.MethodPost, admin.Prefix+"/prefetch", body, &resp); st != http.StatusAccepted || len(resp.Jobs) != 1 {
		t.Fatalf("prefetch: %d %s %+v", st, code, resp)
	}
	j := a.w.WaitJob(t, resp.Jobs[0].ID, 30*time.Second)
	took := time.Since(start)
	if j.State != state.JobDone || j.Bandwidth != 65536 || j.Concurrency != 1 {
		t.Fatalf("job = %+v", j)
	}
	// 64 KiB/s with a 32 KiB burst.
	if floor := time.Duration(float64(j.BytesTotal-(32<<10)) / 65536 * float64(time.Second)); took < floor*9/10 {
		t.Errorf("%d bytes at 64 KiB/s took %v, less than %v", j.BytesTotal, took, floor)
	}
}

// A rule's bandwidth is a size string as in the YAML ("10MiB") or a number
// of bytes.
func TestAdHocRuleSizeString(t *testing.T) {
	a := newAPI(t)
	for bw, want := range map[string]int64{`"10MiB"`: 10 << 20, `"1.5GB"`: 1.5e9, `2097152`: 2 << 20} {
		var resp struct{ Jobs []state.Job }
		body := `{"spec":{"name":"sized","repositories":["nvidia/pytorch"],"tags":{"exact":["17.12"]},"platforms":["linux/arm64"],"bandwidth":` + bw + `}}`
		if st, code := a.call(http.MethodPost, admin.Prefix+"/prefetch", body, &resp); st != http.StatusAccepted || len(resp.Jobs) != 1 {
			t.Fatalf("bandwidth %s: %d %s %+v", bw, st, code, resp)
		}
		a.w.WaitJob(t, resp.Jobs[0].ID, 20*time.Second)
		if got := resp.Jobs[0].Bandwidth; got != want {
			t.Errorf("bandwidth %s: job has %d, want %d", bw, got, want)
		}
	}
}

// With prefetch disabled in this process, a prefetch request is refused
// rather than queued forever.
func TestPrefetchDisabled(t *testing.T) {
	w := prefetchtest.New(t, prefetchtest.Options{})
	srv := httptest.NewServer(admin.New(w.Sched, w.Tracker, w.Pull, admin.Options{Token: token, PrefetchDisabled: true}))
	defer srv.Close()
	a := &api{t: t, w: w, srv: srv}
	if st, code := a.call(http.MethodPost, admin.Prefix+"/prefetch", `{"image":"nvidia/pytorch:17.12"}`, nil); st != http.StatusConflict || code != "UNSUPPORTED" {
		t.Errorf("prefetch with prefetch disabled: %d %s", st, code)
	}
	if jobs, _ := w.State.Jobs(context.Background()); len(jobs) != 0 {
		t.Errorf("queued %+v", jobs)
	}
}

// POST jobs/<id>/cancel cancels a running job (200, then listed under
// state=cancelled); a job that has ended gets 409 JOB_ENDED, an unknown
// one 404 JOB_UNKNOWN.
func TestCancelJob(t *testing.T) {
	a := newAPI(t)
	release := make(chan struct{})
	defer func() {
		close(release)
		testsupport.Eventually(t, 10*time.Second, "the stopped downloads to end", func() bool { return a.w.Fills.InFlight() == 0 })
	}()
	a.w.Up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !a.w.Up.IsCDN(r) {
			return false
		}
		select { // every blob download waits: the job stays running
		case <-release:
			return false
		case <-r.Context().Done():
			return true
		}
	})
	var resp struct{ Jobs []state.Job }
	if st, code := a.call(http.MethodPost, admin.Prefix+"/prefetch", `{"image":"nvidia/pytorch:17.12","platforms":["linux/arm64"]}`, &resp); st != http.StatusAccepted {
		t.Fatalf("prefetch: %d %s", st, code)
	}
	id := resp.Jobs[0].ID
	testsupport.Eventually(t, 15*time.Second, "the job to run", func() bool {
		j, _ := a.w.State.Job(context.Background(), id)
		return j.State == state.JobRunning
	})
	var j state.Job
	if st, code := a.call(http.MethodPost, admin.Prefix+"/jobs/"+id+"/cancel", "", &j); st != http.StatusOK || j.State != state.JobCancelled {
		t.Fatalf("cancel: %d %s %+v", st, code, j)
	}
	if st, _ := a.call(http.MethodPost, admin.Prefix+"/jobs/"+id+"/cancel", "", &j); st != http.StatusOK || j.State != state.JobCancelled {
		t.Errorf("second cancel: %d %+v", st, j)
	}
	if got := a.w.WaitJob(t, id, 10*time.Second); got.State != state.JobCancelled {
		t.Errorf("job = %+v", got)
	}
	var list struct{ Jobs []state.Job }
	if st, _ := a.call(http.MethodGet, admin.Prefix+"/jobs?state=cancelled", "", &list); st != 200 || len(list.Jobs) != 1 || list.Jobs[0].ID != id {
		t.Errorf("jobs?state=cancelled: %d %+v", st, list)
	}
	if st, code := a.call(http.MethodPost, admin.Prefix+"/jobs/nope/cancel", "", nil); st != http.StatusNotFound || code != "JOB_UNKNOWN" {
		t.Errorf("cancel of an unknown job: %d %s", st, code)
	}
	done := state.Job{ID: "done-job", State: state.JobDone, Created: time.Now(), Updated: time.Now(), Finished: time.Now()}
	if err := a.w.State.PutJob(context.Background(), done); err != nil {
		t.Fatal(err)
	}
	if st, code := a.call(http.MethodPost, admin.Prefix+"/jobs/done-job/cancel", "", nil); st != http.StatusConflict || code != "JOB_ENDED" {
		t.Errorf("cancel of a done job: %d %s", st, code)
	}
}

// The admin API's images and cache.pin are one syntax: each string is
// accepted by both or refused by both.
func TestImageSyntaxIsThePinSyntax(t *testing.T) {
	cfg := config.Default()
	for _, in := range []string{
		"nvidia/pytorch:24.05-py3", "nvcr.io/nvidia/pytorch:24.05-py3", "nvcr.io/nvidia/cuda@sha256:" + strings.Repeat("b", 64),
		"nvidia/cuda:12.4@sha256:" + strings.Repeat("b", 64), "docker.io/library/redis:7", "nvidia/pytorch", "nvcr.io/nvidia/pytorch",
		"Nvidia/pytorch:1", "nvidia/pytorch:-1", "nvidia/pytorch@sha256:zz",
	} {
		_, _, aerr := admin.ParseImage(in, cfg.UpstreamHosts())
		c := cfg
		c.Cache.Pin = []string{in}
		if cerr := c.Validate(); (aerr == nil) != (cerr == nil) {
			t.Errorf("%q: admin API %v, cache.pin %v", in, aerr, cerr)
		}
	}
}

// TestPrefetchFurtherUpstream: an image of a further upstream is named with
// its registry (the job, the tag view and the state use that qualified
// name), and its blobs come from that upstream; an unconfigured registry
// is refused.
func TestPrefetchFurtherUpstream(t *testing.T) {
	const reg = "ghcr.example"
	w := prefetchtest.New(t, prefetchtest.Options{Via: reg})
	w.Start(t)
	srv := httptest.NewServer(admin.New(w.Sched, w.Tracker, w.Pull, admin.Options{Token: token, UpstreamHosts: []string{"nvcr.io"}, Upstreams: []string{reg}}))
	t.Cleanup(srv.Close)
	a := &api{t: t, w: w, srv: srv}
	var resp struct{ Jobs []state.Job }
	if st, code := a.call(http.MethodPost, admin.Prefix+"/prefetch", `{"image":"`+reg+`/nvidia/pytorch:17.12","platforms":["linux/arm64"]}`, &resp); st != http.StatusAccepted {
		t.Fatalf("prefetch: %d %s", st, code)
	}
	if len(resp.Jobs) != 1 || resp.Jobs[0].Repository != reg+"/"+ngctest.PytorchRepo {
		t.Fatalf("jobs = %+v", resp.Jobs)
	}
	if j := w.WaitJob(t, resp.Jobs[0].ID, 20*time.Second); j.State != state.JobDone {
		t.Fatalf("job = %+v", j)
	}
	for _, b := range w.Fx.Pytorch.Child("linux/arm64").Blobs() {
		if n := w.Up.BlobFetches(b.Digest); n != 1 {
			t.Errorf("blob %s fetched %d times from the further upstream", b.Digest, n)
		}
	}
	var tags struct{ Tags []admin.TagInfo }
	if st, code := a.call(http.MethodGet, admin.Prefix+"/tags?repository="+reg+"/nvidia/pytorch", "", &tags); st != 200 || len(tags.Tags) == 0 {
		t.Fatalf("tags: %d %s %+v", st, code, tags)
	}
	if st, code := a.call(http.MethodPost, admin.Prefix+"/prefetch", `{"image":"quay.io/org/img:1"}`, nil); st != http.StatusBadRequest || code != "NAME_INVALID" {
		t.Errorf("an unconfigured registry: %d %s", st, code)
	}
}

// TestTagsOfDockerHubShortName (U1 F3): the tags API reads docker.io/ubuntu
// as docker.io/library/ubuntu, as prefetch, pins and the registry API do,
// and drops a default upstream host (nvcr.io/nvidia/pytorch).
func TestTagsOfDockerHubShortName(t *testing.T) {
	w := prefetchtest.New(t, prefetchtest.Options{Via: "docker.io"})
	if _, err := w.Up.AddRelease("library/ubuntu", "24.04", 1024); err != nil {
		t.Fatal(err)
	}
	w.Start(t)
	srv := httptest.NewServer(admin.New(w.Sched, w.Tracker, w.Pull, admin.Options{Token: token, UpstreamHosts: []string{"nvcr.io"}, Upstreams: []string{"docker.io"}}))
	t.Cleanup(srv.Close)
	a := &api{t: t, w: w, srv: srv}
	for _, name := range []string{"docker.io/ubuntu", "docker.io/library/ubuntu", "DOCKER.IO/ubuntu"} {
		var resp struct {
			Repository string
			Tags       []admin.TagInfo
		}
		st, code := a.call(http.MethodGet, admin.Prefix+"/tags?repository="+name+"&refresh=true", "", &resp)
		if st != http.StatusOK || resp.Repository != "docker.io/library/ubuntu" || len(resp.Tags) != 1 || resp.Tags[0].Name != "24.04" {
			t.Errorf("tags of %s: %d %s %+v", name, st, code, resp)
		}
	}
	for _, name := range []string{"quay.io/org/img", "docker.io/ubuntu:24.04"} {
		if st, code := a.call(http.MethodGet, admin.Prefix+"/tags?repository="+name, "", nil); st != http.StatusBadRequest || code != "NAME_INVALID" {
			t.Errorf("tags of %s: %d %s, want 400 NAME_INVALID", name, st, code)
		}
	}
}

// TestSpecNamingUnconfiguredRegistry (U1 F4): a spec whose repository names
// a registry that is no upstream is refused with Load's own message for
// the same rule in prefetch.rules, not accepted with no jobs.
func TestSpecNamingUnconfiguredRegistry(t *testing.T) {
	a := newAPI(t)
	req, _ := http.NewRequest(http.MethodPost, a.srv.URL+admin.Prefix+"/prefetch",
		strings.NewReader(`{"spec":{"name":"x","repositories":["quay.io/foo"],"tags":{"latest":1}}}`))
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var env struct {
		Errors []struct{ Code, Message string }
	}
	if err := json.NewDecoder(resp.Body).Decode(&env); err != nil || resp.StatusCode != http.StatusBadRequest || len(env.Errors) != 1 || env.Errors[0].Code != "RULE_INVALID" {
		t.Fatalf("spec of quay.io/foo: %d %+v (%v), want 400 RULE_INVALID", resp.StatusCode, env, err)
	}
	yaml := filepath.Join(t.TempDir(), "m.yaml")
	if err := os.WriteFile(yaml, []byte("prefetch:\n  rules:\n  - name: x\n    repositories: [quay.io/foo]\n    tags: {latest: 1}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, lerr := config.Load(yaml, func(string) string { return "" })
	const yamlKey, apiKey = "prefetch.rules[0].repositories: ", "spec.repositories: "
	if lerr == nil || !strings.Contains(lerr.Error(), yamlKey) {
		t.Fatalf("Load: %v", lerr)
	}
	_, want, _ := strings.Cut(lerr.Error(), yamlKey)
	if got := env.Errors[0].Message; got != apiKey+want {
		t.Errorf("message %q, want %q (Load's)", got, apiKey+want)
	}
	// A configured rule's form still works: nvidia/... has no registry.
	if st, code := a.call(http.MethodPost, admin.Prefix+"/prefetch", `{"spec":{"name":"y","repositories":["`+ngctest.PytorchRepo+`"],"tags":{"latest":1}}}`, nil); st != http.StatusAccepted {
		t.Errorf("a valid spec: %d %s", st, code)
	}
}
