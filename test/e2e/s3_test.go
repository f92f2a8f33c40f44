//go:build e2e

package e2e

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// TestS3CacheWithRedirect: the mirror binary keeps its cache in a real S3
// server; skopeo pulls cold (streamed by the mirror) and then hot (blob
// GETs redirected to presigned URLs that skopeo follows); both copies are
// identical, and the signed URLs never reach the log.
func TestS3CacheWithRedirect(t *testing.T) {
	need(t, "skopeo")
	o := testsupport.StartS3(t)
	up, _ := newUpstream(t)
	cfg := testsupport.WriteConfig(t, `storage:
  driver: s3
  s3:
    bucket: `+o.Bucket+`
    region: `+o.Region+`
    endpoint: `+o.Endpoint+`
    path_style: true
    prefix: mirror
    access_key: `+o.AccessKey+`
    redirect: true
`)
	m := startMirrorWithConfig(t, up.URL(), cfg, "MIRROR_S3_SECRET_KEY="+o.SecretKey)
	ref := m.addr + "/" + ngctest.PytorchRepo + ":" + ngctest.PytorchTag
	cold, hot := filepath.Join(t.TempDir(), "cold"), filepath.Join(t.TempDir(), "hot")
	if out, err := skopeoCopy(t, ref, cold); err != nil {
		t.Fatalf("cold pull: %v\n%s", err, out)
	}
	waitNoFills(t, m)
	if out, err := skopeoCopy(t, ref, hot); err != nil {
		t.Fatalf("hot pull through redirects: %v\n%s", err, out)
	}
	sameTree(t, cold, hot)
	waitLog(t, m, "status=307") // access log lines follow the responses
	logs := m.log.String()
	if !strings.Contains(logs, "status=307") {
		t.Fatal("no blob GET was redirected on the hot pull")
	}
	assertNoSecrets(t, up, logs, o.SecretKey, "X-Amz-Signature")
}
