// Package lease is the mirror's one lease primitive: a named key held by
// one owner for a time to live, which only its owner renews or releases,
// and which ends by itself when the owner stops renewing it (killed,
// partitioned). Every lease between replicas goes through it: the
// scheduler lock and the budget leader lock (state.Store.Lock, keys
// "<prefix>lock:scheduler" and "<prefix>lock:budget:<scope>"), manifest
// leases ("<prefix>lock:manifest:<scope>:<key>", internal/pull) and blob
// leases ("<prefix>cluster:lease:<digest>", internal/cluster).
//
// On Redis a lease is a string key whose value is the owner and whose
// expiry (PX, milliseconds, by the server's clock) is the TTL; three Lua
// scripts take, renew and release it, each checking the owner in the
// same step as the write, so that an expiry between a GET and a SET can
// never hand one lease to two owners. Local is the same contract inside
// one process (the embedded state store, which one process owns).
//
// The package is on its own, rather than in internal/state, because its
// users hold different Redis clients: the state store's, and the
// cluster's own connection (other timeouts, its own key space); neither
// should need the other's package for three scripts.
package lease

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Locker takes and releases named leases: what the scheduler, the shared
// budget's leader election and manifest fetches across replicas need of
// the state store.
type Locker interface {
	// Lock takes lease name for owner for ttl, or renews it when owner
	// holds it already. It returns false when another owner holds it. A
	// lease whose owner stops renewing it expires after ttl.
	Lock(ctx context.Context, name, owner string, ttl time.Duration) (bool, error)
	// Unlock releases the lease if owner holds it (else does nothing).
	Unlock(ctx context.Context, name, owner string) error
}

// acquireScript takes KEYS[1] for owner ARGV[1] for ARGV[2] ms when it is
// free, renews it when ARGV[1] holds it, and returns the holder (ARGV[1]
// when taken or renewed).
var acquireScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return v
end
if v == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return v`)

// renewScript extends KEYS[1] to ARGV[2] ms if ARGV[1] still holds it
// (1), else 0.
var renewScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0`)

// releaseScript deletes KEYS[1] if ARGV[1] holds it (1), else 0.
var releaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0`)

// ms is ttl in whole milliseconds, at least 1 (PX and PEXPIRE refuse 0).
func ms(ttl time.Duration) int64 { return max(ttl.Milliseconds(), 1) }

// Acquire takes the lease at key for owner for ttl, or renews it when
// owner holds it, and returns its holder: owner when this call holds it,
// else the other owner's value (never empty without an error). Errors:
// Redis's.
func Acquire(ctx context.Context, c redis.Scripter, key, owner string, ttl time.Duration) (holder string, err error) {
	holder, err = acquireScript.Run(ctx, c, []string{key}, owner, ms(ttl)).Text()
	if err == nil && holder == "" {
		return "", errors.New("lease: empty holder") // a value of "" is no owner's
	}
	return holder, err
}

// Renew extends the lease at key to ttl from now if owner still holds
// it; false when it does not (expired, or taken by another). Errors:
// Redis's.
func Renew(ctx context.Context, c redis.Scripter, key, owner string, ttl time.Duration) (bool, error) {
	n, err := renewScript.Run(ctx, c, []string{key}, owner, ms(ttl)).Int()
	return n == 1, err
}

// RenewAll is Renew for many keys of one owner in one pipeline (one round
// trip): held[i] reports whether owner still held keys[i]. Errors:
// Redis's (the pipeline's first).
func RenewAll(ctx context.Context, c redis.Cmdable, keys []string, owner string, ttl time.Duration) (held []bool, err error) {
	if len(keys) == 0 {
		return nil, nil
	}
	cmds := make([]*redis.Cmd, len(keys))
	_, err = c.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			// Eval, not Run: a pipeline cannot fall back from EVALSHA.
			cmds[i] = renewScript.Eval(ctx, p, []string{k}, owner, ms(ttl))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	held = make([]bool, len(keys))
	for i, c := range cmds {
		v, _ := c.Int()
		held[i] = v == 1
	}
	return held, nil
}

// Release deletes the lease at key if owner holds it (true), and does
// nothing otherwise (false). Breaking a dead owner's lease is a Release
// in its name. Errors: Redis's.
func Release(ctx context.Context, c redis.Scripter, key, owner string) (bool, error) {
	n, err := releaseScript.Run(ctx, c, []string{key}, owner).Int()
	return n == 1, err
}

// Redis is a Locker on a Redis server: lease name is the key
// Prefix+name.
type Redis struct {
	C      redis.Scripter
	Prefix string
}

// Lock implements Locker (Acquire).
func (r Redis) Lock(ctx context.Context, name, owner string, ttl time.Duration) (bool, error) {
	h, err := Acquire(ctx, r.C, r.Prefix+name, owner, ttl)
	return err == nil && h == owner, err
}

// Unlock implements Locker (Release).
func (r Redis) Unlock(ctx context.Context, name, owner string) error {
	_, err := Release(ctx, r.C, r.Prefix+name, owner)
	return err
}

// Local is a Locker within one process (by the local clock). The zero
// value is ready to use.
type Local struct {
	mu     sync.Mutex
	leases map[string]held // name → holder
}

type held struct {
	owner   string
	expires time.Time
}

// Lock implements Locker. It never fails.
func (l *Local) Lock(_ context.Context, name, owner string, ttl time.Duration) (bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	if h, ok := l.leases[name]; ok && h.owner != owner && now.Before(h.expires) {
		return false, nil
	}
	if l.leases == nil {
		l.leases = map[string]held{}
	}
	for k, h := range l.leases { // expired ones, so that the map stays small
		if !now.Before(h.expires) {
			delete(l.leases, k)
		}
	}
	l.leases[name] = held{owner: owner, expires: now.Add(ttl)}
	return true, nil
}

// Unlock implements Locker. It never fails.
func (l *Local) Unlock(_ context.Context, name, owner string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if h, ok := l.leases[name]; ok && h.owner == owner {
		delete(l.leases, name)
	}
	return nil
}

var (
	_ Locker = Redis{}
	_ Locker = (*Local)(nil)
)
