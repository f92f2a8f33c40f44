package main

import (
	"context"
	"io"
	"maps"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/state/redistest"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// TestServeReplicasShareBucketAndRedis: two mirrors on one bucket (a real
// S3 server) sharing a real Redis, as the wiring builds them, join one
// cache budget (both present on it, one leading) and fetch a cold manifest
// asked of both at once from the upstream once.
func TestServeReplicasShareBucketAndRedis(t *testing.T) {
	up := ngctest.New(ngctest.Options{})
	defer up.Close()
	if _, err := up.Populate(4 << 10); err != nil {
		t.Fatal(err)
	}
	up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/manifests/") {
			time.Sleep(300 * time.Millisecond) // both replicas ask before either is done
		}
		return false
	})
	s3 := testsupport.StartS3(t)
	rd := redistest.Start(t)
	// Another replica's running download: its upload in the shared bucket
	// must survive these replicas' start-up (only a filesystem cache's
	// uploads are removed then).
	bucket, err := storage.OpenS3(context.Background(), s3)
	if err != nil {
		t.Fatal(err)
	}
	otherUpload, _ := storage.Path(storage.UploadPath{ID: "another-replica"})
	if err := bucket.Driver().PutContent(context.Background(), otherUpload, []byte("half a layer")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var served []<-chan error
	defer func() {
		cancel()
		for _, errc := range served {
			if err := <-errc; err != nil {
				t.Errorf("serve: %v", err)
			}
		}
	}()
	var addrs []string
	for range 2 {
		addr := testsupport.FreeAddr(t)
		env := serveEnv(t, addr, up.URL())
		maps.Copy(env, map[string]string{"MIRROR_REDIS_URL": rd.URL,
			"MIRROR_STORAGE_DRIVER": "s3", "MIRROR_S3_BUCKET": s3.Bucket, "MIRROR_S3_REGION": s3.Region,
			"MIRROR_S3_ENDPOINT": s3.Endpoint, "MIRROR_S3_PATH_STYLE": "true",
			"MIRROR_S3_ACCESS_KEY": s3.AccessKey, "MIRROR_S3_SECRET_KEY": s3.SecretKey})
		served = append(served, startServe(ctx, t, "", env))
		addrs = append(addrs, addr)
	}
	c := &http.Client{Timeout: 30 * time.Second}
	defer c.CloseIdleConnections()
	for _, a := range addrs {
		waitHealthy(t, c, "http://"+a)
	}

	if _, err := bucket.Driver().Stat(context.Background(), otherUpload); err != nil {
		t.Errorf("another replica's upload after these replicas started: %v", err)
	}

	// One budget: both replicas are present on it.
	st := rd.Open(t)
	scope := budgetScope(config.S3{Endpoint: s3.Endpoint, Bucket: s3.Bucket})
	testsupport.Eventually(t, 20*time.Second, "both replicas on the shared budget", func() bool {
		rs, err := st.BudgetReplicas(context.Background(), scope)
		return err == nil && len(rs) == 2
	})

	// One upstream GET for a cold tag asked of both.
	var pulls sync.WaitGroup
	for _, a := range addrs {
		pulls.Add(1)
		go func() {
			defer pulls.Done()
			resp, err := c.Get("http://" + a + "/v2/" + ngctest.CUDARepo + "/manifests/" + ngctest.CUDATag)
			if err != nil {
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			if _, err := io.Copy(io.Discard, resp.Body); err != nil || resp.StatusCode != http.StatusOK {
				t.Errorf("GET manifest from %s: %d %v", a, resp.StatusCode, err)
			}
		}()
	}
	pulls.Wait()
	n := 0
	for _, r := range up.Requests() {
		if r.Method == http.MethodGet && r.Path == "/v2/"+ngctest.CUDARepo+"/manifests/"+ngctest.CUDATag && r.Auth != "" {
			n++
		}
	}
	if n != 1 {
		t.Errorf("upstream manifest GETs: %d, want 1 across the two replicas", n)
	}
}
