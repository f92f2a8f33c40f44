package names

import "testing"

func TestNames(t *testing.T) {
	for _, c := range []struct {
		f    func(string) bool
		s    string
		want bool
	}{
		{ValidTag, "24.05-py3", true},
		{ValidTag, "-bad", false},
		{ValidTag, "", false},
		{ValidTag, "a:b", false},
		{ValidRepository, "nvidia/pytorch", true},
		{ValidRepository, "nvidia/k8s/dcgm-exporter", true},
		{ValidRepository, "NVIDIA/pytorch", false},
		{ValidRepository, "nvidia//pytorch", false},
		{ValidPlatform, "linux/amd64", true},
		{ValidPlatform, "linux/arm64/v8", true},
		{ValidPlatform, "amd64", false},
		{ValidPlatform, "Linux/AMD64", false},
	} {
		if got := c.f(c.s); got != c.want {
			t.Errorf("%q: %v, want %v", c.s, got, c.want)
		}
	}
}
