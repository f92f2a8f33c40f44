package config

import (
	"path/filepath"
	"testing"
)

// --config wins over MIRROR_CONFIG, which wins over the default file when
// that exists; with none, no file.
func TestFindFile(t *testing.T) {
	t.Parallel()
	def := writeFile(t, "mirror.yaml", "")
	missing := filepath.Join(t.TempDir(), "mirror.yaml")
	env := envOf(map[string]string{"MIRROR_CONFIG": "/from/env.yaml"})
	for _, c := range []struct {
		flag    string
		getenv  func(string) string
		def     string
		want    string
		comment string
	}{
		{"/from/flag.yaml", env, def, "/from/flag.yaml", "flag"},
		{"", env, def, "/from/env.yaml", "MIRROR_CONFIG"},
		{"", noEnv, def, def, "default file exists"},
		{"", noEnv, missing, "", "no default file"},
	} {
		if got := findFile(c.flag, c.getenv, c.def); got != c.want {
			t.Errorf("%s: %q, want %q", c.comment, got, c.want)
		}
	}
	if DefaultPath != "/etc/ngc-mirror/mirror.yaml" {
		t.Errorf("DefaultPath = %q: the Dockerfile, the systemd unit and the README name /etc/ngc-mirror/mirror.yaml", DefaultPath)
	}
}
