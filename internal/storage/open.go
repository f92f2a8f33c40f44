package storage

import (
	"context"
	"fmt"
	"net/url"
	"path/filepath"

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
}

// OpenFilesystem opens a cache in dir on the local disk (distribution's
// filesystem driver, with uploads the fills can stream from).
func OpenFilesystem(dir string) (*Store, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	d := filesystem.New(filesystem.DriverParameters{RootDirectory: abs, MaxThreads: 100})
	return New(d, WithLocalRoot(abs)), nil
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
	return New(d), nil
}
