package pull_test

import (
	"context"
	"io"
	"net/url"
	"sync/atomic"
	"testing"

	driver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/filesystem"

	"github.com/ngc-mirror/ngc-mirror/internal/auth"
	"github.com/ngc-mirror/ngc-mirror/internal/evict"
	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// listCounter counts the listings a storage driver is asked for (List,
// and Walk, which lists every directory under a path).
type listCounter struct {
	driver.StorageDriver
	lists, walks atomic.Int64
}

func (c *listCounter) List(ctx context.Context, path string) ([]string, error) {
	c.lists.Add(1)
	return c.StorageDriver.List(ctx, path)
}

func (c *listCounter) Walk(ctx context.Context, path string, f driver.WalkFn, opts ...func(*driver.WalkOptions)) error {
	c.walks.Add(1)
	return c.StorageDriver.Walk(ctx, path, f, opts...)
}

// TestMissesListNothing: the cache is listed once, at start (the
// evictor's seed); cold manifests and blobs after that, with a budget that
// evicts on the way, never list the cache (no listing per miss), on the
// local disk and on S3.
func TestMissesListNothing(t *testing.T) {
	for _, c := range []struct {
		name string
		open func(t *testing.T) (driver.StorageDriver, []storage.Option)
	}{
		{"filesystem", func(t *testing.T) (driver.StorageDriver, []storage.Option) {
			dir := t.TempDir()
			return filesystem.New(filesystem.DriverParameters{RootDirectory: dir, MaxThreads: 10}), []storage.Option{storage.WithLocalRoot(dir)}
		}},
		{"s3", func(t *testing.T) (driver.StorageDriver, []storage.Option) {
			return testsupport.OpenS3(t, testsupport.StartS3(t)).Driver(), nil
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			up := ngctest.New(ngctest.Options{})
			t.Cleanup(up.Close)
			fx, err := up.Populate(4 << 10)
			if err != nil {
				t.Fatal(err)
			}
			d, sopts := c.open(t)
			lc := &listCounter{StorageDriver: d}
			store := storage.New(lc, sopts...)
			// A budget of a few layers: the image's blobs do not all fit,
			// so admissions run eviction passes on the way.
			ev := evict.New(store, evict.Options{MaxSize: 24 << 10})
			objs, err := store.Scan(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			ev.SeedObjects(objs)
			if lc.walks.Load() == 0 {
				t.Fatal("the start-up scan did not list the cache (the counter is not in the path)")
			}
			lc.lists.Store(0)
			lc.walks.Store(0)
			origin, _ := url.Parse(up.URL())
			client := upstream.New(origin, auth.NewTransport(nil, origin, auth.Credentials{}, nil))
			fills := fill.NewGroup(store, fill.Options{SpoolDir: t.TempDir(), Budget: ev})
			svc := pull.New(client, store, fills, pull.Options{Cache: ev})
			t.Cleanup(func() { _ = fills.Wait(context.Background()) })

			ctx := t.Context()
			var fetched int64
			for _, im := range []*ngctest.Image{fx.Pytorch, fx.CUDA, fx.DCGM} {
				repo := ngctest.PytorchRepo
				switch im {
				case fx.CUDA:
					repo = ngctest.CUDARepo
				case fx.DCGM:
					repo = ngctest.DCGMRepo
				}
				if _, err := svc.Manifest(ctx, repo, im.Manifest.Digest.String()); err != nil {
					t.Fatal(err)
				}
				for _, ch := range append([]*ngctest.Image{im}, im.Children...) {
					if _, err := svc.Manifest(ctx, repo, ch.Manifest.Digest.String()); err != nil {
						t.Fatal(err)
					}
				}
				for _, b := range im.Blobs() {
					bl, err := svc.Blob(ctx, repo, b.Digest)
					if err != nil {
						t.Fatal(err)
					}
					r, err := bl.Open(0, bl.Size)
					if err == nil {
						_, err = io.Copy(io.Discard, r)
					}
					bl.Close()
					if err != nil {
						t.Fatal(err)
					}
					fetched += int64(len(b.Body))
				}
			}
			if _, err := svc.Manifest(ctx, ngctest.PytorchRepo, ngctest.PytorchTag); err != nil {
				t.Fatal(err)
			}
			if used, _ := store.Usage(storage.KindBlob); used >= fetched {
				t.Fatalf("the cache holds %d bytes of the %d fetched: nothing was evicted, the budget did not take part", used, fetched)
			}
			if l, w := lc.lists.Load(), lc.walks.Load(); l != 0 || w != 0 {
				t.Errorf("cold manifests and blobs listed the cache: %d List and %d Walk calls, want none", l, w)
			}
		})
	}
}
