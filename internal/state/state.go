// Package state is the mirror's memory of upstream tags, client pulls and
// prefetch jobs, and the lock that elects one scheduler among replicas. It
// has two implementations behind one interface: Redis (shared by replicas)
// and an embedded bbolt file in the data directory (one process). The
// statetest package runs one contract suite against both.
//
// Nothing on a client's request path waits on a Store: pulls are handed to
// a bounded queue (see internal/tracking) and written in the background.
package state

import (
	"context"
	"errors"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/lease"
)

// ErrNotFound is returned when a job does not exist.
var ErrNotFound = errors.New("state: not found")

// ErrCancelled is returned by PutJob for a job that was cancelled: the
// write is refused so that a runner which has not yet noticed the cancel
// cannot bring the job back to life.
var ErrCancelled = errors.New("state: job cancelled")

// Tag is what the mirror knows of one upstream tag.
type Tag struct {
	Repository string    `json:"repository"`
	Name       string    `json:"name"`
	Digest     string    `json:"digest,omitempty"`     // what the tag resolved to when last resolved; "" not yet
	MediaType  string    `json:"media_type,omitempty"` // of that manifest
	Platforms  []string  `json:"platforms,omitempty"`  // "linux/amd64", ... of an index; empty for a single image
	Resolved   time.Time `json:"resolved,omitzero"`    // when Digest was last read from the upstream
	FirstSeen  time.Time `json:"first_seen"`
	LastSeen   time.Time `json:"last_seen"` // last poll (or pull) that saw the tag
}

// Repository is a repository the mirror has seen: polled or pulled.
type Repository struct {
	Name       string    `json:"name"`
	LastPolled time.Time `json:"last_polled,omitzero"` // zero: never polled (no baseline for new-tag detection)
	LastPulled time.Time `json:"last_pulled,omitzero"`
	Pulls      int64     `json:"pulls"` // manifest pulls recorded
}

// Pull is one manifest pull by a client.
type Pull struct {
	Repository string    `json:"repository"`
	Tag        string    `json:"tag,omitempty"`      // the tag the client asked for (or whose index it pulled from)
	Digest     string    `json:"digest"`             // the manifest served
	Platform   string    `json:"platform,omitempty"` // "linux/amd64" when the pull resolved an index to a platform
	Client     string    `json:"client"`             // user name, or the client's IP address
	Time       time.Time `json:"time"`
}

// Usage aggregates the pulls of one repository, tag and platform.
type Usage struct {
	Repository string    `json:"repository"`
	Tag        string    `json:"tag"`
	Platform   string    `json:"platform,omitempty"`
	Count      int64     `json:"count"`
	Last       time.Time `json:"last"`
}

// Job states.
const (
	JobQueued  = "queued"
	JobRunning = "running"
	JobDone    = "done"
	JobFailed  = "failed"
	// JobCancelled: stopped by CancelJob (mirror jobs cancel); the leader
	// running it stops at its next progress save.
	JobCancelled = "cancelled"
)

// Job is one prefetch: an image (repository and tag or digest) for some
// platforms, with its progress.
type Job struct {
	ID         string   `json:"id"`
	Repository string   `json:"repository"`
	Reference  string   `json:"reference"`           // tag or digest
	Platforms  []string `json:"platforms,omitempty"` // empty: every platform of an index
	Rule       string   `json:"rule,omitempty"`      // the rule that made it; "" for a manual prefetch, "auto" for the automatic rule
	// Concurrency (blobs at once; 0: the default) and Bandwidth (bytes per
	// second; 0: none) the job runs with, from its rule.
	Concurrency int       `json:"concurrency,omitempty"`
	Bandwidth   int64     `json:"bandwidth,omitempty"`
	State       string    `json:"state"`
	Created     time.Time `json:"created"`
	Started     time.Time `json:"started,omitzero"` // when its last run began
	Updated     time.Time `json:"updated"`
	Finished    time.Time `json:"finished,omitzero"`
	BlobsTotal  int       `json:"blobs_total"`
	BlobsDone   int       `json:"blobs_done"`
	BytesTotal  int64     `json:"bytes_total"` // bytes of the selected blobs
	BytesDone   int64     `json:"bytes_done"`  // of which cached (already or fetched by this job)
	// BlobsFetched and BytesFetched count what this run fetched from the
	// upstream (bytes of blobs in progress included); the rest of
	// BlobsDone and BytesDone was cached already.
	BlobsFetched int      `json:"blobs_fetched"`
	BytesFetched int64    `json:"bytes_fetched"`
	Current      string   `json:"current,omitempty"` // digest of a blob being fetched now
	Errors       []string `json:"errors,omitempty"`
	Owner        string   `json:"owner,omitempty"` // replica that ran it last
	// Run counts the runs of this image and platforms (1, 2, ...; 0 in
	// records older than it: 1). The job ID stays the target's
	// (prefetch.JobID); when a new run is queued, the ended run's record
	// is kept as another job, ID "<id>.<run>", with its figures.
	Run int `json:"run,omitempty"`
}

// Ended reports whether the job has ended (done, failed or cancelled).
func (j Job) Ended() bool {
	return j.State == JobDone || j.State == JobFailed || j.State == JobCancelled
}

// MaxJobs is how many jobs a store keeps; beyond it the oldest ended jobs
// are forgotten.
const MaxJobs = 500

// MaxPullLog is how many individual pulls a store keeps (the counters in
// Usage are kept for every repository, tag and platform).
const MaxPullLog = 10000

// Store is the persistence behind tracking and prefetch. Every method may
// fail when the backend is unreachable; callers log, count and carry on.
type Store interface {
	// PutTags inserts or updates tags (keyed by repository and name).
	PutTags(ctx context.Context, tags []Tag) error
	// Tags returns the tags known for repo, sorted by name.
	Tags(ctx context.Context, repo string) ([]Tag, error)
	// MarkPolled records that repo's tags were listed at t.
	MarkPolled(ctx context.Context, repo string, t time.Time) error
	// Repositories returns every repository polled or pulled, sorted by name.
	Repositories(ctx context.Context) ([]Repository, error)
	// RecordPull adds p to the pull log and to the Usage counters.
	RecordPull(ctx context.Context, p Pull) error
	// Usage returns the counters whose last pull is at or after since.
	Usage(ctx context.Context, since time.Time) ([]Usage, error)
	// RecentPulls returns up to n pulls, newest first.
	RecentPulls(ctx context.Context, n int) ([]Pull, error)

	// PutJob creates or replaces a job. A cancelled job is replaced only
	// by a queued one (enqueued again) or a cancelled one (its final
	// progress); any other write returns ErrCancelled and changes nothing.
	PutJob(ctx context.Context, j Job) error
	// CancelJob marks a queued or running job cancelled (Finished and
	// Updated now, no Current blob) and returns it as stored. A job that
	// has ended already is returned unchanged (its State says so). It
	// returns ErrNotFound for an unknown id.
	CancelJob(ctx context.Context, id string) (Job, error)
	// Job returns job id, or ErrNotFound.
	Job(ctx context.Context, id string) (Job, error)
	// Jobs returns every kept job, newest first.
	Jobs(ctx context.Context) ([]Job, error)

	// Lock and Unlock take, renew and release named leases (the
	// scheduler lock, the budget leader lock, manifest leases).
	lease.Locker
	// Claim returns true to exactly one caller per key within ttl: the
	// guard that makes a scheduled tick run once even across a change of
	// lock holder.
	Claim(ctx context.Context, key string, ttl time.Duration) (bool, error)

	// Ping checks the backend.
	Ping(ctx context.Context) error
	Close() error
}

// cancelled returns j marked cancelled at now (see Store.CancelJob).
func cancelled(j Job, now time.Time) Job {
	j.State, j.Current, j.Finished, j.Updated = JobCancelled, "", now, now
	return j
}

// replaceable reports whether PutJob may write next over a stored job in
// state cur (see Store.PutJob).
func replaceable(cur, next string) bool {
	return cur != JobCancelled || next == JobQueued || next == JobCancelled
}
