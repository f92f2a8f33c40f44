package state_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/state"
	"github.com/ngc-mirror/ngc-mirror/internal/state/redistest"
	"github.com/ngc-mirror/ngc-mirror/internal/state/statetest"
)

func TestRedisContract(t *testing.T) {
	statetest.Run(t,
		func(t *testing.T) state.Store { return redistest.Start(t).Open(t) },
		func(t *testing.T) (state.Store, state.Store) {
			srv := redistest.Start(t)
			return srv.Open(t), srv.Open(t)
		})
}

func TestBoltContract(t *testing.T) {
	open := func(t *testing.T) *state.Bolt {
		b, err := state.OpenBolt(filepath.Join(t.TempDir(), "state.db"), 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Close() })
		return b
	}
	statetest.Run(t,
		func(t *testing.T) state.Store { return open(t) },
		// One process owns a bolt file: two "replicas" share the handle.
		func(t *testing.T) (state.Store, state.Store) { b := open(t); return b, b })
}

func TestBoltSurvivesReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	b, err := state.OpenBolt(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := b.PutJob(ctx, state.Job{ID: "j", State: state.JobRunning, Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	// A second opener waits for the file lock and gives up.
	if _, err := state.OpenBolt(path, 100*time.Millisecond); !errors.Is(err, state.ErrLocked) {
		t.Fatalf("a second opener of a held state file: %v, want ErrLocked", err)
	}
	b.Close()
	b, err = state.OpenBolt(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if j, err := b.Job(ctx, "j"); err != nil || j.State != state.JobRunning {
		t.Fatalf("after reopen: %+v %v", j, err)
	}
}

// A stopped Redis makes calls fail fast (within the timeout), and the same
// client works again once the server is back.
func TestRedisOutageAndReconnect(t *testing.T) {
	srv := redistest.Start(t)
	if srv.Addr == "" {
		t.Skip("needs a throwaway server (MIRROR_TEST_REDIS_URL is set)")
	}
	r, err := state.OpenRedis(srv.URL, state.RedisOptions{Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx := context.Background()
	if err := r.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	start := time.Now()
	if err := r.RecordPull(ctx, state.Pull{Repository: "a/b", Time: time.Now()}); err == nil {
		t.Fatal("RecordPull succeeded with the server down")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("a call with the server down took %v", d)
	}
	srv.Restart(t)
	var perr error
	for range 50 {
		if perr = r.RecordPull(ctx, state.Pull{Repository: "a/b", Time: time.Now()}); perr == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if perr != nil {
		t.Fatalf("no reconnect: %v", perr)
	}
}

func TestOpenRedisHidesPassword(t *testing.T) {
	_, err := state.OpenRedis("redis://:s3cr3t@host:notaport/0", state.RedisOptions{})
	if err == nil {
		t.Fatal("bad URL accepted")
	}
	if got := err.Error(); strings.Contains(got, "s3cr3t") {
		t.Errorf("error leaks the password: %s", got)
	}
}
