package state

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/ngc-mirror/ngc-mirror/internal/lease"
)

// Redis keeps state in a Redis server shared by the mirror's replicas.
//
// Keys (all under the prefix, default "ngc-mirror:"):
//
//	tags:<repo>        hash  tag name → JSON Tag
//	repos              hash  repo → JSON Repository (last polled)
//	repo-pulls         hash  repo → pull count
//	repo-last-pull     zset  repo → unix seconds of the last pull
//	usage              hash  repo \x00 tag \x00 platform → count
//	usage-last         hash  same field → unix seconds of the last pull
//	pulls              list  JSON Pull, newest first, trimmed to MaxPullLog
//	jobs               hash  id → JSON Job
//	jobs-by-time       zset  id → created (unix nanoseconds)
//	lock:<name>        string owner, with an expiry (a lease: internal/lease)
//	claim:<key>        string, with an expiry
//	budget:<scope>:*   the shared cache budget (budget.go): log (stream of
//	                   changes), replicas (zset owner → expiry), presence
//	                   (hash owner → JSON), doomed (set), gen, kick, full
type Redis struct {
	c      *redis.Client
	prefix string
	locks  lease.Redis // prefix "lock:"
}

// RedisOptions tune OpenRedis. Zero values take the defaults noted.
type RedisOptions struct {
	// Prefix of every key (default "ngc-mirror:").
	Prefix string
	// Timeout bounds dialing and each command (default 1 s): the mirror
	// never waits on Redis longer.
	Timeout time.Duration
}

// OpenRedis connects to the Redis server at url ("redis://[:password@]host:port/db",
// or rediss:// for TLS). It does not fail when the server is down: the
// client reconnects by itself, and every call until then returns an error.
func OpenRedis(url string, o RedisOptions) (*Redis, error) {
	opt, err := redis.ParseURL(url)
	if err != nil {
		return nil, fmt.Errorf("state: redis url: %w", errors.New(scrubURLError(err.Error())))
	}
	if o.Prefix == "" {
		o.Prefix = "ngc-mirror:"
	}
	if o.Timeout <= 0 {
		o.Timeout = time.Second
	}
	opt.DialTimeout = o.Timeout
	opt.ReadTimeout = o.Timeout
	opt.WriteTimeout = o.Timeout
	opt.PoolTimeout = o.Timeout
	opt.MaxRetries = 1
	opt.DisableIdentity = true
	quietOnce.Do(func() { redis.SetLogger(quiet{}) })
	c := redis.NewClient(opt)
	return &Redis{c: c, prefix: o.Prefix, locks: lease.Redis{C: c, Prefix: o.Prefix + "lock:"}}, nil
}

// quiet drops go-redis's own log lines (dial failures during an outage,
// repeated per attempt): the callers log and count errors themselves.
type quiet struct{}

func (quiet) Printf(context.Context, string, ...any) {}

var quietOnce sync.Once

// scrubURLError keeps a URL parse error from echoing a password.
func scrubURLError(msg string) string {
	if i := strings.Index(msg, "@"); i >= 0 {
		return "invalid redis URL"
	}
	return msg
}

func (r *Redis) k(parts ...string) string { return r.prefix + strings.Join(parts, "") }

// Close closes the connections.
func (r *Redis) Close() error { return r.c.Close() }

// Ping checks the server.
func (r *Redis) Ping(ctx context.Context) error { return r.c.Ping(ctx).Err() }

func (r *Redis) PutTags(ctx context.Context, tags []Tag) error {
	if len(tags) == 0 {
		return nil
	}
	byRepo := map[string][]any{}
	for _, t := range tags {
		b, _ := json.Marshal(t)
		byRepo[t.Repository] = append(byRepo[t.Repository], t.Name, b)
	}
	_, err := r.c.TxPipelined(ctx, func(p redis.Pipeliner) error {
		for repo, kv := range byRepo {
			p.HSet(ctx, r.k("tags:", repo), kv...)
		}
		return nil
	})
	return err
}

func (r *Redis) Tags(ctx context.Context, repo string) ([]Tag, error) {
	m, err := r.c.HGetAll(ctx, r.k("tags:", repo)).Result()
	if err != nil {
		return nil, err
	}
	out := make([]Tag, 0, len(m))
	for _, v := range m {
		var t Tag
		if json.Unmarshal([]byte(v), &t) == nil {
			out = append(out, t)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (r *Redis) MarkPolled(ctx context.Context, repo string, t time.Time) error {
	b, _ := json.Marshal(Repository{Name: repo, LastPolled: t})
	return r.c.HSet(ctx, r.k("repos"), repo, b).Err()
}

func (r *Redis) Repositories(ctx context.Context) ([]Repository, error) {
	p := r.c.Pipeline()
	polled := p.HGetAll(ctx, r.k("repos"))
	counts := p.HGetAll(ctx, r.k("repo-pulls"))
	last := p.ZRangeWithScores(ctx, r.k("repo-last-pull"), 0, -1)
	if _, err := p.Exec(ctx); err != nil {
		return nil, err
	}
	byName := map[string]*Repository{}
	get := func(name string) *Repository {
		if byName[name] == nil {
			byName[name] = &Repository{Name: name}
		}
		return byName[name]
	}
	for name, v := range polled.Val() {
		var rr Repository
		if json.Unmarshal([]byte(v), &rr) == nil {
			get(name).LastPolled = rr.LastPolled
		}
	}
	for name, v := range counts.Val() {
		get(name).Pulls, _ = strconv.ParseInt(v, 10, 64)
	}
	for _, z := range last.Val() {
		get(z.Member.(string)).LastPulled = time.Unix(int64(z.Score), 0).UTC()
	}
	return sortedRepos(byName), nil
}

func sortedRepos(m map[string]*Repository) []Repository {
	out := make([]Repository, 0, len(m))
	for _, r := range m {
		out = append(out, *r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func usageField(repo, tag, platform string) string { return repo + "\x00" + tag + "\x00" + platform }

func (r *Redis) RecordPull(ctx context.Context, pl Pull) error {
	b, _ := json.Marshal(pl)
	f := usageField(pl.Repository, pl.Tag, pl.Platform)
	ts := pl.Time.Unix()
	_, err := r.c.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.LPush(ctx, r.k("pulls"), b)
		p.LTrim(ctx, r.k("pulls"), 0, MaxPullLog-1)
		p.HIncrBy(ctx, r.k("usage"), f, 1)
		p.HSet(ctx, r.k("usage-last"), f, ts)
		p.HIncrBy(ctx, r.k("repo-pulls"), pl.Repository, 1)
		p.ZAddGT(ctx, r.k("repo-last-pull"), redis.Z{Score: float64(ts), Member: pl.Repository})
		return nil
	})
	return err
}

func (r *Redis) Usage(ctx context.Context, since time.Time) ([]Usage, error) {
	p := r.c.Pipeline()
	counts := p.HGetAll(ctx, r.k("usage"))
	last := p.HGetAll(ctx, r.k("usage-last"))
	if _, err := p.Exec(ctx); err != nil {
		return nil, err
	}
	var out []Usage
	for f, c := range counts.Val() {
		ts, _ := strconv.ParseInt(last.Val()[f], 10, 64)
		t := time.Unix(ts, 0).UTC()
		if t.Before(since.Truncate(time.Second)) {
			continue
		}
		parts := strings.SplitN(f, "\x00", 3)
		if len(parts) != 3 {
			continue
		}
		n, _ := strconv.ParseInt(c, 10, 64)
		out = append(out, Usage{Repository: parts[0], Tag: parts[1], Platform: parts[2], Count: n, Last: t})
	}
	sortUsage(out)
	return out, nil
}

func sortUsage(u []Usage) {
	sort.Slice(u, func(i, j int) bool {
		if u[i].Repository != u[j].Repository {
			return u[i].Repository < u[j].Repository
		}
		if u[i].Tag != u[j].Tag {
			return u[i].Tag < u[j].Tag
		}
		return u[i].Platform < u[j].Platform
	})
}

func (r *Redis) RecentPulls(ctx context.Context, n int) ([]Pull, error) {
	vals, err := r.c.LRange(ctx, r.k("pulls"), 0, int64(n)-1).Result()
	if err != nil {
		return nil, err
	}
	out := make([]Pull, 0, len(vals))
	for _, v := range vals {
		var p Pull
		if json.Unmarshal([]byte(v), &p) == nil {
			out = append(out, p)
		}
	}
	return out, nil
}

// putJob writes a job unless the stored one is cancelled and the new state
// may not replace it (replaceable), atomically. KEYS: jobs, jobs-by-time;
// ARGV: id, JSON, new state, created (score). It returns 0 when refused.
var putJob = redis.NewScript(`
if ARGV[3] ~= 'queued' and ARGV[3] ~= 'cancelled' then
  local cur = redis.call('HGET', KEYS[1], ARGV[1])
  if cur then
    local ok, j = pcall(cjson.decode, cur)
    if ok and type(j) == 'table' and j.state == 'cancelled' then return 0 end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 1`)

// swapJob replaces job ARGV[1] by ARGV[3] if it is still ARGV[2].
var swapJob = redis.NewScript(`
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0`)

func (r *Redis) PutJob(ctx context.Context, j Job) error {
	b, _ := json.Marshal(j)
	ok, err := putJob.Run(ctx, r.c, []string{r.k("jobs"), r.k("jobs-by-time")}, j.ID, b, j.State, float64(j.Created.UnixNano())).Int()
	if err != nil {
		return err
	}
	if ok == 0 {
		return ErrCancelled
	}
	return r.trimJobs(ctx)
}

// CancelJob compares and swaps: progress saves of the running job may
// change it between the read and the write, so it retries (a few times;
// saves come about once a second).
func (r *Redis) CancelJob(ctx context.Context, id string) (Job, error) {
	for range 20 {
		j, v, err := r.getJob(ctx, id)
		if err != nil {
			return Job{}, err
		}
		if j.Ended() {
			return j, nil
		}
		j = cancelled(j, time.Now().UTC())
		b, _ := json.Marshal(j)
		ok, err := swapJob.Run(ctx, r.c, []string{r.k("jobs")}, id, v, b).Int()
		if err != nil {
			return Job{}, err
		}
		if ok == 1 {
			return j, nil
		}
	}
	return Job{}, fmt.Errorf("state: job %s changed on every attempt to cancel it", id)
}

// trimJobs forgets the oldest ended jobs beyond MaxJobs.
func (r *Redis) trimJobs(ctx context.Context) error {
	n, err := r.c.ZCard(ctx, r.k("jobs-by-time")).Result()
	if err != nil || n <= MaxJobs {
		return err
	}
	ids, err := r.c.ZRange(ctx, r.k("jobs-by-time"), 0, -1).Result() // oldest first
	if err != nil {
		return err
	}
	vals, err := r.c.HMGet(ctx, r.k("jobs"), ids...).Result()
	if err != nil {
		return err
	}
	var drop []string
	for i, id := range ids {
		if int64(len(drop)) >= n-MaxJobs {
			break
		}
		var j Job
		if s, ok := vals[i].(string); ok && json.Unmarshal([]byte(s), &j) == nil && !j.Ended() {
			continue
		}
		drop = append(drop, id)
	}
	if len(drop) == 0 {
		return nil
	}
	_, err = r.c.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.HDel(ctx, r.k("jobs"), drop...)
		p.ZRem(ctx, r.k("jobs-by-time"), toAny(drop)...)
		return nil
	})
	return err
}

func (r *Redis) Job(ctx context.Context, id string) (Job, error) {
	j, _, err := r.getJob(ctx, id)
	return j, err
}

// getJob reads job id and its stored JSON (what a compare and swap
// compares). Errors: ErrNotFound, Redis's, or a JSON error.
func (r *Redis) getJob(ctx context.Context, id string) (Job, string, error) {
	v, err := r.c.HGet(ctx, r.k("jobs"), id).Result()
	if errors.Is(err, redis.Nil) {
		return Job{}, "", ErrNotFound
	}
	if err != nil {
		return Job{}, "", err
	}
	var j Job
	if err := json.Unmarshal([]byte(v), &j); err != nil {
		return Job{}, "", fmt.Errorf("state: job %s: %w", id, err)
	}
	return j, v, nil
}

func (r *Redis) Jobs(ctx context.Context) ([]Job, error) {
	m, err := r.c.HGetAll(ctx, r.k("jobs")).Result()
	if err != nil {
		return nil, err
	}
	return sortedJobs(m), nil
}

func sortedJobs(m map[string]string) []Job {
	out := make([]Job, 0, len(m))
	for _, v := range m {
		var j Job
		if json.Unmarshal([]byte(v), &j) == nil {
			out = append(out, j)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Created.Equal(out[j].Created) {
			return out[i].Created.After(out[j].Created)
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// Lock implements lease.Locker: the lease "<prefix>lock:<name>".
func (r *Redis) Lock(ctx context.Context, name, owner string, ttl time.Duration) (bool, error) {
	return r.locks.Lock(ctx, name, owner, ttl)
}

// Unlock implements lease.Locker.
func (r *Redis) Unlock(ctx context.Context, name, owner string) error {
	return r.locks.Unlock(ctx, name, owner)
}

func (r *Redis) Claim(ctx context.Context, key string, ttl time.Duration) (bool, error) {
	return r.c.SetNX(ctx, r.k("claim:", key), "1", ttl).Result()
}

func toAny(s []string) []any {
	out := make([]any, len(s))
	for i, v := range s {
		out[i] = v
	}
	return out
}
