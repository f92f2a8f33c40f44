package testsupport

import (
	"net/http"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go/aws"
	"github.com/aws/aws-sdk-go/aws/credentials"
	"github.com/aws/aws-sdk-go/aws/session"
	"github.com/aws/aws-sdk-go/service/s3"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

func init() {
	// With AWS_CA_BUNDLE set (it is on the CI machines), aws-sdk-go v1
	// rewrites http.DefaultClient's transport each time a session is
	// created, which races with requests of drivers opened earlier. A
	// mirror opens one driver, so only tests that open many in parallel
	// meet it; the test server speaks plain HTTP and needs no bundle.
	_ = os.Unsetenv("AWS_CA_BUNDLE")
}

// Credentials of the test S3 server (not secrets: the server lives for
// one test, on loopback).
const (
	S3AccessKey = "ngcmirrortest"
	S3SecretKey = "ngcmirrortest-secret-0123456789"
	S3Bucket    = "registry"
	S3Region    = "us-east-1"
)

// RequireS3Env, when set to 1 (make test sets it), turns a missing
// versitygw into a failure instead of a skip.
const RequireS3Env = "MIRROR_TEST_REQUIRE_S3"

// OpenS3 opens a cache on the S3 server that o (StartS3's) names: each
// call another handle on the same bucket, as replicas sharing it have.
func OpenS3(t testing.TB, o storage.S3Options) *storage.Store {
	t.Helper()
	s, err := storage.OpenS3(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// StartS3 runs versitygw (installed by .ci/install.sh) with its data in a
// test directory, creates the bucket, and returns the options to open the
// cache on it. The server stops when the test ends.
func StartS3(t testing.TB) storage.S3Options {
	t.Helper()
	bin, err := exec.LookPath("versitygw")
	if err != nil {
		if os.Getenv(RequireS3Env) == "1" {
			t.Fatal("versitygw is not installed: run .ci/install.sh")
		}
		t.Skip("versitygw is not installed (make test requires it; run .ci/install.sh)")
	}
	addr := FreeAddr(t)
	cmd := exec.Command(bin, "--port", addr, "--quiet", "posix", t.TempDir())
	cmd.Env = append(os.Environ(), "ROOT_ACCESS_KEY_ID="+S3AccessKey, "ROOT_SECRET_ACCESS_KEY="+S3SecretKey)
	if _, err := Start(t, cmd, os.Kill); err != nil {
		t.Fatalf("starting versitygw: %v", err)
	}
	endpoint := "http://" + addr
	var lastErr error
	if !Until(15*time.Second, 10*time.Millisecond, func() bool {
		resp, err := http.Get(endpoint + "/")
		if err == nil {
			resp.Body.Close() // any answer (403 without credentials) means it listens
		}
		lastErr = err
		return err == nil
	}) {
		t.Fatalf("versitygw did not answer: %v", lastErr)
	}
	sess, err := session.NewSession(&aws.Config{
		Endpoint:         aws.String(endpoint),
		Region:           aws.String(S3Region),
		Credentials:      credentials.NewStaticCredentials(S3AccessKey, S3SecretKey, ""),
		S3ForcePathStyle: aws.Bool(true),
		DisableSSL:       aws.Bool(true),
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s3.New(sess).CreateBucket(&s3.CreateBucketInput{Bucket: aws.String(S3Bucket)}); err != nil {
		t.Fatalf("creating the bucket: %v", err)
	}
	return storage.S3Options{
		Bucket: S3Bucket, Region: S3Region, Endpoint: endpoint, PathStyle: true,
		AccessKey: S3AccessKey, SecretKey: S3SecretKey, ChunkSize: 5 << 20,
	}
}
