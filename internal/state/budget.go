package state

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// The shared cache budget: what replicas whose caches are one bucket tell
// each other so that eviction keeps one budget (internal/evict). Only
// Redis implements it; the embedded store belongs to one process, whose
// budget needs nobody else.
//
// Every replica keeps its own index of the bucket (seeded from a listing
// at start) and publishes what changes it, in batches: commits and
// removals it made and the objects its clients used (BudgetChange), on
// one stream per scope that every replica reads. Leases are not published
// one by one: the replica that evicts (the budget's leader) first dooms a
// batch of objects (BudgetDoom); every live replica then, at its next
// exchange, stops granting leases on them and answers with those it is
// serving (BudgetReplica.Leases, vetoes) and the generation it has seen;
// the leader removes what nobody vetoed once every live replica has seen
// the batch.

// Budget change operations and kinds (BudgetChange.Op, .Kind).
const (
	BudgetAdded   = 'a' // committed, Size bytes
	BudgetRemoved = 'd'
	BudgetTouched = 't' // used at Time
	BudgetBlob    = 'b'
	BudgetMeta    = 'm' // a manifest
)

// BudgetChange is one change of a shared cache as a replica saw it.
type BudgetChange struct {
	Op     byte   // BudgetAdded, BudgetRemoved or BudgetTouched
	Kind   byte   // BudgetBlob or BudgetMeta
	Digest string // "sha256:..."
	Size   int64  // bytes (BudgetAdded)
	Time   int64  // Unix nanoseconds of the commit or use
}

// BudgetReplica is a replica's presence on a shared budget, rewritten at
// each exchange and dropped when it stops (after its ttl).
type BudgetReplica struct {
	Owner string `json:"owner"`
	// Seen is the highest doom generation (BudgetView.Gen) this replica
	// has acted on: it grants no new lease on those objects.
	Seen int64 `json:"seen"`
	// Leases are the doomed digests it is serving now (vetoes).
	Leases []string `json:"leases,omitempty"`
	// Reserved is bytes admitted for fills not committed yet.
	Reserved int64 `json:"reserved"`
	// Fills is Reserved by blob digest ("sha256:..." → bytes). A reader
	// that already counts a blob as cached (its BudgetAdded change came
	// with or before this presence) does not count its reservation again.
	// Nil from replicas that predate it: Reserved alone then counts.
	Fills map[string]int64 `json:"fills,omitempty"`
}

// BudgetView is what BudgetPoll returns.
type BudgetView struct {
	Changes  []BudgetChange  // published by other owners after the cursor, in order
	Cursor   string          // pass to the next BudgetPoll
	Gen      int64           // current doom generation
	Doomed   []string        // digests a leader is about to remove
	Replicas []BudgetReplica // the live replicas (the caller included once it published)
	More     bool            // max entries were read: call again for the rest
	Kicked   int64           // bytes a replica asked room for (0: none; consumed when the caller leads)
	Full     bool            // the leader's last pass could free nothing
}

// BudgetBus is the shared budget's channel between replicas (*Redis).
// scope names the shared cache (bucket and prefix): replicas on other
// buckets that share the Redis server never mix.
type BudgetBus interface {
	// BudgetPoll returns the changes other owners published after cursor
	// ("" from the start of the retained history), at most max of them
	// (more follow at the next call), and the doom set, replicas and
	// flags. lead consumes a kick.
	BudgetPoll(ctx context.Context, scope, owner, cursor string, max int, lead bool) (BudgetView, error)
	// BudgetPublish appends changes (one stream entry) and rewrites the
	// replica's presence, which expires after ttl.
	BudgetPublish(ctx context.Context, scope string, r BudgetReplica, changes []BudgetChange, ttl time.Duration) error
	// BudgetReplicas returns the live replicas' presences.
	BudgetReplicas(ctx context.Context, scope string) ([]BudgetReplica, error)
	// BudgetDoom adds digests to the doom set (which expires after ttl
	// unless doomed again; no digests only renews it) and returns the new
	// generation.
	BudgetDoom(ctx context.Context, scope string, digests []string, ttl time.Duration) (int64, error)
	// BudgetUndoom removes digests from the doom set.
	BudgetUndoom(ctx context.Context, scope string, digests []string) error
	// BudgetKick asks the leader for a pass that makes room for bytes
	// (the largest request waiting wins).
	BudgetKick(ctx context.Context, scope string, bytes int64, ttl time.Duration) error
	// BudgetSetFull records (for ttl) or clears the leader's verdict that
	// nothing can be evicted.
	BudgetSetFull(ctx context.Context, scope string, full bool, ttl time.Duration) error
}

var _ BudgetBus = (*Redis)(nil)

// BudgetLogMax bounds the change stream (entries, approximately): a
// replica starting replays what is retained after its listing.
const BudgetLogMax = 10000

func (r *Redis) bk(scope, name string) string { return r.prefix + "budget:" + scope + ":" + name }

func encodeChanges(cs []BudgetChange) string {
	var b strings.Builder
	for _, c := range cs {
		b.WriteByte(c.Op)
		b.WriteByte(c.Kind)
		b.WriteByte(' ')
		b.WriteString(c.Digest)
		b.WriteByte(' ')
		b.WriteString(strconv.FormatInt(c.Size, 10))
		b.WriteByte(' ')
		b.WriteString(strconv.FormatInt(c.Time, 10))
		b.WriteByte('\n')
	}
	return b.String()
}

func decodeChanges(s string, out []BudgetChange) []BudgetChange {
	for line := range strings.SplitSeq(s, "\n") {
		f := strings.Fields(line)
		if len(f) != 4 || len(f[0]) != 2 {
			continue
		}
		size, _ := strconv.ParseInt(f[2], 10, 64)
		t, _ := strconv.ParseInt(f[3], 10, 64)
		out = append(out, BudgetChange{Op: f[0][0], Kind: f[0][1], Digest: f[1], Size: size, Time: t})
	}
	return out
}

// budgetState reads the live replicas (dropping expired ones), the doom
// set and generation, and the flags, by the server's clock.
// KEYS: replicas (zset owner → expiry ms), presence (hash owner → JSON),
// doomed (set), gen, kick, full. ARGV: 1 to consume the kick, 1 to
// return the doom set.
var budgetState = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, o in ipairs(dead) do
  redis.call('ZREM', KEYS[1], o)
  redis.call('HDEL', KEYS[2], o)
end
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
local pres = {}
for i, o in ipairs(live) do pres[i] = redis.call('HGET', KEYS[2], o) or '' end
local doomed = {}
if ARGV[2] == '1' then doomed = redis.call('SMEMBERS', KEYS[3]) end
local gen = redis.call('GET', KEYS[4]) or '0'
local kick = '0'
if ARGV[1] == '1' then
  kick = redis.call('GET', KEYS[5]) or '0'
  redis.call('DEL', KEYS[5])
end
local full = redis.call('EXISTS', KEYS[6])
return {gen, doomed, pres, kick, full}`)

// budgetPresence rewrites a presence with an expiry by the server's clock.
// KEYS: replicas, presence. ARGV: owner, JSON, ttl ms.
var budgetPresence = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
return 1`)

func (r *Redis) budgetState(ctx context.Context, scope string, lead, doomed bool) (BudgetView, error) {
	flag := func(b bool) string {
		if b {
			return "1"
		}
		return "0"
	}
	keys := []string{r.bk(scope, "replicas"), r.bk(scope, "presence"), r.bk(scope, "doomed"),
		r.bk(scope, "gen"), r.bk(scope, "kick"), r.bk(scope, "full")}
	res, err := budgetState.Run(ctx, r.c, keys, flag(lead), flag(doomed)).Slice()
	if err != nil {
		return BudgetView{}, err
	}
	if len(res) != 5 {
		return BudgetView{}, errors.New("state: budget: unexpected answer")
	}
	var v BudgetView
	v.Gen, _ = strconv.ParseInt(fmt.Sprint(res[0]), 10, 64)
	for _, d := range asSlice(res[1]) {
		if s, ok := d.(string); ok {
			v.Doomed = append(v.Doomed, s)
		}
	}
	for _, p := range asSlice(res[2]) {
		var br BudgetReplica
		if s, ok := p.(string); ok && json.Unmarshal([]byte(s), &br) == nil {
			v.Replicas = append(v.Replicas, br)
		}
	}
	v.Kicked, _ = strconv.ParseInt(fmt.Sprint(res[3]), 10, 64)
	v.Full = fmt.Sprint(res[4]) == "1"
	return v, nil
}

func asSlice(v any) []any {
	s, _ := v.([]any)
	return s
}

// BudgetPoll implements BudgetBus.
func (r *Redis) BudgetPoll(ctx context.Context, scope, owner, cursor string, max int, lead bool) (BudgetView, error) {
	v, err := r.budgetState(ctx, scope, lead, true)
	if err != nil {
		return v, err
	}
	start := "-"
	if cursor != "" {
		start = "(" + cursor
	}
	v.Cursor = cursor
	msgs, err := r.c.XRangeN(ctx, r.bk(scope, "log"), start, "+", int64(max)).Result()
	if err != nil {
		return v, err
	}
	v.More = len(msgs) == max
	for _, m := range msgs {
		v.Cursor = m.ID
		if o, _ := m.Values["o"].(string); o == owner {
			continue
		}
		c, _ := m.Values["c"].(string)
		v.Changes = decodeChanges(c, v.Changes)
	}
	return v, nil
}

// BudgetPublish implements BudgetBus.
func (r *Redis) BudgetPublish(ctx context.Context, scope string, br BudgetReplica, changes []BudgetChange, ttl time.Duration) error {
	b, _ := json.Marshal(br)
	_, err := r.c.Pipelined(ctx, func(p redis.Pipeliner) error {
		if len(changes) > 0 {
			p.XAdd(ctx, &redis.XAddArgs{Stream: r.bk(scope, "log"), MaxLen: BudgetLogMax, Approx: true,
				Values: []any{"o", br.Owner, "c", encodeChanges(changes)}})
		}
		budgetPresence.Eval(ctx, p, []string{r.bk(scope, "replicas"), r.bk(scope, "presence")}, br.Owner, b, ttl.Milliseconds())
		return nil
	})
	return err
}

// BudgetReplicas implements BudgetBus.
func (r *Redis) BudgetReplicas(ctx context.Context, scope string) ([]BudgetReplica, error) {
	v, err := r.budgetState(ctx, scope, false, false)
	return v.Replicas, err
}

// BudgetDoom implements BudgetBus.
func (r *Redis) BudgetDoom(ctx context.Context, scope string, digests []string, ttl time.Duration) (int64, error) {
	var gen *redis.IntCmd
	_, err := r.c.TxPipelined(ctx, func(p redis.Pipeliner) error {
		for i := 0; i < len(digests); i += 1000 {
			p.SAdd(ctx, r.bk(scope, "doomed"), toAny(digests[i:min(i+1000, len(digests))])...)
		}
		p.PExpire(ctx, r.bk(scope, "doomed"), ttl)
		gen = p.Incr(ctx, r.bk(scope, "gen"))
		return nil
	})
	if err != nil {
		return 0, err
	}
	return gen.Val(), nil
}

// BudgetUndoom implements BudgetBus.
func (r *Redis) BudgetUndoom(ctx context.Context, scope string, digests []string) error {
	_, err := r.c.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i := 0; i < len(digests); i += 1000 {
			p.SRem(ctx, r.bk(scope, "doomed"), toAny(digests[i:min(i+1000, len(digests))])...)
		}
		return nil
	})
	return err
}

// BudgetKick implements BudgetBus.
func (r *Redis) BudgetKick(ctx context.Context, scope string, bytes int64, ttl time.Duration) error {
	return budgetKick.Run(ctx, r.c, []string{r.bk(scope, "kick")}, bytes, ttl.Milliseconds()).Err()
}

// budgetKick keeps the larger of the waiting request and ARGV[1] bytes.
var budgetKick = redis.NewScript(`
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local want = tonumber(ARGV[1])
if want > cur then cur = want end
redis.call('SET', KEYS[1], cur, 'PX', ARGV[2])
return cur`)

// BudgetSetFull implements BudgetBus.
func (r *Redis) BudgetSetFull(ctx context.Context, scope string, full bool, ttl time.Duration) error {
	if !full {
		return r.c.Del(ctx, r.bk(scope, "full")).Err()
	}
	return r.c.Set(ctx, r.bk(scope, "full"), "1", ttl).Err()
}
