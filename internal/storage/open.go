package storage

import (
	"context"
	"fmt"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	"github.com/distribution/distribution/v3/registry/storage/driver/factory"
	"github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/s3-aws" // registers "s3aws"
)

// S3Options configure a cache on an S3-compatible store.
type S3Options struct {
	Bucket, Region string
	Endpoint       string // http(s)://host[:port]; empty: AWS
	PathStyle      bool
	Prefix         string
	AccessKey      string
	SecretKey      string // empty with AccessKey: the standard AWS credential chain
	ChunkSize      int64  // bytes, 0: the driver's default
	// Redirect offers presigned URLs of cached blobs (Capabilities.Redirect).
	Redirect bool
}

// Options name a cache to Open.
type Options struct {
	Driver string // "filesystem" or "s3"
	// Dir is the cache directory of the filesystem driver.
	Dir string
	S3  S3Options
}

// Capabilities say what a cache's storage can do, for the code that wires
// it (instead of comparing driver names).
type Capabilities struct {
	// LocalDir is the cache's directory on the local disk, "" when it is
	// not on one (S3): the filesystem whose free space cache.min_free
	// keeps.
	LocalDir string
	// Exclusive means no other process shares the cache (a local disk),
	// so uploads found at start are left by a crash and can be removed
	// (PurgeUploads). A bucket may be shared by replicas.
	Exclusive bool
	// Redirect means cache-hit blob GETs may be answered with a redirect
	// to a presigned URL of the store (S3 with redirect on; BlobURL).
	Redirect bool
	// Location names where the content is, for operators' messages (fsck,
	// gc): the local directory, or s3://BUCKET/PREFIX. "" for a Store
	// not made by Open: see Store.Location.
	Location string
}

// Location returns Capabilities.Location, else the local root, else the
// driver's name.
func (s *Store) Location() string {
	switch {
	case s.caps.Location != "":
		return s.caps.Location
	case s.caps.LocalDir != "":
		return s.caps.LocalDir
	}
	return s.d.Name()
}

// Capabilities returns what the store's driver can do, as Open set it up.
func (s *Store) Capabilities() Capabilities { return s.caps }

// Open opens the cache o names: the filesystem driver in o.Dir, or an S3
// bucket.
func Open(ctx context.Context, o Options) (*Store, error) {
	switch o.Driver {
	case "filesystem":
		return OpenFilesystem(o.Dir)
	case "s3":
		return OpenS3(ctx, o.S3)
	}
	return nil, fmt.Errorf("storage: unknown driver %q (want filesystem or s3)", o.Driver)
}

// OpenFilesystem opens a cache in dir on the local disk (distribution's
// filesystem driver, with uploads the fills can stream from).
func OpenFilesystem(dir string) (*Store, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	d := filesystem.New(filesystem.DriverParameters{RootDirectory: abs, MaxThreads: 100})
	s := New(d, WithLocalRoot(abs))
	s.caps.Exclusive, s.caps.Location = true, abs
	return s, nil
}

// OpenS3 opens a cache in an S3 bucket through distribution's s3-aws driver.
// The bucket must exist.
func OpenS3(ctx context.Context, o S3Options) (*Store, error) {
	params := map[string]any{
		"bucket":         o.Bucket,
		"region":         o.Region,
		"forcepathstyle": o.PathStyle,
		"v4auth":         true,
	}
	if o.Endpoint != "" {
		u, err := url.Parse(o.Endpoint)
		if err != nil {
			return nil, fmt.Errorf("storage: s3 endpoint: %w", err)
		}
		params["regionendpoint"] = o.Endpoint
		params["secure"] = u.Scheme == "https"
	}
	if o.Prefix != "" {
		params["rootdirectory"] = "/" + o.Prefix
	}
	if o.AccessKey != "" {
		params["accesskey"], params["secretkey"] = o.AccessKey, o.SecretKey
	}
	if o.ChunkSize > 0 {
		params["chunksize"] = o.ChunkSize
	}
	d, err := factory.Create(ctx, "s3aws", params)
	if err != nil {
		// The driver's message names parameters, never the secret's value.
		return nil, fmt.Errorf("storage: opening the s3 cache: %w", err)
	}
	s := New(d)
	s.caps.Redirect = o.Redirect
	s.caps.Location = "s3://" + o.Bucket + "/" + strings.Trim(o.Prefix, "/")
	return s, nil
}

// RedirectLifetime is how long a URL from BlobURL is valid: distribution's
// s3-aws driver presigns its redirect URLs for 20 minutes
// (driver.RedirectURL).
const RedirectLifetime = 20 * time.Minute
