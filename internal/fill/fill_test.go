package fill

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	driver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// bound is the longest any single wait in these tests may take.
const bound = 2 * time.Second

var errBroken = errors.New("test: upstream connection broken")

// hookDriver is an in-memory storage driver whose Move (the last step of a
// blob commit) can be held or made to fail.
type hookDriver struct {
	driver.StorageDriver
	move func(ctx context.Context, src, dst string) error
}

func (d *hookDriver) Move(ctx context.Context, src, dst string) error {
	if d.move != nil {
		if err := d.move(ctx, src, dst); err != nil {
			return err
		}
	}
	return d.StorageDriver.Move(ctx, src, dst)
}

type testEnv struct {
	g     *Group
	store *storage.Store
	d     *hookDriver
}

func newEnv(t *testing.T, opts Options, move func(ctx context.Context, src, dst string) error) *testEnv {
	t.Helper()
	d := &hookDriver{StorageDriver: inmemory.New(), move: move}
	store := storage.New(d)
	if opts.SpoolDir == "" {
		opts.SpoolDir = t.TempDir()
	}
	if opts.IdleTimeout == 0 {
		opts.IdleTimeout = 5 * time.Second
	}
	e := &testEnv{g: NewGroup(store, opts), store: store, d: d}
	t.Cleanup(func() { e.waitIdle(t) })
	return e
}

// waitIdle waits until no fill runs.
func (e *testEnv) waitIdle(t *testing.T) {
	t.Helper()
	if !testsupport.Until(bound, 2*time.Millisecond, func() bool { return e.g.InFlight() == 0 }) {
		t.Errorf("%d fills still running after %v", e.g.InFlight(), bound)
	}
}

// assertNotStored checks that dgst is not in the cache and that no upload
// was left behind.
func (e *testEnv) assertNotStored(t *testing.T, dgst digest.Digest) {
	t.Helper()
	if _, err := e.store.StatBlob(context.Background(), dgst); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("blob %s is in the cache (%v)", dgst, err)
	}
	if up, err := e.d.List(context.Background(), "/_uploads"); err == nil && len(up) > 0 {
		t.Errorf("uploads left behind: %q", up)
	}
}

func (e *testEnv) assertStored(t *testing.T, dgst digest.Digest, data []byte) {
	t.Helper()
	rc, err := e.store.OpenBlob(context.Background(), dgst, 0)
	if err != nil {
		t.Fatalf("blob not cached: %v", err)
	}
	defer rc.Close()
	got, err := io.ReadAll(rc)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("cached blob: %d bytes (%v), want %d", len(got), err, len(data))
	}
}

func randomBlob(t *testing.T, n int) ([]byte, digest.Digest) {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b, digest.FromBytes(b)
}

// source is a scripted upstream serving data from memory.
type source struct {
	data       []byte
	size       func(off int64) int64 // the size reported; nil: len(data)
	chunk      int                   // bytes per Read; 0: 4 KiB
	interval   time.Duration         // pause before each Read
	breakAfter int                   // each body fails with errBroken after this many bytes; 0: never
	stallAt    int64                 // bodies block at this offset until unblock; <0: never
	openStall  bool                  // calls block until unblock before answering
	openErr    error                 // calls fail with this

	release chan struct{}
	once    sync.Once

	mu      sync.Mutex
	offsets []int64 // offset of each call
	causes  []error // context.Cause of each cancelled stall
}

func newSource(t *testing.T, data []byte) *source {
	s := &source{data: data, stallAt: -1, release: make(chan struct{})}
	t.Cleanup(s.unblock)
	return s
}

func (s *source) unblock() { s.once.Do(func() { close(s.release) }) }

func (s *source) calls() []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int64(nil), s.offsets...)
}

func (s *source) seenCauses() []error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]error(nil), s.causes...)
}

func (s *source) cancelled(ctx context.Context) error {
	s.mu.Lock()
	s.causes = append(s.causes, context.Cause(ctx))
	s.mu.Unlock()
	return ctx.Err()
}

func (s *source) open(ctx context.Context, off int64) (io.ReadCloser, int64, error) {
	s.mu.Lock()
	s.offsets = append(s.offsets, off)
	s.mu.Unlock()
	if s.openStall {
		select {
		case <-s.release:
		case <-ctx.Done():
			return nil, 0, s.cancelled(ctx)
		}
	}
	if s.openErr != nil {
		return nil, 0, s.openErr
	}
	size := int64(len(s.data))
	if s.size != nil {
		size = s.size(off)
	}
	return &body{s: s, ctx: ctx, off: off}, size, nil
}

type body struct {
	s    *source
	ctx  context.Context
	off  int64
	sent int
}

func (b *body) Read(p []byte) (int, error) {
	s := b.s
	if s.interval > 0 {
		select {
		case <-time.After(s.interval):
		case <-b.ctx.Done():
			return 0, s.cancelled(b.ctx)
		}
	}
	if s.stallAt >= 0 && b.off >= s.stallAt {
		select {
		case <-s.release:
		case <-b.ctx.Done():
			return 0, s.cancelled(b.ctx)
		}
	}
	if s.breakAfter > 0 && b.sent >= s.breakAfter {
		return 0, errBroken
	}
	if b.off >= int64(len(s.data)) {
		return 0, io.EOF
	}
	chunk := s.chunk
	if chunk == 0 {
		chunk = 4 << 10
	}
	n := min(int64(len(p)), int64(chunk), int64(len(s.data))-b.off)
	if s.stallAt >= 0 && b.off < s.stallAt {
		n = min(n, s.stallAt-b.off)
	}
	if s.breakAfter > 0 {
		n = min(n, int64(s.breakAfter-b.sent))
	}
	copy(p, s.data[b.off:b.off+n])
	b.off += n
	b.sent += int(n)
	return int(n), nil
}

func (b *body) Close() error { return nil }

// readRange reads [off, end) of f, bounded in time.
func readRange(t *testing.T, f *Fill, off, end int64) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), bound)
	defer cancel()
	return io.ReadAll(f.NewReader(ctx, off, end))
}

func waitSize(t *testing.T, f *Fill) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), bound)
	defer cancel()
	size, err := f.Wait(ctx)
	if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	return size
}

func done(t *testing.T, f *Fill) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), bound)
	defer cancel()
	err := f.Done(ctx)
	if errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil {
		t.Fatalf("fill not done after %v", bound)
	}
	return err
}

func TestJoinCoalesces(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{}, nil)
	data, dgst := randomBlob(t, 100<<10)
	src := newSource(t, data)
	src.stallAt = 0

	f1, started1 := mustJoin(t, e.g, dgst, src.open)
	defer f1.Release()
	f2, started2 := mustJoin(t, e.g, dgst, func(context.Context, int64) (io.ReadCloser, int64, error) {
		t.Error("the second Join's source was called")
		return nil, 0, errors.New("unexpected")
	})
	defer f2.Release()
	if f1 != f2 || !started1 || started2 {
		t.Fatalf("Join: %p started=%v, then %p started=%v; want the same fill, true then false", f1, started1, f2, started2)
	}
	if n := e.g.InFlight(); n != 1 {
		t.Fatalf("InFlight %d, want 1", n)
	}
	src.unblock()
	if size := waitSize(t, f2); size != int64(len(data)) {
		t.Fatalf("Wait = %d, want %d", size, len(data))
	}
	got, err := readRange(t, f2, 0, int64(len(data)))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read %d bytes (%v), want %d", len(got), err, len(data))
	}
	if err := done(t, f1); err != nil {
		t.Fatal(err)
	}
	if calls := src.calls(); len(calls) != 1 {
		t.Fatalf("source called %d times (%v), want once", len(calls), calls)
	}
	e.assertStored(t, dgst, data)
}

func TestJoinAfterFinishStartsAnew(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{}, nil)
	data, dgst := randomBlob(t, 10<<10)
	bad := newSource(t, data)
	bad.openErr = errBroken
	f, _ := mustJoin(t, e.g, dgst, bad.open)
	if err := done(t, f); !errors.Is(err, errBroken) {
		t.Fatalf("Done: %v, want errBroken", err)
	}
	f.Release()
	e.waitIdle(t)
	// A failed fill is forgotten: the next Join fetches again.
	good := newSource(t, data)
	f2, started := mustJoin(t, e.g, dgst, good.open)
	defer f2.Release()
	if !started || f2 == f {
		t.Fatal("Join after a failed fill did not start a new one")
	}
	if err := done(t, f2); err != nil {
		t.Fatal(err)
	}
	e.assertStored(t, dgst, data)
}

func TestReadersAtOffsets(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{}, nil)
	const size = 1 << 20
	data, dgst := randomBlob(t, size)
	src := newSource(t, data)
	src.chunk = 16 << 10
	src.stallAt = size / 2

	f, _ := mustJoin(t, e.g, dgst, src.open)
	defer f.Release()
	if got := waitSize(t, f); got != size {
		t.Fatalf("Wait = %d, want %d", got, size)
	}
	ranges := [][2]int64{
		{0, size}, {size / 2, size}, {100, 5000}, {size - 1, size}, {size/2 - 10, size/2 + 10},
		{0, 1}, {size - 4097, size - 1}, {12345, 12345},
	}
	type result struct {
		data []byte
		err  error
	}
	results := make([]result, len(ranges))
	var wg sync.WaitGroup
	for i, r := range ranges {
		wg.Go(func() {
			b, err := readRange(t, f, r[0], r[1])
			results[i] = result{b, err}
		})
	}
	// A reader of the first half finishes while the fill is stalled.
	if b, err := readRange(t, f, 0, size/2); err != nil || !bytes.Equal(b, data[:size/2]) {
		t.Fatalf("first half during the stall: %d bytes, %v", len(b), err)
	}
	src.unblock()
	wg.Wait()
	for i, r := range ranges {
		if results[i].err != nil || !bytes.Equal(results[i].data, data[r[0]:r[1]]) {
			t.Errorf("range [%d,%d): %d bytes, %v", r[0], r[1], len(results[i].data), results[i].err)
		}
	}
	if err := done(t, f); err != nil {
		t.Fatal(err)
	}
	// A reader after the commit still reads the spool.
	if b, err := readRange(t, f, 7, size); err != nil || !bytes.Equal(b, data[7:]) {
		t.Fatalf("after commit: %d bytes, %v", len(b), err)
	}
}

// TestLastByteReleasedOnceVerified: the last byte is released when the
// content is verified, before the commit (fsync, rename) finishes; Done
// waits for the commit.
func TestLastByteReleasedOnceVerified(t *testing.T) {
	t.Parallel()
	moving := make(chan struct{})
	gate := make(chan struct{})
	var gateOnce sync.Once
	openGate := func() { gateOnce.Do(func() { close(gate) }) }
	t.Cleanup(openGate)
	var movingOnce sync.Once
	e := newEnv(t, Options{}, func(ctx context.Context, src, dst string) error {
		movingOnce.Do(func() { close(moving) })
		<-gate
		return nil
	})
	const size = 50 << 10
	data, dgst := randomBlob(t, size)
	src := newSource(t, data)
	f, _ := mustJoin(t, e.g, dgst, src.open)
	defer f.Release()
	waitSize(t, f)

	ctx, cancel := context.WithTimeout(t.Context(), bound)
	defer cancel()
	select {
	case <-moving: // verified; the commit is under way and held
	case <-time.After(bound):
		t.Fatal("the fill never reached the commit")
	}
	got, err := io.ReadAll(f.NewReader(ctx, 0, size))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("while the commit is held: %d bytes, %v", len(got), err)
	}
	doneCh := make(chan error, 1)
	go func() { doneCh <- f.Done(ctx) }()
	select {
	case err := <-doneCh:
		t.Fatalf("Done returned (%v) before the commit finished", err)
	case <-time.After(100 * time.Millisecond):
	}
	openGate()
	if err := <-doneCh; err != nil {
		t.Fatal(err)
	}
	e.assertStored(t, dgst, data)
}

// TestDigestMismatch: a corrupt byte fails the fill, every reader gets all
// but the last byte and then the error, and nothing is cached; also when
// the corrupt byte is in the last of many buffers, hashed behind the spool
// writes (see pipe).
func TestDigestMismatch(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name          string
		size, corrupt int
		chunk         int // bytes per upstream Read; 0: the source's default
	}{
		{"small", 64 << 10, 64 << 10 / 3, 0},
		{"last of many buffers", 3<<20 + 5, 3<<20 + 3, chunkSize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, Options{}, nil)
			size := int64(tc.size)
			data, dgst := randomBlob(t, tc.size)
			corrupt := bytes.Clone(data)
			corrupt[tc.corrupt] ^= 0xff
			src := newSource(t, corrupt)
			src.chunk = tc.chunk
			src.stallAt = size / 2 // readers are waiting when the mismatch is found

			f, _ := mustJoin(t, e.g, dgst, src.open)
			defer f.Release()
			waitSize(t, f)
			offsets := []int64{0, size / 2, size - 1}
			errs := make([]error, len(offsets))
			lens := make([]int, len(offsets))
			var wg sync.WaitGroup
			for i, off := range offsets {
				wg.Go(func() {
					b, err := readRange(t, f, off, size)
					errs[i], lens[i] = err, len(b)
				})
			}
			time.Sleep(20 * time.Millisecond)
			src.unblock()
			wg.Wait()
			for i, off := range offsets {
				if !errors.Is(errs[i], storage.ErrDigestMismatch) {
					t.Errorf("reader at %d: %v, want a digest mismatch", off, errs[i])
				}
				if want := int(size - 1 - off); lens[i] != want {
					t.Errorf("reader at %d got %d bytes, want %d (all but the last)", off, lens[i], want)
				}
			}
			if err := done(t, f); !errors.Is(err, storage.ErrDigestMismatch) {
				t.Fatalf("Done: %v, want a digest mismatch", err)
			}
			// A reader that joins after the failure gets the error too.
			if _, err := readRange(t, f, 0, size); !errors.Is(err, storage.ErrDigestMismatch) {
				t.Fatalf("late reader: %v", err)
			}
			e.waitIdle(t)
			e.assertNotStored(t, dgst)
		})
	}
}

func TestSizeMismatch(t *testing.T) {
	t.Parallel()
	const size = 20 << 10
	for _, tc := range []struct {
		name  string
		setup func(s *source)
	}{
		{"more bytes than announced", func(s *source) {
			s.size = func(int64) int64 { return size - 100 }
			s.chunk = size
		}},
		{"size changes on resume", func(s *source) {
			s.breakAfter = size / 4
			s.size = func(off int64) int64 {
				if off > 0 {
					return size + 1
				}
				return size
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, Options{}, nil)
			data, dgst := randomBlob(t, size)
			src := newSource(t, data)
			tc.setup(src)
			f, _ := mustJoin(t, e.g, dgst, src.open)
			defer f.Release()
			if err := done(t, f); !errors.Is(err, storage.ErrSizeMismatch) {
				t.Fatalf("Done: %v, want a size mismatch", err)
			}
			if _, err := readRange(t, f, 0, 10); err != nil {
				// Bytes before the failure point may be read; nothing else.
				if !errors.Is(err, storage.ErrSizeMismatch) {
					t.Fatalf("reader: %v", err)
				}
			}
			e.waitIdle(t)
			e.assertNotStored(t, dgst)
		})
	}
}

func TestUnknownSizeAndOpenError(t *testing.T) {
	t.Parallel()
	data, dgst := randomBlob(t, 1000)
	for _, tc := range []struct {
		name  string
		setup func(*source)
		want  error
	}{
		{"negative size", func(s *source) { s.size = func(int64) int64 { return -1 } }, ErrUnknownSize},
		{"open error", func(s *source) { s.openErr = errBroken }, errBroken},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, Options{}, nil)
			src := newSource(t, data)
			tc.setup(src)
			f, _ := mustJoin(t, e.g, dgst, src.open)
			defer f.Release()
			ctx, cancel := context.WithTimeout(t.Context(), bound)
			defer cancel()
			if size, err := f.Wait(ctx); !errors.Is(err, tc.want) || size != 0 {
				t.Fatalf("Wait = %d, %v; want %v", size, err, tc.want)
			}
			if err := done(t, f); !errors.Is(err, tc.want) {
				t.Fatalf("Done: %v, want %v", err, tc.want)
			}
			if f.Cached() {
				t.Fatal("Cached() true")
			}
			e.waitIdle(t)
			e.assertNotStored(t, dgst)
		})
	}
}

func TestSpoolError(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{SpoolDir: filepath.Join(t.TempDir(), "missing")}, nil)
	data, dgst := randomBlob(t, 1000)
	f, _ := mustJoin(t, e.g, dgst, newSource(t, data).open)
	defer f.Release()
	ctx, cancel := context.WithTimeout(t.Context(), bound)
	defer cancel()
	if _, err := f.Wait(ctx); !errors.Is(err, ErrSpool) {
		t.Fatalf("Wait: %v, want ErrSpool", err)
	}
	e.waitIdle(t)
	e.assertNotStored(t, dgst)
}

func TestResume(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		size       int
		maxResumes int
		wantCalls  []int64
		wantErr    bool
	}{
		{"completes after resumes", 3500, 0, []int64{0, 1000, 2000, 3000}, false},
		{"default limit of 3 resumes", 10000, 0, []int64{0, 1000, 2000, 3000}, true},
		{"limit of 1", 10000, 1, []int64{0, 1000}, true},
		{"no resumes", 10000, -1, []int64{0}, true},
		{"break exactly at the end", 2000, 1, []int64{0, 1000}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, Options{MaxResumes: tc.maxResumes}, nil)
			data, dgst := randomBlob(t, tc.size)
			src := newSource(t, data)
			src.chunk = 300 // breaks fall mid-read-sequence
			src.breakAfter = 1000
			f, _ := mustJoin(t, e.g, dgst, src.open)
			defer f.Release()
			waitSize(t, f)
			got, rerr := readRange(t, f, 0, int64(tc.size))
			err := done(t, f)
			calls := src.calls()
			if len(calls) != len(tc.wantCalls) {
				t.Fatalf("source called at offsets %v, want %v", calls, tc.wantCalls)
			}
			for i := range calls {
				if calls[i] != tc.wantCalls[i] {
					t.Fatalf("source called at offsets %v, want %v", calls, tc.wantCalls)
				}
			}
			if tc.wantErr {
				reached := int(tc.wantCalls[len(tc.wantCalls)-1]) + 1000
				if !errors.Is(err, errBroken) || !errors.Is(rerr, errBroken) {
					t.Fatalf("Done: %v, reader: %v; want errBroken", err, rerr)
				}
				if !bytes.Equal(got, data[:reached]) {
					t.Fatalf("reader got %d bytes before the failure, want the %d fetched", len(got), reached)
				}
				e.waitIdle(t)
				e.assertNotStored(t, dgst)
				return
			}
			if err != nil || rerr != nil || !bytes.Equal(got, data) {
				t.Fatalf("Done: %v, reader: %d bytes, %v", err, len(got), rerr)
			}
			e.assertStored(t, dgst, data)
		})
	}
}

func TestIdleTimeout(t *testing.T) {
	t.Parallel()
	t.Run("stall mid-body", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, Options{IdleTimeout: 100 * time.Millisecond}, nil)
		data, dgst := randomBlob(t, 10000)
		src := newSource(t, data)
		src.stallAt = 5000
		start := time.Now()
		f, _ := mustJoin(t, e.g, dgst, src.open)
		defer f.Release()
		waitSize(t, f)
		got, err := readRange(t, f, 0, 10000)
		if !errors.Is(err, ErrIdle) || !bytes.Equal(got, data[:5000]) {
			t.Fatalf("reader: %d bytes, %v; want 5000 then ErrIdle", len(got), err)
		}
		if err := done(t, f); !errors.Is(err, ErrIdle) {
			t.Fatalf("Done: %v, want ErrIdle", err)
		}
		if el := time.Since(start); el > bound {
			t.Fatalf("took %v", el)
		}
		if c := src.seenCauses(); len(c) != 1 || c[0] != ErrIdle {
			t.Fatalf("source saw causes %v, want [ErrIdle]", c)
		}
		e.waitIdle(t)
		e.assertNotStored(t, dgst)
	})
	t.Run("stall before answering", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, Options{IdleTimeout: 100 * time.Millisecond}, nil)
		data, dgst := randomBlob(t, 10000)
		src := newSource(t, data)
		src.openStall = true
		f, _ := mustJoin(t, e.g, dgst, src.open)
		defer f.Release()
		ctx, cancel := context.WithTimeout(t.Context(), bound)
		defer cancel()
		if _, err := f.Wait(ctx); !errors.Is(err, ErrIdle) {
			t.Fatalf("Wait: %v, want ErrIdle", err)
		}
		if err := done(t, f); !errors.Is(err, ErrIdle) {
			t.Fatalf("Done: %v, want ErrIdle", err)
		}
	})
	t.Run("slow but steady is not idle", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, Options{IdleTimeout: 250 * time.Millisecond}, nil)
		data, dgst := randomBlob(t, 20*1000)
		src := newSource(t, data)
		src.chunk = 1000
		src.interval = 30 * time.Millisecond // 600 ms in all, well over the idle timeout
		f, _ := mustJoin(t, e.g, dgst, src.open)
		defer f.Release()
		if err := done(t, f); err != nil {
			t.Fatalf("Done: %v", err)
		}
		e.assertStored(t, dgst, data)
	})
}

func TestStopWithoutClients(t *testing.T) {
	t.Parallel()
	t.Run("last client leaves", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, Options{StopWithoutClients: true}, nil)
		data, dgst := randomBlob(t, 10000)
		src := newSource(t, data)
		src.stallAt = 4000
		f1, _ := mustJoin(t, e.g, dgst, src.open)
		f2, _ := mustJoin(t, e.g, dgst, src.open)
		waitSize(t, f1)
		if b, err := readRange(t, f1, 0, 4000); err != nil || len(b) != 4000 {
			t.Fatalf("read %d bytes, %v", len(b), err)
		}
		f1.Release()
		time.Sleep(50 * time.Millisecond)
		if c := src.seenCauses(); len(c) != 0 {
			t.Fatalf("fill cancelled (%v) while a client remained", c)
		}
		f2.Release()
		if err := done(t, f2); !errors.Is(err, ErrNoClients) {
			t.Fatalf("Done: %v, want ErrNoClients", err)
		}
		if c := src.seenCauses(); len(c) != 1 || c[0] != ErrNoClients {
			t.Fatalf("source saw causes %v, want [ErrNoClients]", c)
		}
		e.waitIdle(t)
		e.assertNotStored(t, dgst)
	})
	t.Run("fill outlives its clients by default", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, Options{}, nil)
		data, dgst := randomBlob(t, 10000)
		src := newSource(t, data)
		src.stallAt = 4000
		f, _ := mustJoin(t, e.g, dgst, src.open)
		waitSize(t, f)
		f.Release()
		time.Sleep(50 * time.Millisecond)
		if c := src.seenCauses(); len(c) != 0 {
			t.Fatalf("fill cancelled (%v) when its client left", c)
		}
		src.unblock()
		e.waitIdle(t)
		e.assertStored(t, dgst, data)
	})
}

func TestAlreadyCached(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{}, nil)
	data, dgst := randomBlob(t, 3000)
	ctx := t.Context()
	w, err := e.store.CreateBlob(ctx, dgst, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = w.Write(data)
	if err := w.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int32
	f, started := mustJoin(t, e.g, dgst, func(context.Context, int64) (io.ReadCloser, int64, error) {
		calls.Add(1)
		return nil, 0, errors.New("source called for a cached blob")
	})
	defer f.Release()
	if !started {
		t.Fatal("Join did not start a fill")
	}
	if size := waitSize(t, f); size != int64(len(data)) {
		t.Fatalf("Wait = %d, want %d", size, len(data))
	}
	if !f.Cached() {
		t.Fatal("Cached() false for a blob in the store")
	}
	if err := done(t, f); err != nil {
		t.Fatalf("Done: %v", err)
	}
	if calls.Load() != 0 {
		t.Fatal("the source was called")
	}
}

func TestVerifiedButNotCached(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{}, func(context.Context, string, string) error {
		return errors.New("disk full")
	})
	data, dgst := randomBlob(t, 30000)
	f, _ := mustJoin(t, e.g, dgst, newSource(t, data).open)
	defer f.Release()
	waitSize(t, f)
	got, err := readRange(t, f, 0, int64(len(data)))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("reader: %d bytes, %v; want the whole blob", len(got), err)
	}
	if err := done(t, f); err != nil {
		t.Fatalf("Done: %v, want nil for verified content", err)
	}
	e.waitIdle(t)
	if _, err := e.store.StatBlob(t.Context(), dgst); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("StatBlob: %v, want not found", err)
	}
}

func TestWaitAndInFlight(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{}, nil)
	if n := e.g.InFlight(); n != 0 {
		t.Fatalf("InFlight %d before any fill", n)
	}
	dataA, dgstA := randomBlob(t, 5000)
	dataB, dgstB := randomBlob(t, 7000)
	srcA, srcB := newSource(t, dataA), newSource(t, dataB)
	srcA.openStall, srcB.stallAt = true, 10
	fa, _ := mustJoin(t, e.g, dgstA, srcA.open)
	defer fa.Release()
	fb, _ := mustJoin(t, e.g, dgstB, srcB.open)
	defer fb.Release()
	if n := e.g.InFlight(); n != 2 {
		t.Fatalf("InFlight %d, want 2", n)
	}
	// A's size is unknown until its source answers.
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	if _, err := fa.Wait(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait before the source answered: %v, want the context's deadline", err)
	}
	cancel()
	ctx, cancel = context.WithTimeout(t.Context(), 50*time.Millisecond)
	if err := fb.Done(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Done of a stalled fill: %v, want the context's deadline", err)
	}
	cancel()
	if size := waitSize(t, fb); size != int64(len(dataB)) {
		t.Fatalf("Wait B = %d, want %d", size, len(dataB))
	}
	srcA.unblock()
	srcB.unblock()
	if size := waitSize(t, fa); size != int64(len(dataA)) {
		t.Fatalf("Wait A = %d, want %d", size, len(dataA))
	}
	if err := done(t, fa); err != nil {
		t.Fatal(err)
	}
	if err := done(t, fb); err != nil {
		t.Fatal(err)
	}
	e.waitIdle(t)
	e.assertStored(t, dgstA, dataA)
	e.assertStored(t, dgstB, dataB)
}

func TestReaderContextCancelled(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{}, nil)
	data, dgst := randomBlob(t, 8000)
	src := newSource(t, data)
	src.stallAt = 3000
	f, _ := mustJoin(t, e.g, dgst, src.open)
	defer f.Release()
	waitSize(t, f)
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	got, err := io.ReadAll(f.NewReader(ctx, 0, 8000))
	if !errors.Is(err, context.DeadlineExceeded) || len(got) != 3000 {
		t.Fatalf("reader: %d bytes, %v; want 3000 then the deadline", len(got), err)
	}
	// The fill goes on without that reader.
	src.unblock()
	if err := done(t, f); err != nil {
		t.Fatal(err)
	}
	e.assertStored(t, dgst, data)
}

// TestSlowCommitNotCutByIdleTimeout: the idle timeout bounds the upstream,
// not the commit; a commit slower than it still caches the blob.
func TestSlowCommitNotCutByIdleTimeout(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{IdleTimeout: 100 * time.Millisecond}, func(ctx context.Context, src, dst string) error {
		select {
		case <-time.After(300 * time.Millisecond):
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	data, dgst := randomBlob(t, 5000)
	src := newSource(t, data)
	f, _ := mustJoin(t, e.g, dgst, src.open)
	if err := done(t, f); err != nil {
		t.Fatalf("Done: %v", err)
	}
	f.Release()
	e.waitIdle(t)
	e.assertStored(t, dgst, data)
}

// TestRejoinAfterLastClientLeftStartsAnew: with StopWithoutClients, a client
// arriving just after the last one left gets a new fill, not the cancelled
// one.
func TestRejoinAfterLastClientLeftStartsAnew(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{StopWithoutClients: true}, nil)
	data, dgst := randomBlob(t, 10000)
	src := newSource(t, data)
	src.stallAt = 4000
	f1, _ := mustJoin(t, e.g, dgst, src.open)
	waitSize(t, f1)
	f1.Release()
	src2 := newSource(t, data)
	f2, started := mustJoin(t, e.g, dgst, src2.open)
	if !started || f2 == f1 {
		t.Fatal("joined the fill its last client had left (and that is being cancelled)")
	}
	if err := done(t, f2); err != nil {
		t.Fatalf("new fill: %v", err)
	}
	f2.Release()
	e.waitIdle(t)
	e.assertStored(t, dgst, data)
}

// mustJoin joins or starts the fill of dgst; it fails the test on
// ErrTooManyFills.
func mustJoin(t *testing.T, g *Group, dgst digest.Digest, src Source) (*Fill, bool) {
	t.Helper()
	return mustJoinKey(t, g, "", dgst, src)
}

// TestMaxFills: past MaxFills running fills, a new digest is refused while
// joining a running fill still works.
func TestMaxFills(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{MaxFills: 1}, nil)
	data, dgst := randomBlob(t, 10000)
	src := newSource(t, data)
	src.stallAt = 4000
	f1, _ := mustJoin(t, e.g, dgst, src.open)
	f2, started := mustJoin(t, e.g, dgst, src.open)
	if started || f2 != f1 {
		t.Fatal("second client did not join the running fill")
	}
	other, odgst := randomBlob(t, 100)
	if _, _, err := e.g.Join("", odgst, newSource(t, other).open); !errors.Is(err, ErrTooManyFills) {
		t.Fatalf("Join of another digest: %v, want ErrTooManyFills", err)
	}
	src.unblock()
	f1.Release()
	f2.Release()
	e.waitIdle(t)
	if err := e.g.Wait(t.Context()); err != nil {
		t.Fatal(err)
	}
	f3, _ := mustJoin(t, e.g, odgst, newSource(t, other).open)
	f3.Release()
}

// TestMaxFillsPer: a key's bound (MaxFillsPer) refuses its key's next
// new fill, naming the key, while joining its running fill, other keys'
// fills and fills without a key go on up to MaxFills, whose refusal names
// no key; a slot comes back when its fill ends.
func TestMaxFillsPer(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{MaxFills: 3, MaxFillsPer: map[string]int{"slow.example": 1, "idle.example": 0}}, nil)
	stalled := func() (*source, digest.Digest) {
		data, dgst := randomBlob(t, 10000)
		src := newSource(t, data)
		src.stallAt = 4000
		return src, dgst
	}
	refused := func(key string, wantKey string) {
		t.Helper()
		other, odgst := randomBlob(t, 100)
		_, _, err := e.g.Join(key, odgst, newSource(t, other).open)
		var le *LimitError
		if !errors.Is(err, ErrTooManyFills) || !errors.As(err, &le) || le.Key != wantKey {
			t.Fatalf("Join of another digest for key %q: %v, want a LimitError of key %q", key, err, wantKey)
		}
	}
	slowSrc, slow := stalled()
	f1, _ := mustJoinKey(t, e.g, "slow.example", slow, slowSrc.open)
	refused("slow.example", "slow.example")
	if f, started := mustJoinKey(t, e.g, "slow.example", slow, slowSrc.open); started || f != f1 {
		t.Fatal("a client of the running fill did not join it past its key's bound")
	} else {
		f.Release()
	}
	// Other keys (one bound by 0: none) and no key share MaxFills.
	aSrc, a := stalled()
	fa, _ := mustJoinKey(t, e.g, "idle.example", a, aSrc.open)
	bSrc, b := stalled()
	fb, _ := mustJoinKey(t, e.g, "", b, bSrc.open)
	refused("other.example", "")
	refused("slow.example", "slow.example") // its own bound is checked first
	// The slow key's fill ends: its slot and a global one come back.
	slowSrc.unblock()
	if err := done(t, f1); err != nil {
		t.Fatalf("the slow key's fill: %v", err)
	}
	f1.Release()
	if n := e.g.InFlight(); n != 2 { // a fill is unlisted before it is done
		t.Fatalf("%d fills running, want 2", n)
	}
	cSrc, c := stalled()
	fc, started := mustJoinKey(t, e.g, "slow.example", c, cSrc.open)
	if !started {
		t.Fatal("the slow key's next fill did not start once its first ended")
	}
	for _, s := range []*source{aSrc, bSrc, cSrc} {
		s.unblock()
	}
	for _, f := range []*Fill{fa, fb, fc} {
		if err := done(t, f); err != nil {
			t.Fatal(err)
		}
		f.Release()
	}
}

// mustJoinKey joins or starts the fill of dgst under key; it fails the test
// on ErrTooManyFills.
func mustJoinKey(t *testing.T, g *Group, key string, dgst digest.Digest, src Source) (*Fill, bool) {
	t.Helper()
	f, started, err := g.Join(key, dgst, src)
	if err != nil {
		t.Fatalf("Join(%q): %v", key, err)
	}
	return f, started
}

// ctxKeepingDriver imitates distribution's s3-aws writer, which commits
// with the context it was created with (and is held at commit by gate).
type ctxKeepingDriver struct {
	driver.StorageDriver
	gate chan struct{}
}

func (d ctxKeepingDriver) Writer(ctx context.Context, path string, append bool) (driver.FileWriter, error) {
	fw, err := d.StorageDriver.Writer(ctx, path, append)
	return ctxKeepingWriter{FileWriter: fw, ctx: ctx, gate: d.gate}, err
}

type ctxKeepingWriter struct {
	driver.FileWriter
	ctx  context.Context
	gate chan struct{}
}

func (w ctxKeepingWriter) Commit(context.Context) error {
	<-w.gate
	if err := w.ctx.Err(); err != nil {
		return err
	}
	return w.FileWriter.Commit(w.ctx)
}

// TestReleaseAfterVerifyStillCommits: with StopWithoutClients, the only
// client leaving after it got the whole (verified) blob must not cancel
// the commit, also on a driver that commits with the writer's context.
func TestReleaseAfterVerifyStillCommits(t *testing.T) {
	t.Parallel()
	gate := make(chan struct{})
	var gateOnce sync.Once
	t.Cleanup(func() { gateOnce.Do(func() { close(gate) }) })
	store := storage.New(ctxKeepingDriver{StorageDriver: inmemory.New(), gate: gate})
	g := NewGroup(store, Options{StopWithoutClients: true, SpoolDir: t.TempDir()})
	data, dgst := randomBlob(t, 20000)
	f, _ := mustJoin(t, g, dgst, newSource(t, data).open)
	waitSize(t, f)
	ctx, cancel := context.WithTimeout(t.Context(), bound)
	defer cancel()
	got, err := io.ReadAll(f.NewReader(ctx, 0, int64(len(data))))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read: %d bytes, %v", len(got), err)
	}
	f.Release() // the only client leaves during the commit
	gateOnce.Do(func() { close(gate) })
	testsupport.Until(bound, 5*time.Millisecond, func() bool { return g.InFlight() == 0 })
	if size, err := store.StatBlob(t.Context(), dgst); err != nil || size != int64(len(data)) {
		t.Fatalf("verified blob not cached after its client left: %d, %v", size, err)
	}
}

// TestEmptyClaimNeverEndsCleanly: an upstream that claims size 0 for a
// non-empty digest must not give a reader a clean end of file.
func TestEmptyClaimNeverEndsCleanly(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{}, nil)
	_, dgst := randomBlob(t, 100)
	f, _ := mustJoin(t, e.g, dgst, func(context.Context, int64) (io.ReadCloser, int64, error) {
		return io.NopCloser(bytes.NewReader(nil)), 0, nil
	})
	defer f.Release()
	waitSize(t, f)
	ctx, cancel := context.WithTimeout(t.Context(), bound)
	defer cancel()
	if _, err := io.ReadAll(f.NewReader(ctx, 0, 0)); err == nil {
		t.Fatal("a zero-byte claim for a non-empty digest ended cleanly")
	}
	var buf bytes.Buffer
	if _, err := f.NewReader(ctx, 0, 0).(io.WriterTo).WriteTo(&buf); err == nil {
		t.Fatal("WriteTo ended cleanly too")
	}
}

// JoinMissed trusts the caller's lookup (no second one) unless a fill of
// that digest committed since the lookup began: then it looks again and
// finds the blob, rather than fetching it twice.
func TestJoinMissedLooksAgainAfterACommit(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{}, nil)
	data, dgst := randomBlob(t, 3000)
	var calls atomic.Int32
	src := func(context.Context, int64) (io.ReadCloser, int64, error) {
		calls.Add(1)
		return io.NopCloser(bytes.NewReader(data)), int64(len(data)), nil
	}
	seq := e.g.Seq() // a lookup starts, and misses
	f, _ := mustJoin(t, e.g, dgst, src)
	if err := done(t, f); err != nil {
		t.Fatal(err)
	}
	f.Release()
	if !f.Committed() {
		t.Fatal("Committed() false after a commit")
	}
	// The lookup's caller joins after that fill committed and left.
	f2, started, err := e.g.JoinMissed("", dgst, seq, src)
	if err != nil {
		t.Fatal(err)
	}
	defer f2.Release()
	if waitSize(t, f2); !started || !f2.Cached() || calls.Load() != 1 {
		t.Fatalf("JoinMissed after a commit since the lookup: started %v, cached %v, %d upstream fetches; want a new fill that finds the blob", started, f2.Cached(), calls.Load())
	}
	// Other digests committed since do not make it look again.
	data3, d3 := randomBlob(t, 100)
	seq = e.g.Seq()
	f3, _ := mustJoin(t, e.g, d3, func(context.Context, int64) (io.ReadCloser, int64, error) {
		return io.NopCloser(bytes.NewReader(data3)), int64(len(data3)), nil
	})
	_ = done(t, f3)
	f3.Release()
	data4, d4 := randomBlob(t, 100)
	f4, _, err := e.g.JoinMissed("", d4, seq, func(context.Context, int64) (io.ReadCloser, int64, error) {
		return io.NopCloser(bytes.NewReader(data4)), int64(len(data4)), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	defer f4.Release()
	if err := done(t, f4); err != nil || f4.Cached() || !f4.Committed() {
		t.Fatalf("JoinMissed of a missing blob: %v, cached %v, committed %v", err, f4.Cached(), f4.Committed())
	}
}
