package config

import (
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestClusterConfig(t *testing.T) {
	t.Parallel()
	secret := writeFile(t, "secret", "0123456789abcdef-from-file\n")
	ok := map[string]string{
		"MIRROR_REDIS_URL":         "redis://127.0.0.1:6379/0",
		"MIRROR_CLUSTER_ADVERTISE": "http://10.0.0.5:5002",
		"MIRROR_CLUSTER_SECRET":    "0123456789abcdef",
	}
	c, err := Load("", envOf(ok))
	if err != nil {
		t.Fatal(err)
	}
	if !c.Cluster.Enabled() || c.Cluster.Listen != ":5002" || c.Cluster.Heartbeat != Duration(2*time.Second) || c.Cluster.Secret != "0123456789abcdef" {
		t.Fatalf("cluster = %+v", c.Cluster)
	}
	p := writeFile(t, "mirror.yaml", "cluster:\n  advertise: http://m1:5002\n  listen: 127.0.0.1:7002\n  secret_file: "+secret+"\n  heartbeat: 500ms\nstate:\n  redis_url: redis://r:6379/0\n")
	c, err = Load(p, noEnv)
	if err != nil {
		t.Fatal(err)
	}
	if c.Cluster.Secret != "0123456789abcdef-from-file" || c.Cluster.Listen != "127.0.0.1:7002" || c.Cluster.Heartbeat != Duration(500*time.Millisecond) {
		t.Fatalf("cluster = %+v", c.Cluster)
	}

	for _, tc := range []struct {
		name string
		env  map[string]string
		want string
	}{
		{"no redis", map[string]string{"MIRROR_CLUSTER_ADVERTISE": "http://m:5002", "MIRROR_CLUSTER_SECRET": "0123456789abcdef"}, "needs state.redis_url"},
		{"no secret", map[string]string{"MIRROR_REDIS_URL": "redis://r/0", "MIRROR_CLUSTER_ADVERTISE": "http://m:5002"}, "cluster.secret"},
		{"short secret", map[string]string{"MIRROR_REDIS_URL": "redis://r/0", "MIRROR_CLUSTER_ADVERTISE": "http://m:5002", "MIRROR_CLUSTER_SECRET": "short"}, "at least 16"},
		{"bad advertise", map[string]string{"MIRROR_REDIS_URL": "redis://r/0", "MIRROR_CLUSTER_ADVERTISE": "m:5002", "MIRROR_CLUSTER_SECRET": "0123456789abcdef"}, "cluster.advertise"},
		{"IPv6 without brackets", map[string]string{"MIRROR_REDIS_URL": "redis://r/0", "MIRROR_CLUSTER_ADVERTISE": "http://fd00::5:5002", "MIRROR_CLUSTER_SECRET": "0123456789abcdef"}, "in brackets: http://[fd00::5]:5002"},
		{"same listener", map[string]string{"MIRROR_REDIS_URL": "redis://r/0", "MIRROR_CLUSTER_ADVERTISE": "http://m:5002", "MIRROR_CLUSTER_SECRET": "0123456789abcdef",
			"MIRROR_ADDR": ":5002"}, "must differ from addr"},
	} {
		c, err := Load("", envOf(tc.env))
		if err == nil {
			err = c.ValidateSecret()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want it to mention %q", tc.name, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "0123456789abcdef") {
			t.Errorf("%s: the error shows the secret: %v", tc.name, err)
		}
	}
	// IPv6: the advertise URL in brackets, the listener as net.Listen takes it.
	v6 := map[string]string{"MIRROR_REDIS_URL": "redis://[::1]:6379/0", "MIRROR_CLUSTER_ADVERTISE": "http://[fd00::5]:5002",
		"MIRROR_CLUSTER_LISTEN": "[::]:5002", "MIRROR_CLUSTER_SECRET": "0123456789abcdef"}
	if c, err := Load("", envOf(v6)); err != nil || c.Cluster.Advertise != "http://[fd00::5]:5002" {
		t.Errorf("IPv6 advertise and listener: %+v, %v", c.Cluster, err)
	}
	// The operator commands load a replica's config whose secret is in
	// serve's environment only, or in a file they cannot read (U1 F5);
	// serve refuses it (ValidateSecret).
	for _, env := range []map[string]string{
		{"MIRROR_REDIS_URL": "redis://r/0", "MIRROR_CLUSTER_ADVERTISE": "http://m:5002"},
	} {
		c, err := Load("", envOf(env))
		if err != nil {
			t.Errorf("Load without the secret: %v", err)
		} else if err := c.ValidateSecret(); err == nil || !strings.Contains(err.Error(), "cluster.secret") {
			t.Errorf("ValidateSecret without the secret: %v", err)
		}
	}
	nofile := writeFile(t, "m.yaml", "cluster:\n  advertise: http://m1:5002\n  secret_file: "+filepath.Join(t.TempDir(), "absent")+"\nstate:\n  redis_url: redis://r:6379/0\n")
	if c, err := Load(nofile, noEnv); err != nil {
		t.Errorf("Load with an unreadable secret_file: %v", err)
	} else if err := c.ValidateSecret(); err == nil || !strings.Contains(err.Error(), "cluster.secret_file") {
		t.Errorf("ValidateSecret with an unreadable secret_file: %v", err)
	}
	// Without advertise nothing is required.
	if _, err := Load("", envOf(map[string]string{"MIRROR_CLUSTER_SECRET": "x"})); err != nil {
		t.Fatalf("no clustering: %v", err)
	}
}
