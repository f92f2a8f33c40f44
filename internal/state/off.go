package state

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// ErrOff is wrapped by every error of the store Off returns.
var ErrOff = errors.New("state: store off")

// Off returns a Store that keeps nothing: every operation fails with an
// error wrapping ErrOff and cause, and Close does nothing. The mirror runs
// on it when its state file cannot be written (a read-only data disk): the
// registry API is unaffected, while tag tracking, the pull history,
// scheduling and prefetch jobs pause exactly as while Redis is unreachable
// (a warning, ngc_mirror_state_errors_total).
func Off(cause error) Store { return off{err: fmt.Errorf("%w: %w", ErrOff, cause)} }

type off struct{ err error }

func (o off) PutTags(context.Context, []Tag) error                { return o.err }
func (o off) Tags(context.Context, string) ([]Tag, error)         { return nil, o.err }
func (o off) MarkPolled(context.Context, string, time.Time) error { return o.err }
func (o off) Repositories(context.Context) ([]Repository, error)  { return nil, o.err }
func (o off) RecordPull(context.Context, Pull) error              { return o.err }
func (o off) Usage(context.Context, time.Time) ([]Usage, error)   { return nil, o.err }
func (o off) RecentPulls(context.Context, int) ([]Pull, error)    { return nil, o.err }
func (o off) PutJob(context.Context, Job) error                   { return o.err }
func (o off) CancelJob(context.Context, string) (Job, error)      { return Job{}, o.err }
func (o off) Job(context.Context, string) (Job, error)            { return Job{}, o.err }
func (o off) Jobs(context.Context) ([]Job, error)                 { return nil, o.err }
func (o off) Lock(context.Context, string, string, time.Duration) (bool, error) {
	return false, o.err
}
func (o off) Unlock(context.Context, string, string) error               { return o.err }
func (o off) Claim(context.Context, string, time.Duration) (bool, error) { return false, o.err }
func (o off) Ping(context.Context) error                                 { return o.err }
func (o off) Close() error                                               { return nil }
