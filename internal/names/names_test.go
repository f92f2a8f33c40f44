package names

import (
	"errors"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

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

func TestParseReference(t *testing.T) {
	d := digest.Digest("sha256:" + strings.Repeat("a", 64))
	for in, want := range map[string]Reference{
		"nvidia/pytorch":                           {Repository: "nvidia/pytorch"},
		"nvidia/pytorch:24.05-py3":                 {Repository: "nvidia/pytorch", Tag: "24.05-py3"},
		"nvcr.io/nvidia/pytorch:24.05-py3":         {Registry: "nvcr.io", Repository: "nvidia/pytorch", Tag: "24.05-py3"},
		"localhost:5000/org/team/image":            {Registry: "localhost:5000", Repository: "org/team/image"},
		"localhost/x:1":                            {Registry: "localhost", Repository: "x", Tag: "1"},
		"localhost:5000/nvidia/cuda@" + d.String(): {Registry: "localhost:5000", Repository: "nvidia/cuda", Digest: d},
		"nvidia/cuda@" + d.String():                {Repository: "nvidia/cuda", Digest: d},
		"nvidia/cuda:12@" + d.String():             {Repository: "nvidia/cuda", Tag: "12", Digest: d},
		"nvidia/cuda:12.4@" + d.String():           {Repository: "nvidia/cuda", Tag: "12.4", Digest: d},
		"nvidia/k8s/dcgm-exporter":                 {Repository: "nvidia/k8s/dcgm-exporter"},
		"org/team/image":                           {Repository: "org/team/image"},
		"127.0.0.1:40123/org/team/image:1.0":       {Registry: "127.0.0.1:40123", Repository: "org/team/image", Tag: "1.0"},
	} {
		got, err := ParseReference(in)
		if err != nil || got != want || got.String() != in {
			t.Errorf("ParseReference(%q) = %+v (%s), %v; want %+v", in, got, got, err, want)
		}
	}
	for in, want := range map[string]error{
		"":                                     ErrNameInvalid,
		"Nvidia/x:1":                           ErrNameInvalid,
		"x:y:z":                                ErrNameInvalid,
		"nvidia/x:-bad":                        ErrTagInvalid,
		"nvidia/x:":                            ErrTagInvalid,
		"nvidia/x@sha256:zz":                   ErrDigestInvalid,
		"nvidia/x@":                            ErrDigestInvalid,
		"nvcr.io/":                             ErrNameInvalid,
		"nvidia//x:1":                          ErrNameInvalid,
		"nvidia/x:" + strings.Repeat("t", 129): ErrTagInvalid,
		"nvidia/pytorch:1:2":                   ErrNameInvalid,
		"bad_host.io/nvidia/x:1":               ErrNameInvalid,
	} {
		if r, err := ParseReference(in); !errors.Is(err, want) {
			t.Errorf("ParseReference(%q) = %+v, %v; want %v", in, r, err, want)
		}
	}
	if r, _ := ParseReference("nvidia/cuda:12@" + d.String()); r.Ref() != d.String() {
		t.Errorf("Ref of tag and digest = %q, want the digest", r.Ref())
	}
}

func TestParseImage(t *testing.T) {
	hosts := []string{"nvcr.io", "127.0.0.1:40123"}
	for in, want := range map[string]Reference{
		"nvidia/pytorch:24.05-py3":         {Repository: "nvidia/pytorch", Tag: "24.05-py3"},
		"nvcr.io/nvidia/pytorch:24.05-py3": {Repository: "nvidia/pytorch", Tag: "24.05-py3"},
		"NVCR.IO/nvidia/pytorch:24.05-py3": {Repository: "nvidia/pytorch", Tag: "24.05-py3"},
		"127.0.0.1:40123/nvidia/cuda:12":   {Repository: "nvidia/cuda", Tag: "12"},
	} {
		if got, err := ParseImage(in, hosts); err != nil || got != want {
			t.Errorf("ParseImage(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for in, want := range map[string]error{
		"nvidia/pytorch":             ErrTagInvalid,
		"nvcr.io/nvidia/pytorch":     ErrTagInvalid,
		"docker.io/library/redis:7":  ErrNameInvalid,
		"localhost/nvidia/pytorch:1": ErrNameInvalid,
		// A registry's name is no repository path, nor its start.
		"ghcr.io:1.0":                               ErrNameInvalid,
		"nvcr.io/ghcr.io/nvidia/pytorch:1":          ErrNameInvalid,
		"nvcr.io/nvcr.io/nvidia/pytorch:1":          ErrNameInvalid,
		"nvcr.io/docker.io:1":                       ErrNameInvalid,
		"127.0.0.1:40123/localhost/x:1":             ErrNameInvalid,
		"nvcr.io@sha256:" + strings.Repeat("a", 64): ErrNameInvalid,
	} {
		if r, err := ParseImage(in, hosts); !errors.Is(err, want) {
			t.Errorf("ParseImage(%q) = %+v, %v; want %v", in, r, err, want)
		}
	}
}

// TestQualifiedNames: the default upstream's repositories keep their
// paths, a further upstream's get its registry in front (docker.io's
// official images library/), and SplitQualified undoes it.
func TestQualifiedNames(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ reg, path, want string }{
		{"", "nvidia/pytorch", "nvidia/pytorch"},
		{"docker.io", "ubuntu", "docker.io/library/ubuntu"},
		{"docker.io", "library/ubuntu", "docker.io/library/ubuntu"},
		{"docker.io", "bitnami/redis", "docker.io/bitnami/redis"},
		{"ghcr.io", "img", "ghcr.io/img"},
	} {
		got := QualifiedName(c.reg, c.path)
		if got != c.want {
			t.Errorf("QualifiedName(%q, %q) = %q, want %q", c.reg, c.path, got, c.want)
		}
		if reg, p := SplitQualified(got); reg != c.reg || (p != c.path && p != "library/"+c.path) {
			t.Errorf("SplitQualified(%q) = %q, %q", got, reg, p)
		}
	}
	hosts := []string{"nvcr.io"}
	for in, want := range map[string]string{
		"docker.io/library/python:3.12": "docker.io/library/python",
		"docker.io/python:3.12":         "docker.io/library/python",
		"DOCKER.IO/python:3.12":         "docker.io/library/python",
		"ghcr.io/org/img:1":             "ghcr.io/org/img",
		"nvcr.io/nvidia/pytorch:1":      "nvidia/pytorch",
		"nvidia/pytorch:1":              "nvidia/pytorch",
	} {
		r, err := ParseImage(in, hosts, "docker.io", "ghcr.io")
		if err != nil || r.Repository != want || r.Registry != "" {
			t.Errorf("ParseImage(%q) = %+v, %v; want repository %q", in, r, err, want)
		}
	}
	// A further upstream's one-component path may have a dot: its
	// qualified name keeps the registry.
	if r, err := ParseImage("docker.io/my.app:1", hosts, "docker.io", "ghcr.io"); err != nil || r.Repository != "docker.io/library/my.app" {
		t.Errorf("ParseImage(docker.io/my.app:1) = %+v, %v", r, err)
	}
	for _, in := range []string{"docker.io/nvcr.io/nvidia/pytorch:1", "ghcr.io/docker.io/library/x:1", "nvcr.io/ghcr.io/org/img:1", "nvcr.io/ghcr.io:1", "ghcr.io:1"} {
		if r, err := ParseImage(in, hosts, "docker.io", "ghcr.io"); !errors.Is(err, ErrNameInvalid) {
			t.Errorf("ParseImage(%q) = %+v, %v; want ErrNameInvalid (a path that begins with a registry)", in, r, err)
		}
	}
	if _, err := ParseImage("quay.io/org/img:1", hosts, "docker.io"); !errors.Is(err, ErrNameInvalid) {
		t.Errorf("an unconfigured registry: %v", err)
	}
}

// TestParseImageListsEachRegistryOnce (U1 F8): a registry both a default
// name and an alias (nvcr.io) is named once in the refusal.
func TestParseImageListsEachRegistryOnce(t *testing.T) {
	_, err := ParseImage("quay.io/x/y:1", []string{"nvcr.io", "127.0.0.1:5000", "NVCR.io"}, "docker.io")
	if err == nil || strings.Count(strings.ToLower(err.Error()), "nvcr.io") != 1 || !strings.Contains(err.Error(), "docker.io") {
		t.Errorf("err = %v", err)
	}
}

func TestParseRepository(t *testing.T) {
	for in, want := range map[string]string{
		"nvidia/pytorch": "nvidia/pytorch", "nvcr.io/nvidia/pytorch": "nvidia/pytorch",
		"docker.io/ubuntu": "docker.io/library/ubuntu", "docker.io/library/ubuntu": "docker.io/library/ubuntu",
	} {
		if got, err := ParseRepository(in, []string{"nvcr.io"}, "docker.io"); err != nil || got != want {
			t.Errorf("ParseRepository(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"quay.io/x", "nvidia/pytorch:1", "Nvidia/x", "",
		"docker.io", "nvcr.io", "ghcr.io", "nvcr.io/docker.io/library/ubuntu", "docker.io/nvcr.io/nvidia/pytorch"} {
		if _, err := ParseRepository(bad, []string{"nvcr.io"}, "docker.io"); !errors.Is(err, ErrNameInvalid) {
			t.Errorf("ParseRepository(%q): %v, want ErrNameInvalid", bad, err)
		}
	}
}
