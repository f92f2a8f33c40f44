package state

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/ngc-mirror/ngc-mirror/internal/lease"
)

// ErrLocked is wrapped by OpenBolt's error when another process holds the
// file (bbolt's exclusive lock did not come within the timeout): most
// likely a second mirror on the same data directory.
var ErrLocked = errors.New("state: another process holds the file")

// Bolt keeps state in an embedded bbolt file: the default when no Redis is
// configured. bbolt takes an exclusive file lock, so one process owns the
// file; its locks and claims are therefore kept in memory.
type Bolt struct {
	db *bolt.DB

	locks lease.Local

	mu     sync.Mutex
	claims map[string]time.Time
}

var (
	bTags   = []byte("tags")  // repo \x00 tag → JSON Tag
	bRepos  = []byte("repos") // repo → JSON Repository
	bUsage  = []byte("usage") // repo \x00 tag \x00 platform → JSON Usage
	bPulls  = []byte("pulls") // big-endian sequence → JSON Pull
	bJobs   = []byte("jobs")  // id → JSON Job
	buckets = [][]byte{bTags, bRepos, bUsage, bPulls, bJobs}
)

// OpenBolt opens (creating) the state file at path. It fails after timeout
// (1 s when 0) with an error wrapping ErrLocked if another process holds
// the file; a file it may not write fails with the os error
// (fs.ErrPermission, syscall.EROFS).
func OpenBolt(path string, timeout time.Duration) (*Bolt, error) {
	if timeout <= 0 {
		timeout = time.Second
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: timeout})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("%w: %s (waited %s for its lock)", ErrLocked, path, timeout)
	}
	if err != nil {
		return nil, fmt.Errorf("state: opening %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range buckets {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("state: %s: %w", path, err)
	}
	return &Bolt{db: db, claims: map[string]time.Time{}}, nil
}

// Close closes the file.
func (b *Bolt) Close() error { return b.db.Close() }

// Ping always succeeds on an open file.
func (b *Bolt) Ping(ctx context.Context) error { return ctx.Err() }

func (b *Bolt) PutTags(ctx context.Context, tags []Tag) error {
	return b.db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bTags)
		for _, t := range tags {
			v, _ := json.Marshal(t)
			if err := bk.Put([]byte(t.Repository+"\x00"+t.Name), v); err != nil {
				return err
			}
		}
		return nil
	})
}

func (b *Bolt) Tags(ctx context.Context, repo string) ([]Tag, error) {
	var out []Tag
	prefix := []byte(repo + "\x00")
	err := b.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bTags).Cursor()
		for k, v := c.Seek(prefix); k != nil && strings.HasPrefix(string(k), string(prefix)); k, v = c.Next() {
			var t Tag
			if json.Unmarshal(v, &t) == nil {
				out = append(out, t)
			}
		}
		return nil
	})
	return out, err // keys sort by name within a repository
}

func (b *Bolt) updateRepo(tx *bolt.Tx, name string, f func(*Repository)) error {
	bk := tx.Bucket(bRepos)
	r := Repository{Name: name}
	if v := bk.Get([]byte(name)); v != nil {
		_ = json.Unmarshal(v, &r)
	}
	f(&r)
	v, _ := json.Marshal(r)
	return bk.Put([]byte(name), v)
}

func (b *Bolt) MarkPolled(ctx context.Context, repo string, t time.Time) error {
	return b.db.Update(func(tx *bolt.Tx) error {
		return b.updateRepo(tx, repo, func(r *Repository) { r.LastPolled = t })
	})
}

func (b *Bolt) Repositories(ctx context.Context) ([]Repository, error) {
	var out []Repository
	err := b.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bRepos).ForEach(func(k, v []byte) error {
			var r Repository
			if json.Unmarshal(v, &r) == nil {
				out = append(out, r)
			}
			return nil
		})
	})
	return out, err
}

func (b *Bolt) RecordPull(ctx context.Context, p Pull) error {
	return b.db.Update(func(tx *bolt.Tx) error {
		t := p.Time.Truncate(time.Second).UTC()
		if err := b.updateRepo(tx, p.Repository, func(r *Repository) {
			r.Pulls++
			if t.After(r.LastPulled) {
				r.LastPulled = t
			}
		}); err != nil {
			return err
		}
		ub := tx.Bucket(bUsage)
		key := []byte(usageField(p.Repository, p.Tag, p.Platform))
		u := Usage{Repository: p.Repository, Tag: p.Tag, Platform: p.Platform}
		if v := ub.Get(key); v != nil {
			_ = json.Unmarshal(v, &u)
		}
		u.Count++
		if t.After(u.Last) {
			u.Last = t
		}
		v, _ := json.Marshal(u)
		if err := ub.Put(key, v); err != nil {
			return err
		}
		pb := tx.Bucket(bPulls)
		seq, _ := pb.NextSequence()
		var k [8]byte
		binary.BigEndian.PutUint64(k[:], seq)
		pv, _ := json.Marshal(p)
		if err := pb.Put(k[:], pv); err != nil {
			return err
		}
		// Keep the newest MaxPullLog entries: keys are the sequence, so
		// the ones at or below seq-MaxPullLog are the oldest.
		c := pb.Cursor()
		for k, _ := c.First(); k != nil && binary.BigEndian.Uint64(k)+MaxPullLog <= seq; k, _ = c.Next() {
			if err := c.Delete(); err != nil {
				return err
			}
		}
		return nil
	})
}

func (b *Bolt) Usage(ctx context.Context, since time.Time) ([]Usage, error) {
	var out []Usage
	err := b.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bUsage).ForEach(func(k, v []byte) error {
			var u Usage
			if json.Unmarshal(v, &u) == nil && !u.Last.Before(since.Truncate(time.Second)) {
				out = append(out, u)
			}
			return nil
		})
	})
	sortUsage(out)
	return out, err
}

func (b *Bolt) RecentPulls(ctx context.Context, n int) ([]Pull, error) {
	var out []Pull
	err := b.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bPulls).Cursor()
		for k, v := c.Last(); k != nil && len(out) < n; k, v = c.Prev() {
			var p Pull
			if json.Unmarshal(v, &p) == nil {
				out = append(out, p)
			}
		}
		return nil
	})
	return out, err
}

func (b *Bolt) PutJob(ctx context.Context, j Job) error {
	return b.db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bJobs)
		old := bk.Get([]byte(j.ID))
		existed := old != nil
		var cur Job
		if existed && json.Unmarshal(old, &cur) == nil && !replaceable(cur.State, j.State) {
			return ErrCancelled
		}
		v, _ := json.Marshal(j)
		if err := bk.Put([]byte(j.ID), v); err != nil {
			return err
		}
		if existed {
			return nil // a progress update adds no job: nothing to trim
		}
		var jobs []Job
		_ = bk.ForEach(func(_, v []byte) error {
			var j Job
			if json.Unmarshal(v, &j) == nil {
				jobs = append(jobs, j)
			}
			return nil
		})
		sort.Slice(jobs, func(a, c int) bool { return jobs[a].Created.Before(jobs[c].Created) })
		excess := len(jobs) - MaxJobs
		for i := 0; i < len(jobs) && excess > 0; i++ {
			if jobs[i].Ended() {
				if err := bk.Delete([]byte(jobs[i].ID)); err != nil {
					return err
				}
				excess--
			}
		}
		return nil
	})
}

func (b *Bolt) CancelJob(ctx context.Context, id string) (Job, error) {
	var j Job
	err := b.db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bJobs)
		v := bk.Get([]byte(id))
		if v == nil {
			return ErrNotFound
		}
		if err := json.Unmarshal(v, &j); err != nil {
			return err
		}
		if j.Ended() {
			return nil
		}
		j = cancelled(j, time.Now().UTC())
		v, _ = json.Marshal(j)
		return bk.Put([]byte(id), v)
	})
	return j, err
}

func (b *Bolt) Job(ctx context.Context, id string) (Job, error) {
	var j Job
	err := b.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bJobs).Get([]byte(id))
		if v == nil {
			return ErrNotFound
		}
		return json.Unmarshal(v, &j)
	})
	return j, err
}

func (b *Bolt) Jobs(ctx context.Context) ([]Job, error) {
	m := map[string]string{}
	err := b.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bJobs).ForEach(func(k, v []byte) error {
			m[string(k)] = string(v)
			return nil
		})
	})
	return sortedJobs(m), err
}

// Lock implements lease.Locker, in memory.
func (b *Bolt) Lock(ctx context.Context, name, owner string, ttl time.Duration) (bool, error) {
	return b.locks.Lock(ctx, name, owner, ttl)
}

// Unlock implements lease.Locker.
func (b *Bolt) Unlock(ctx context.Context, name, owner string) error {
	return b.locks.Unlock(ctx, name, owner)
}

func (b *Bolt) Claim(ctx context.Context, key string, ttl time.Duration) (bool, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	for k, exp := range b.claims {
		if now.After(exp) {
			delete(b.claims, k)
		}
	}
	if _, ok := b.claims[key]; ok {
		return false, nil
	}
	b.claims[key] = now.Add(ttl)
	return true, nil
}

var _ Store = (*Bolt)(nil)
var _ Store = (*Redis)(nil)
