package lease_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/ngc-mirror/ngc-mirror/internal/lease"
	"github.com/ngc-mirror/ngc-mirror/internal/state/redistest"
)

// The Locker contract with expiry is in internal/state/statetest (Redis
// and Local behind the state store); these check the Redis primitives
// themselves: holders, owner checks and TTLs (read with PTTL, not waited
// for).

func client(t *testing.T) *redis.Client {
	t.Helper()
	opt, err := redis.ParseURL(redistest.Start(t).URL)
	if err != nil {
		t.Fatal(err)
	}
	c := redis.NewClient(opt)
	t.Cleanup(func() { c.Close() })
	return c
}

func pttl(t *testing.T, c *redis.Client, key string) time.Duration {
	t.Helper()
	d, err := c.PTTL(t.Context(), key).Result()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestAcquireRenewRelease(t *testing.T) {
	t.Parallel()
	c := client(t)
	ctx := t.Context()
	const key = "ngc-mirror:cluster:lease:sha256:aa"

	h, err := lease.Acquire(ctx, c, key, "A", 10*time.Second)
	if err != nil || h != "A" {
		t.Fatalf("A acquires a free lease: holder %q, %v", h, err)
	}
	if d := pttl(t, c, key); d <= 0 || d > 10*time.Second {
		t.Fatalf("PTTL after acquire = %v, want (0, 10s]", d)
	}
	if h, err := lease.Acquire(ctx, c, key, "B", time.Minute); err != nil || h != "A" {
		t.Fatalf("B acquires A's lease: holder %q, %v; want A", h, err)
	}
	if d := pttl(t, c, key); d > 10*time.Second {
		t.Fatalf("B's acquire changed A's TTL to %v", d)
	}
	// Acquire by the holder renews.
	if h, err := lease.Acquire(ctx, c, key, "A", time.Minute); err != nil || h != "A" {
		t.Fatalf("A acquires again: holder %q, %v", h, err)
	}
	if d := pttl(t, c, key); d <= 10*time.Second {
		t.Fatalf("PTTL after A's second acquire = %v, want > 10s", d)
	}

	if ok, err := lease.Renew(ctx, c, key, "B", time.Hour); err != nil || ok {
		t.Fatalf("B renews A's lease: %v %v", ok, err)
	}
	if ok, err := lease.Renew(ctx, c, key, "A", time.Hour); err != nil || !ok {
		t.Fatalf("A renews: %v %v", ok, err)
	}
	if d := pttl(t, c, key); d <= time.Minute {
		t.Fatalf("PTTL after renew = %v, want > 1m", d)
	}

	if ok, err := lease.Release(ctx, c, key, "B"); err != nil || ok {
		t.Fatalf("B releases A's lease: %v %v", ok, err)
	}
	if v, _ := c.Get(ctx, key).Result(); v != "A" {
		t.Fatalf("after B's release the lease holds %q, want A", v)
	}
	if ok, err := lease.Release(ctx, c, key, "A"); err != nil || !ok {
		t.Fatalf("A releases: %v %v", ok, err)
	}
	if n, _ := c.Exists(ctx, key).Result(); n != 0 {
		t.Fatal("the lease key is still there after its holder released it")
	}
	if ok, err := lease.Renew(ctx, c, key, "A", time.Minute); err != nil || ok {
		t.Fatalf("A renews a released lease: %v %v", ok, err)
	}
	if h, err := lease.Acquire(ctx, c, key, "B", time.Minute); err != nil || h != "B" {
		t.Fatalf("B acquires the released lease: holder %q, %v", h, err)
	}
}

func TestRenewAll(t *testing.T) {
	t.Parallel()
	c := client(t)
	ctx := t.Context()
	keys := []string{"l:1", "l:2", "l:3"}
	for _, k := range keys[:2] {
		if h, err := lease.Acquire(ctx, c, k, "A", 10*time.Second); err != nil || h != "A" {
			t.Fatalf("acquire %s: %q %v", k, h, err)
		}
	}
	if h, _ := lease.Acquire(ctx, c, keys[2], "B", 10*time.Second); h != "B" {
		t.Fatal("B could not take l:3")
	}
	held, err := lease.RenewAll(ctx, c, keys, "A", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(held) != "[true true false]" {
		t.Fatalf("held = %v, want [true true false]", held)
	}
	for i, k := range keys {
		d := pttl(t, c, k)
		if renewed := d > 10*time.Second; renewed != held[i] {
			t.Errorf("%s: PTTL %v, renewed %v", k, d, held[i])
		}
	}
	if held, err := lease.RenewAll(ctx, c, nil, "A", time.Hour); err != nil || held != nil {
		t.Errorf("no keys: %v %v", held, err)
	}
}

// TestRedisLocker: Locker's names are keys under Prefix, shared with
// Acquire (one lease, two ways to reach it), and many contenders at once
// get one winner.
func TestRedisLocker(t *testing.T) {
	t.Parallel()
	c := client(t)
	ctx := t.Context()
	l := lease.Redis{C: c, Prefix: "ngc-mirror:lock:"}
	if ok, err := l.Lock(ctx, "scheduler", "A", time.Minute); err != nil || !ok {
		t.Fatalf("A locks: %v %v", ok, err)
	}
	if h, _ := lease.Acquire(ctx, c, "ngc-mirror:lock:scheduler", "B", time.Minute); h != "A" {
		t.Fatalf("the key's holder is %q, want A", h)
	}
	if err := l.Unlock(ctx, "scheduler", "B"); err != nil {
		t.Fatal(err)
	}
	if ok, _ := l.Lock(ctx, "scheduler", "B", time.Minute); ok {
		t.Fatal("B's unlock released A's lock")
	}
	if err := l.Unlock(ctx, "scheduler", "A"); err != nil {
		t.Fatal(err)
	}
	if ok, _ := l.Lock(ctx, "scheduler", "B", time.Minute); !ok {
		t.Fatal("lock not free after its owner's unlock")
	}

	for _, lk := range []lease.Locker{l, &lease.Local{}} {
		var wg sync.WaitGroup
		var mu sync.Mutex
		wins := 0
		for i := range 16 {
			wg.Go(func() {
				ok, err := lk.Lock(context.Background(), "race", fmt.Sprint("owner-", i), time.Minute)
				if err == nil && ok {
					mu.Lock()
					wins++
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		if wins != 1 {
			t.Errorf("%T: %d contenders won, want 1", lk, wins)
		}
	}
}
