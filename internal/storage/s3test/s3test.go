// Package s3test starts a real S3-compatible server (versitygw) on loopback
// for tests, with a fresh bucket.
package s3test

import (
	"net"
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

// Credentials of the test server (not secrets: the server lives for one
// test, on loopback).
const (
	AccessKey = "ngcmirrortest"
	SecretKey = "ngcmirrortest-secret-0123456789"
	Bucket    = "registry"
	Region    = "us-east-1"
)

// RequireEnv, when set to 1 (make test sets it), turns a missing versitygw
// into a failure instead of a skip.
const RequireEnv = "MIRROR_TEST_REQUIRE_S3"

// Start runs versitygw (installed by .ci/install.sh) with its data in a
// test directory, creates the bucket, and returns the options to open the
// cache on it. The server stops when the test ends.
func Start(t testing.TB) storage.S3Options {
	t.Helper()
	bin, err := exec.LookPath("versitygw")
	if err != nil {
		if os.Getenv(RequireEnv) == "1" {
			t.Fatal("versitygw is not installed: run .ci/install.sh")
		}
		t.Skip("versitygw is not installed (make test requires it; run .ci/install.sh)")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cmd := exec.Command(bin, "--port", addr, "--quiet", "posix", t.TempDir())
	cmd.Env = append(os.Environ(), "ROOT_ACCESS_KEY_ID="+AccessKey, "ROOT_SECRET_ACCESS_KEY="+SecretKey)
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting versitygw: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	endpoint := "http://" + addr
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get(endpoint + "/")
		if err == nil {
			resp.Body.Close()
			break // any answer (403 without credentials) means it listens
		}
		if time.Now().After(deadline) {
			t.Fatalf("versitygw did not answer: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	sess, err := session.NewSession(&aws.Config{
		Endpoint:         aws.String(endpoint),
		Region:           aws.String(Region),
		Credentials:      credentials.NewStaticCredentials(AccessKey, SecretKey, ""),
		S3ForcePathStyle: aws.Bool(true),
		DisableSSL:       aws.Bool(true),
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s3.New(sess).CreateBucket(&s3.CreateBucketInput{Bucket: aws.String(Bucket)}); err != nil {
		t.Fatalf("creating the bucket: %v", err)
	}
	return storage.S3Options{
		Bucket: Bucket, Region: Region, Endpoint: endpoint, PathStyle: true,
		AccessKey: AccessKey, SecretKey: SecretKey, ChunkSize: 5 << 20,
	}
}
