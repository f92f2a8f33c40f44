// Package cluster makes mirror replicas that share Redis and a cache
// bucket act as one cache: each blob is fetched from the upstream once
// across them, and streamed from the replica fetching it (its owner) to
// the others while the fetch runs.
//
// Membership. Each replica (a Node) registers in a Redis sorted set,
// keyed "<prefix>cluster:members", as "<instance id> <advertise URL>" with
// its expiry time (Redis server time) as score, and renews it every
// heartbeat; an entry not renewed for 3 heartbeats is expired, so a
// replica that stops (kill -9, a partition) drops out within seconds. A
// clean shutdown removes it at once. The instance id is new at every
// start: a restarted replica is a new member, and leases of its previous
// life are not taken for its own.
//
// Ownership: a lease per digest, not rendezvous hashing. The replica whose
// fill of a blob starts first takes "<prefix>cluster:lease:<digest>" (an
// internal/lease lease of 3 heartbeats) and refreshes it with its heartbeat while the
// fill runs; the lease is released when the fill's upstream body is closed,
// after the commit. The replica that got the miss thus fetches the blob
// itself (no extra hop for the common case of one requester), ownership
// never moves while the owner is alive (hashing would move blobs mid-fill
// whenever membership changes and needs every replica to agree on the
// member list at the same instant), and a dead owner's lease ends by
// itself. After taking a lease the shared cache is looked at again, so a
// blob another replica committed and released just before is read from
// the cache (fill.ErrCached) rather than fetched twice.
//
// A replica whose fill finds the lease held by another streams the blob
// from the holder's peer endpoint (Peer, Server), from the offset its fill
// needs: the holder serves it from its own running fill (late joiners and
// Range as within one process) or from the cache, never by starting a
// fetch or asking another replica (no loops). The stream is a relay
// (fill.Relay): verified as any fill, but not written to the shared cache,
// which the owner writes. When the owner dies mid-fill, the relay's read
// breaks, the fill resumes, and its source waits until the owner's lease
// expires or its membership does, takes the lease and resumes from the
// upstream with Range at the offset reached.
//
// Without Redis (unreachable, or failing) a Node says so
// (ngc_mirror_cluster_coordinated 0) and every fill goes to the upstream
// directly, as in a single process.
package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/redis/go-redis/v9"

	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
)

// Store is what a Node needs of the shared cache (*storage.Store).
type Store interface {
	StatBlob(ctx context.Context, dgst digest.Digest) (int64, error)
}

// Options configure a Node. Zero values take the defaults noted.
type Options struct {
	// RedisURL: redis://[:password@]host:port/db or rediss://.
	RedisURL string
	// Prefix of every key (default "ngc-mirror:", as the state store's).
	Prefix string
	// Advertise is the URL peers reach this replica's peer listener at.
	Advertise string
	// Secret authenticates peer requests (HMAC-SHA256 key).
	Secret []byte
	// Heartbeat is how often membership and leases are renewed (default
	// 2 s); entries live 3 heartbeats.
	Heartbeat time.Duration
	// Timeout bounds each Redis command (default 1 s).
	Timeout time.Duration
	// Store is the cache, looked at again after a lease is taken.
	Store   Store
	Metrics *metrics.Cluster // nil records nothing
	Log     *slog.Logger
	// Transport for peer requests (default a clone of
	// http.DefaultTransport).
	Transport http.RoundTripper
}

// Node is this replica's membership and its ownership of blobs. Build it
// with New, run its heartbeat with Run.
type Node struct {
	opts   Options
	rdb    *redis.Client
	self   string // member and lease value: "<id> <advertise>"
	ttl    time.Duration
	peer   *Peer
	log    *slog.Logger
	m      *metrics.Cluster
	status atomic.Value // string: StatusJoining, StatusMember, StatusUncoordinated

	mu   sync.Mutex
	held map[digest.Digest]int // leases this replica holds (fills as owner)
}

// Status values of Node.Status.
const (
	StatusJoining       = "joining"       // not registered yet
	StatusMember        = "ok"            // registered, heart-beating
	StatusUncoordinated = "uncoordinated" // Redis unreachable: filling alone
)

// New connects to Redis (lazily: a server that is down is retried at each
// heartbeat) and returns the node. Errors: a malformed Redis URL (the
// message never holds the password), an empty Advertise or Secret.
func New(o Options) (*Node, error) {
	if o.Advertise == "" || len(o.Secret) == 0 {
		return nil, errors.New("cluster: advertise URL and secret are required")
	}
	opt, err := redis.ParseURL(o.RedisURL)
	if err != nil {
		return nil, errors.New("cluster: invalid redis URL")
	}
	if o.Prefix == "" {
		o.Prefix = "ngc-mirror:"
	}
	if o.Heartbeat <= 0 {
		o.Heartbeat = 2 * time.Second
	}
	if o.Timeout <= 0 {
		o.Timeout = time.Second
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout, opt.PoolTimeout = o.Timeout, o.Timeout, o.Timeout, o.Timeout
	opt.MaxRetries = 1
	opt.DisableIdentity = true
	var id [8]byte
	_, _ = rand.Read(id[:])
	n := &Node{
		opts: o,
		rdb:  redis.NewClient(opt),
		self: hex.EncodeToString(id[:]) + " " + strings.TrimSuffix(o.Advertise, "/"),
		ttl:  3 * o.Heartbeat,
		log:  o.Log,
		m:    o.Metrics,
		held: map[digest.Digest]int{},
	}
	n.peer = NewPeer(o.Secret, o.Transport, o.Metrics)
	n.status.Store(StatusJoining)
	return n, nil
}

// Close closes the Redis connections (after Run returned).
func (n *Node) Close() error { return n.rdb.Close() }

// Status reports the node's standing: StatusMember, StatusUncoordinated
// (Redis unreachable; the replica serves and fills alone) or
// StatusJoining (before the first heartbeat answered).
func (n *Node) Status() string { return n.status.Load().(string) }

// Ready reports whether the node may take client traffic: it is a member,
// or Redis is unreachable (the replica then fills alone rather than
// refusing clients). Not ready only while joining.
func (n *Node) Ready() bool { return n.Status() != StatusJoining }

// Coordinated reports whether fills go through leases now.
func (n *Node) Coordinated() bool { return n.Status() == StatusMember }

// advertise is this replica's peer URL as members name it.
func (n *Node) advertise() string {
	_, u, _ := strings.Cut(n.self, " ")
	return u
}

func (n *Node) key(parts ...string) string {
	return n.opts.Prefix + "cluster:" + strings.Join(parts, "")
}

func (n *Node) leaseKey(dgst digest.Digest) string { return n.key("lease:", dgst.String()) }

// heartbeat adds (or renews) a member with an expiry of ARGV[2] ms from
// the Redis server's time, drops expired members and returns the count.
var heartbeat = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZCARD', KEYS[1])
`)

// live reports whether ARGV[1] is a member whose entry has not expired.
var live = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) > now then return 1 end
return 0
`)

// beat registers or renews this member and its leases once.
func (n *Node) beat(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, n.opts.Timeout)
	defer cancel()
	count, err := heartbeat.Run(ctx, n.rdb, []string{n.key("members")}, n.self, n.ttl.Milliseconds()).Int()
	if err == nil {
		err = n.refreshLeases(ctx)
	}
	was := n.Status()
	if err != nil {
		n.status.Store(StatusUncoordinated)
		n.m.SetMembers(0, false)
		if was != StatusUncoordinated {
			n.log.Warn("cluster: Redis unreachable; filling alone until it answers", "err", err)
		}
		return
	}
	n.status.Store(StatusMember)
	n.m.SetMembers(count, true)
	if was != StatusMember {
		n.log.Info("cluster: member", "advertise", n.opts.Advertise, "members", count)
	}
}

// Join registers the node once (the first heartbeat), so that readiness
// and the first fills see membership; Run goes on from there.
func (n *Node) Join(ctx context.Context) { n.beat(ctx) }

// Run renews membership and leases every heartbeat until ctx ends, then
// removes this member from Redis (a clean shutdown drops out at once).
// Leases still held then expire by themselves.
func (n *Node) Run(ctx context.Context) {
	t := time.NewTicker(n.opts.Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			dctx, cancel := context.WithTimeout(context.Background(), n.opts.Timeout)
			defer cancel()
			if err := n.rdb.ZRem(dctx, n.key("members"), n.self).Err(); err != nil {
				n.log.Warn("cluster: could not deregister; the entry expires by itself", "err", err)
			}
			return
		case <-t.C:
			n.beat(ctx)
		}
	}
}

// isLive reports whether member is registered and heart-beating. An error
// (Redis) counts as live: its lease is then left to expire.
func (n *Node) isLive(ctx context.Context, member string) bool {
	ctx, cancel := context.WithTimeout(ctx, n.opts.Timeout)
	defer cancel()
	v, err := live.Run(ctx, n.rdb, []string{n.key("members")}, member).Int()
	return err != nil || v == 1
}

// Members returns the advertise URLs of the live members (for tests and
// diagnostics).
func (n *Node) Members(ctx context.Context) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, n.opts.Timeout)
	defer cancel()
	t, err := n.rdb.Time(ctx).Result()
	if err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	ms, err := n.rdb.ZRangeByScore(ctx, n.key("members"), &redis.ZRangeBy{Min: fmt.Sprintf("(%d", t.UnixMilli()), Max: "+inf"}).Result()
	if err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	out := make([]string, 0, len(ms))
	for _, m := range ms {
		_, u, _ := strings.Cut(m, " ")
		out = append(out, u)
	}
	return out, nil
}
