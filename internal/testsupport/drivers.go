package testsupport

import (
	"testing"

	"github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	"github.com/distribution/distribution/v3/registry/storage/driver/inmemory"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// Driver opens a fresh cache on one storage driver for a test.
type Driver struct {
	Name string
	Open func(t *testing.T) *storage.Store
}

// The drivers tests run on.
var (
	// Filesystem is distribution's filesystem driver, uploads through it.
	Filesystem = Driver{"filesystem", func(t *testing.T) *storage.Store {
		return storage.New(filesystem.New(filesystem.DriverParameters{RootDirectory: t.TempDir(), MaxThreads: 10}))
	}}
	// FilesystemLocal is the filesystem as cmd/mirror opens it: uploads
	// written straight to their file (storage.WithLocalRoot).
	FilesystemLocal = Driver{"filesystem-local-uploads", func(t *testing.T) *storage.Store {
		dir := t.TempDir()
		return storage.New(filesystem.New(filesystem.DriverParameters{RootDirectory: dir, MaxThreads: 10}), storage.WithLocalRoot(dir))
	}}
	// InMemory is distribution's in-memory driver.
	InMemory = Driver{"inmemory", func(*testing.T) *storage.Store { return storage.New(inmemory.New()) }}
	// S3 is distribution's s3-aws driver on a real S3 server (StartS3).
	S3 = Driver{"s3", func(t *testing.T) *storage.Store { return OpenS3(t, StartS3(t)) }}
)

// Named returns d under another subtest name.
func (d Driver) Named(name string) Driver { d.Name = name; return d }

// ForEachDriver runs fn as a parallel subtest (named after the driver) on
// a fresh Store on each of drivers, or on all four when none is given.
func ForEachDriver(t *testing.T, fn func(t *testing.T, s *storage.Store), drivers ...Driver) {
	t.Helper()
	if len(drivers) == 0 {
		drivers = []Driver{Filesystem, FilesystemLocal, InMemory, S3}
	}
	for _, d := range drivers {
		t.Run(d.Name, func(t *testing.T) {
			t.Parallel()
			fn(t, d.Open(t))
		})
	}
}
