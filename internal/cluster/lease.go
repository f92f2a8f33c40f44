package cluster

import (
	"context"
	"errors"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/lease"
)

// Blob leases are internal/lease leases at "<prefix>cluster:lease:<digest>"
// whose value is this member ("<id> <advertise>") and whose TTL is 3
// heartbeats.

// refreshLeases extends every lease this replica holds (one pipeline).
func (n *Node) refreshLeases(ctx context.Context) error {
	n.mu.Lock()
	ds := make([]digest.Digest, 0, len(n.held))
	for d := range n.held {
		ds = append(ds, d)
	}
	n.mu.Unlock()
	keys := make([]string, len(ds))
	for i, d := range ds {
		keys[i] = n.leaseKey(d)
	}
	held, err := lease.RenewAll(ctx, n.rdb, keys, n.self, n.ttl)
	if err != nil {
		return err
	}
	for i, ok := range held {
		if !ok {
			n.log.Warn("cluster: lost the lease of a blob being filled (Redis was unreachable for longer than the lease); another replica may fetch it too", "digest", ds[i])
		}
	}
	return nil
}

func (n *Node) hold(dgst digest.Digest) {
	n.mu.Lock()
	n.held[dgst]++
	n.mu.Unlock()
}

func (n *Node) unhold(dgst digest.Digest) {
	n.mu.Lock()
	if n.held[dgst]--; n.held[dgst] <= 0 {
		delete(n.held, dgst)
	}
	n.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), n.opts.Timeout)
	defer cancel()
	_, _ = lease.Release(ctx, n.rdb, n.leaseKey(dgst), n.self) // else it expires
}

// takeoverWait bounds how long a fill's source waits for an owner that
// does not answer: its lease and its membership expire within ttl.
func (n *Node) takeoverWait() time.Duration { return n.ttl + 2*n.opts.Heartbeat }

// retryEvery is how often a source asks again while it waits for a lease.
const retryEvery = 100 * time.Millisecond

// Source wraps the upstream source of blob dgst for a fill: while Redis
// answers, the fill's first call takes the blob's lease and fetches from
// upstream as its owner, or, when another live replica holds the lease,
// streams from that replica's peer endpoint as a relay (fill.Relay); a
// resume after the owner died takes the lease over and resumes from the
// upstream. Without Redis every call goes to upstream. Errors: upstream's,
// fill.ErrCached (the blob was committed by another replica just before
// the lease was taken), or ctx's.
func (n *Node) Source(dgst digest.Digest, upstream fill.Source) fill.Source {
	counted := false // ngc_mirror_fills_owned_total counts a fill once, resumes not again
	return func(ctx context.Context, off int64) (io.ReadCloser, int64, error) {
		// The wait for an owner that does not serve starts at its first
		// failure (a long wait for its headers is an owner at work).
		var deadline time.Time
		var lastErr error
		for {
			if !n.Coordinated() {
				return upstream(ctx, off)
			}
			body, size, owner, retry, err := n.try(ctx, dgst, off, upstream)
			if owner && !counted {
				counted = true
				n.m.FillOwned()
			}
			if !retry {
				return body, size, err
			}
			lastErr = err
			if deadline.IsZero() {
				deadline = time.Now().Add(n.takeoverWait())
			} else if time.Now().After(deadline) {
				// The lease outlived its bound (Redis trouble): fetch
				// rather than fail the clients.
				n.log.Warn("cluster: the blob's owner neither answers nor gives up its lease; fetching it from the upstream", "digest", dgst, "err", lastErr)
				return upstream(ctx, off)
			}
			select {
			case <-ctx.Done():
				return nil, 0, ctx.Err()
			case <-time.After(retryEvery):
			}
		}
	}
}

// try makes one attempt of Source; owner says it returns the upstream's
// body under this replica's lease, retry to wait and try again.
func (n *Node) try(ctx context.Context, dgst digest.Digest, off int64, upstream fill.Source) (body io.ReadCloser, size int64, owner, retry bool, err error) {
	rctx, cancel := context.WithTimeout(ctx, n.opts.Timeout)
	holder, err := lease.Acquire(rctx, n.rdb, n.leaseKey(dgst), n.self, n.ttl)
	cancel()
	switch {
	case err != nil:
		// Redis failed: the heartbeat will say so; fill alone now.
		n.log.Warn("cluster: taking a blob lease failed; fetching from the upstream", "digest", dgst, "err", err)
		body, size, err := upstream(ctx, off)
		return body, size, false, false, err
	case holder == n.self:
		n.hold(dgst)
		if off == 0 {
			// Committed and released by another replica since our miss?
			if _, err := n.opts.Store.StatBlob(ctx, dgst); err == nil {
				n.unhold(dgst)
				return nil, 0, false, false, fill.ErrCached
			}
		}
		body, size, err := upstream(ctx, off)
		if err != nil {
			n.unhold(dgst)
			return nil, 0, false, false, err
		}
		if off > 0 {
			n.log.Info("cluster: fetching the rest of a blob from the upstream as its new owner", "digest", dgst, "offset", off)
		}
		return &owned{ReadCloser: body, release: sync.OnceFunc(func() { n.unhold(dgst) })}, size, true, false, nil
	}
	_, url, _ := splitMember(holder)
	if url == n.advertise() {
		// A lease of this replica's previous life (a restart): never ask
		// ourselves; it is void once that life's membership expired.
		n.breakIfDead(ctx, dgst, holder, url, off)
		return nil, 0, false, true, errors.New("cluster: the lease is held by this replica's previous run")
	}
	body, size, committed, err := n.peer.Get(ctx, url, dgst, off)
	if err == nil {
		fill.Relay(ctx, committed)
		return body, size, false, false, nil
	}
	if ctx.Err() != nil {
		return nil, 0, false, false, ctx.Err()
	}
	n.log.Debug("cluster: the blob's owner did not serve it", "digest", dgst, "owner", url, "err", err)
	n.breakIfDead(ctx, dgst, holder, url, off)
	return nil, 0, false, true, err
}

// breakIfDead removes holder's lease of dgst when its membership expired
// (dead, partitioned): its lease is void, the next attempt takes it.
func (n *Node) breakIfDead(ctx context.Context, dgst digest.Digest, holder, url string, off int64) {
	if n.isLive(ctx, holder) {
		return
	}
	bctx, cancel := context.WithTimeout(ctx, n.opts.Timeout)
	defer cancel()
	if broke, _ := lease.Release(bctx, n.rdb, n.leaseKey(dgst), holder); broke {
		n.log.Info("cluster: the owner of a blob being filled left; taking its lease", "digest", dgst, "owner", url, "offset", off)
	}
}

func splitMember(m string) (id, url string, ok bool) {
	id, url, ok = strings.Cut(m, " ")
	return
}

// owned is the owner's upstream body; closing it (after the commit, or
// when the fill fails) releases the lease.
type owned struct {
	io.ReadCloser
	release func()
}

func (o *owned) Close() error {
	err := o.ReadCloser.Close()
	o.release()
	return err
}
