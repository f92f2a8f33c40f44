package tracking_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/prefetch/prefetchtest"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
	"github.com/ngc-mirror/ngc-mirror/internal/state/redistest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
	"github.com/ngc-mirror/ngc-mirror/internal/tracking"
)

// backends runs f on the embedded store and on a real redis-server.
func backends(t *testing.T, f func(t *testing.T, o prefetchtest.Options)) {
	t.Run("embedded", func(t *testing.T) { f(t, prefetchtest.Options{}) })
	t.Run("redis", func(t *testing.T) { f(t, prefetchtest.Options{Redis: redistest.Start(t)}) })
}

func names(tags []state.Tag) []string {
	var out []string
	for _, t := range tags {
		out = append(out, t.Name)
	}
	return out
}

func TestPollDetectsNewTagsAndReleases(t *testing.T) {
	backends(t, func(t *testing.T, o prefetchtest.Options) {
		w := prefetchtest.New(t, o)
		ctx := context.Background()
		repo := ngctest.PytorchRepo
		res, err := w.Tracker.Poll(ctx, repo)
		if err != nil {
			t.Fatal(err)
		}
		if res.Tags != 2 || len(res.New) != 0 || res.Resolved != 2 {
			t.Fatalf("first poll (baseline) = %+v", res)
		}
		tags, _ := w.State.Tags(ctx, repo)
		if !slices.Equal(names(tags), []string{"17.12", "18.01-py3"}) {
			t.Fatalf("tags = %v", names(tags))
		}
		if tags[0].Digest != w.Fx.Pytorch.Manifest.Digest.String() ||
			!slices.Equal(tags[0].Platforms, []string{"linux/amd64", "linux/arm64"}) || tags[0].FirstSeen.IsZero() {
			t.Errorf("17.12 = %+v", tags[0])
		}
		first := tags[0].FirstSeen

		// NGC publishes a new month, a signature and an old-release variant.
		idx, err := w.Up.AddRelease(repo, "24.05-py3", 4<<10)
		if err != nil {
			t.Fatal(err)
		}
		w.Up.AddTag(repo, "sha256-"+idx.Manifest.Digest.Encoded()+".sig", idx.Manifest.Digest)
		w.Up.AddTag(repo, "17.12-py3", w.Fx.Pytorch.Manifest.Digest)
		res, err = w.Tracker.Poll(ctx, repo)
		if err != nil {
			t.Fatal(err)
		}
		wantNew := []string{"17.12-py3", "24.05-py3", "sha256-" + idx.Manifest.Digest.Encoded() + ".sig"}
		if !slices.Equal(names(res.New), wantNew) {
			t.Errorf("new = %v, want %v", names(res.New), wantNew)
		}
		// 17.12-py3 is older than the known py3 release 18.01: not a new release.
		if !slices.Equal(names(res.Releases), []string{"24.05-py3"}) {
			t.Errorf("new releases = %v, want [24.05-py3]", names(res.Releases))
		}
		if got := testutil.ToFloat64(w.Metrics.TagsDiscovered.WithLabelValues("tag")); got != 3 {
			t.Errorf("tags discovered metric = %v, want 3", got)
		}
		if got := testutil.ToFloat64(w.Metrics.TagsDiscovered.WithLabelValues("release")); got != 1 {
			t.Errorf("releases discovered metric = %v, want 1", got)
		}
		tags, _ = w.State.Tags(ctx, repo)
		for _, tg := range tags {
			if tg.Name == "24.05-py3" && tg.Digest != idx.Manifest.Digest.String() {
				t.Errorf("24.05-py3 digest = %s", tg.Digest)
			}
			if tg.Name == "17.12" && (!tg.FirstSeen.Equal(first) || !tg.LastSeen.After(first)) {
				t.Errorf("17.12 first/last seen = %v / %v (first poll %v)", tg.FirstSeen, tg.LastSeen, first)
			}
		}
		// Nothing new: nothing reported.
		if res, err = w.Tracker.Poll(ctx, repo); err != nil || len(res.New) != 0 {
			t.Errorf("third poll: %+v %v", res, err)
		}
	})
}

func TestPollFollowsLinkPagination(t *testing.T) {
	w := prefetchtest.New(t, prefetchtest.Options{Tracking: tracking.Options{ResolvePerPoll: 10}})
	ctx := context.Background()
	repo := ngctest.CUDARepo
	for i := range 2500 {
		w.Up.AddTag(repo, fmt.Sprintf("12.%d.0-base-ubuntu22.04", i), w.Fx.CUDA.Manifest.Digest)
	}
	res, err := w.Tracker.Poll(ctx, repo)
	if err != nil {
		t.Fatal(err)
	}
	if res.Tags != 2501 || res.Resolved != 10 {
		t.Fatalf("poll = tags %d resolved %d, want 2501 and 10", res.Tags, res.Resolved)
	}
	pages := 0
	for _, r := range w.Up.Requests() {
		if r.Method == http.MethodGet && r.Path == "/v2/"+repo+"/tags/list" && r.Host == "registry" && r.Auth == "Bearer" { // not the 401 that taught the token realm
			pages++
		}
	}
	// The fake, like nvcr.io, sends 100 a page whatever n (1000) asks.
	if want := (2501 + ngctest.TagPageSize - 1) / ngctest.TagPageSize; pages != want {
		t.Errorf("tag list pages fetched = %d, want %d (%d a page)", pages, want, ngctest.TagPageSize)
	}
	tags, _ := w.State.Tags(ctx, repo)
	if len(tags) != 2501 {
		t.Errorf("stored %d tags", len(tags))
	}
	// The next poll resolves the next 10 and reports nothing new.
	if res, err = w.Tracker.Poll(ctx, repo); err != nil || res.Resolved != 10 || len(res.New) != 0 {
		t.Errorf("second poll = %+v, %v", res, err)
	}
}

func get(t *testing.T, w *prefetchtest.World, method, path string) {
	t.Helper()
	req, _ := http.NewRequest(method, w.Server.URL+path, nil)
	req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s %s: %d", method, path, resp.StatusCode)
	}
}

// The pull history learns the platform a client picked from an index, for
// Docker's sequence (GET tag, GET child) and containerd's (HEAD tag, GET
// index by digest, GET child).
func TestPullHistoryLearnsPlatforms(t *testing.T) {
	backends(t, func(t *testing.T, o prefetchtest.Options) {
		w := prefetchtest.New(t, o)
		w.Start(t)
		repo, idx := ngctest.PytorchRepo, w.Fx.Pytorch
		arm, amd := idx.Child("linux/arm64"), idx.Child("linux/amd64")
		get(t, w, http.MethodGet, "/v2/"+repo+"/manifests/17.12")
		get(t, w, http.MethodGet, "/v2/"+repo+"/manifests/"+arm.Manifest.Digest.String())
		get(t, w, http.MethodHead, "/v2/"+repo+"/manifests/18.01-py3")
		get(t, w, http.MethodGet, "/v2/"+repo+"/manifests/"+idx.Manifest.Digest.String())
		get(t, w, http.MethodGet, "/v2/"+repo+"/manifests/"+amd.Manifest.Digest.String())
		get(t, w, http.MethodHead, "/v2/"+repo+"/manifests/"+amd.Manifest.Digest.String()) // a repeat: not a pull
		// A pull by digest alone, in another repository.
		get(t, w, http.MethodGet, "/v2/"+ngctest.CUDARepo+"/manifests/"+w.Fx.CUDA.Manifest.Digest.String())
		want := []state.Usage{
			{Repository: ngctest.CUDARepo, Count: 1},
			{Repository: repo, Tag: "17.12", Count: 1},
			{Repository: repo, Tag: "17.12", Platform: "linux/arm64", Count: 1},
			{Repository: repo, Tag: "18.01-py3", Count: 1},
			{Repository: repo, Tag: "18.01-py3", Platform: "linux/amd64", Count: 1},
		}
		var got []state.Usage
		testsupport.Eventually(t, 5*time.Second, "pulls recorded", func() bool {
			got, _ = w.State.Usage(context.Background(), time.Now().Add(-time.Hour))
			return len(got) == len(want)
		})
		for i := range want {
			if got[i].Tag != want[i].Tag || got[i].Platform != want[i].Platform || got[i].Count != want[i].Count || got[i].Repository != want[i].Repository {
				t.Errorf("usage[%d] = %+v, want %+v", i, got[i], want[i])
			}
		}
		pulls, _ := w.State.RecentPulls(context.Background(), 10)
		if len(pulls) != 5 || pulls[0].Client != "127.0.0.1" || pulls[1].Digest != amd.Manifest.Digest.String() {
			t.Errorf("pull log = %+v", pulls)
		}
		tracked, _ := w.Tracker.Tracked(context.Background())
		if !slices.Contains(tracked, repo) {
			t.Errorf("a pulled repository is not tracked: %v", tracked)
		}
	})
}

// Redis stopped: pulls go on (served, not recorded, counted), polling
// pauses with a state error; Redis back: both resume.
func TestRedisOutageWhilePulling(t *testing.T) {
	srv := redistest.Start(t)
	if srv.Addr == "" {
		t.Skip("needs a throwaway redis-server (MIRROR_TEST_REDIS_URL is set)")
	}
	w := prefetchtest.New(t, prefetchtest.Options{Redis: srv})
	w.Start(t)
	repo := ngctest.PytorchRepo
	ctx := context.Background()
	get(t, w, http.MethodGet, "/v2/"+repo+"/manifests/17.12")
	testsupport.Eventually(t, 5*time.Second, "first pull recorded", func() bool {
		u, _ := w.State.Usage(ctx, time.Time{})
		return len(u) == 1
	})

	srv.Stop()
	for range 5 {
		get(t, w, http.MethodGet, "/v2/"+repo+"/manifests/18.01-py3")
		get(t, w, http.MethodGet, "/v2/"+repo+"/blobs/"+w.Fx.Pytorch.Child("linux/amd64").Config.Digest.String())
	}
	testsupport.Eventually(t, 10*time.Second, "dropped pulls counted", func() bool {
		return testutil.ToFloat64(w.Metrics.PullsDropped) >= 1
	})
	if _, err := w.Tracker.Poll(ctx, repo); !errors.Is(err, tracking.ErrState) {
		t.Errorf("poll with Redis down: %v, want a state error", err)
	}

	srv.Restart(t) // an empty server: like a Redis that lost its data
	testsupport.Eventually(t, 10*time.Second, "pull history resumed", func() bool {
		get(t, w, http.MethodGet, "/v2/"+repo+"/manifests/17.12")
		u, _ := w.State.Usage(ctx, time.Time{})
		return len(u) >= 1
	})
	if _, err := w.Tracker.Poll(ctx, repo); err != nil {
		t.Errorf("poll after Redis came back: %v", err)
	}
}

// A tag that moves upstream (latest) is followed once its digest is older
// than Reresolve.
func TestMovedTagIsReresolved(t *testing.T) {
	w := prefetchtest.New(t, prefetchtest.Options{Tracking: tracking.Options{Reresolve: time.Millisecond}})
	ctx := context.Background()
	repo := ngctest.PytorchRepo
	w.Up.AddTag(repo, "latest", w.Fx.Pytorch.Manifest.Digest)
	if _, err := w.Tracker.Poll(ctx, repo); err != nil {
		t.Fatal(err)
	}
	idx, err := w.Up.AddRelease(repo, "24.05-py3", 4<<10)
	if err != nil {
		t.Fatal(err)
	}
	w.Up.AddTag(repo, "latest", idx.Manifest.Digest)
	time.Sleep(5 * time.Millisecond)
	if _, err := w.Tracker.Poll(ctx, repo); err != nil {
		t.Fatal(err)
	}
	tags, _ := w.State.Tags(ctx, repo)
	for _, tg := range tags {
		if tg.Name == "latest" && (tg.Digest != idx.Manifest.Digest.String() || tg.Resolved.IsZero()) {
			t.Errorf("latest = %s (resolved %v), want the moved-to %s", tg.Digest, tg.Resolved, idx.Manifest.Digest)
		}
	}
}
