// Package dirlock gives one process at a time a directory: an exclusive
// flock(2) on a lock file in it, which the kernel releases when the process
// ends, however it ends (no stale lock after a crash or kill -9). The lock
// file holds the holder's PID, so that a refused process can name it.
package dirlock

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Name is the lock file's name inside the locked directory.
const Name = ".lock"

// HeldError says that another process holds the lock: Path is the lock
// file, PID the holder's process ID as it wrote it (0 when it has not yet
// or the file could not be read).
type HeldError struct {
	Path string
	PID  int
}

func (e *HeldError) Error() string {
	if e.PID == 0 {
		return fmt.Sprintf("%s is locked by another process", e.Path)
	}
	return fmt.Sprintf("%s is locked by process %d", e.Path, e.PID)
}

// ErrUnlockable wraps a failure to create the lock file because the
// directory cannot be written (a read-only disk, no permission): no other
// process can write there either, but the caller decides what it may then
// do without the lock.
var ErrUnlockable = errors.New("dirlock: cannot create the lock file")

// Lock is a held lock; Release gives it up.
type Lock struct {
	f *os.File
}

// Acquire takes the lock of dir (created if missing) without waiting. It
// returns a *HeldError when another process (or another Acquire in this
// one) holds it, an error wrapping ErrUnlockable when the lock file can
// neither be created nor opened (read-only disk, permissions), and other
// errors as they come. An existing lock file on a read-only disk is still
// locked (flock needs no write access).
func Acquire(dir string) (*Lock, error) {
	path := filepath.Join(dir, Name)
	if err := os.MkdirAll(dir, 0o750); err != nil && !unwritable(err) {
		return nil, err
	}
	writable := true
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o640)
	if unwritable(err) {
		writable = false
		if f, err = os.Open(path); err != nil {
			return nil, fmt.Errorf("%w %s: %w", ErrUnlockable, path, err)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("dirlock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, &HeldError{Path: path, PID: readPID(path)}
		}
		return nil, fmt.Errorf("dirlock: flock %s: %w", path, err)
	}
	if writable {
		// The PID is information for a refused process, not the lock: a
		// failure to write it is no reason to give the lock up.
		if err := f.Truncate(0); err == nil {
			_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
		}
	}
	return &Lock{f: f}, nil
}

// Release gives the lock up. The lock file stays (removing it would let a
// process that opened it before the removal lock a file nobody else sees).
func (l *Lock) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close() // closing the last descriptor releases the flock
	l.f = nil
	return err
}

func readPID(path string) int {
	raw, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil || pid <= 0 {
		return 0
	}
	return pid
}

func unwritable(err error) bool {
	return errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS)
}
