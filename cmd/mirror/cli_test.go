package main

import (
	"bytes"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/state"
)

// lockedBuffer is a bytes.Buffer the bar's own goroutine may write to.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// A redraw with a shorter description clears the rest of the line, so no
// characters of the longer one are left on screen.
func TestBarClearsToEndOfLine(t *testing.T) {
	var buf lockedBuffer
	bar := newBar(&buf, "x")
	j := state.Job{Repository: "nvidia/pytorch", Reference: "24.05-py3", State: state.JobRunning, BlobsTotal: 12, BlobsDone: 3,
		BytesTotal: 1000, BytesDone: 300, BytesFetched: 300, Current: "sha256:" + strings.Repeat("a", 64)}
	showProgress(bar, j)
	_ = bar.RenderBlank()
	long := len(buf.String())
	j.Current, j.BlobsDone, j.BytesDone, j.BytesFetched = "", 12, 1000, 1000
	time.Sleep(250 * time.Millisecond) // past the bar's redraw throttle
	showProgress(bar, j)
	_ = bar.Finish()
	redraw := buf.String()[long:]
	if !strings.Contains(redraw, "\x1b[0K") && !strings.Contains(redraw, "\x1b[K") && !strings.Contains(redraw, "\x1b[2K") {
		t.Errorf("the redraw does not clear to the end of the line: %q", redraw)
	}
}

// A job that found everything cached says so, with no rate; one that
// fetched gives what it fetched and the rate of that alone; a failed or
// cancelled one exits 1.
func TestReport(t *testing.T) {
	t0 := time.Date(2026, 12, 2, 10, 0, 0, 0, time.UTC)
	base := state.Job{ID: "abc", Repository: "nvidia/pytorch", Reference: "24.05-py3", State: state.JobDone, Started: t0, Finished: t0.Add(2 * time.Second),
		BlobsTotal: 4, BlobsDone: 4, BytesTotal: 8 << 20, BytesDone: 8 << 20}
	for _, c := range []struct {
		name     string
		edit     func(*state.Job)
		code     int
		want     []string
		unwanted []string
	}{
		{"cached", func(*state.Job) {}, 0, []string{"nvidia/pytorch:24.05-py3: already cached (4 blobs, 8.0 MiB), job abc"}, []string{"/s", "prefetched"}},
		{"fetched", func(j *state.Job) { j.BlobsFetched, j.BytesFetched = 1, 4<<20 }, 0,
			[]string{"prefetched nvidia/pytorch:24.05-py3: 4 blobs (1 fetched, 3 already cached), 4.0 MiB fetched in 2s, 2.0 MiB/s"}, []string{"already cached ("}},
		{"failed", func(j *state.Job) { j.State, j.Errors = state.JobFailed, []string{"blob x: boom"} }, 1, []string{"failed", "blob x: boom"}, nil},
		{"cancelled", func(j *state.Job) { j.State, j.BlobsDone = state.JobCancelled, 2 }, 1, []string{"cancelled (2/4 blobs cached)"}, nil},
	} {
		j := base
		c.edit(&j)
		var out, errOut bytes.Buffer
		code := report(&out, &errOut, j)
		all := out.String() + errOut.String()
		if code != c.code {
			t.Errorf("%s: exit %d, want %d", c.name, code, c.code)
		}
		for _, w := range c.want {
			if !strings.Contains(all, w) {
				t.Errorf("%s: %q lacks %q", c.name, all, w)
			}
		}
		for _, u := range c.unwanted {
			if strings.Contains(all, u) {
				t.Errorf("%s: %q has %q", c.name, all, u)
			}
		}
	}
}

// TestProgressBeforeSizes: a job that has not resolved its image yet (no
// blob counted) shows its state, not "0/0 blobs" or "0 of 0 bytes"; once
// sized, blobs and bytes.
func TestProgressBeforeSizes(t *testing.T) {
	j := state.Job{Repository: "nvidia/pytorch", Reference: "24.05-py3", State: state.JobQueued}
	for _, c := range []struct {
		edit func(*state.Job)
		want string
	}{
		{func(*state.Job) {}, "nvidia/pytorch:24.05-py3 [queued]"},
		{func(j *state.Job) { j.State = state.JobRunning }, "nvidia/pytorch:24.05-py3 [running: resolving the image]"},
		{func(j *state.Job) {
			j.State, j.BlobsTotal, j.BlobsDone, j.BytesTotal, j.BytesDone = state.JobRunning, 4, 1, 8<<20, 2<<20
		}, "nvidia/pytorch:24.05-py3 [running 1/4 blobs] 2.0 MiB of 8.0 MiB"},
	} {
		c.edit(&j)
		if got := progressLine(j); got != c.want {
			t.Errorf("progress line %q, want %q", got, c.want)
		}
		if strings.Contains(progressText(j), "0/0") {
			t.Errorf("progress text %q", progressText(j))
		}
	}
}
