package config

import (
	"slices"
	"strings"
	"testing"
	"time"
)

// TestUpstreamsFromYAML: further upstreams keyed by registry name, their
// passwords from the environment or a file, the names sorted.
func TestUpstreamsFromYAML(t *testing.T) {
	t.Parallel()
	pw := writeFile(t, "ghcr.token", "  ghp_fromfile\n")
	p := writeFile(t, "mirror.yaml", `
upstreams:
  docker.io:
    url: https://registry-1.docker.io
    username: labuser
    password: in-file
    tag_freshness: 10m
    repositories: [library/*]
    root_hosts: [hub.mirror.lab]
  ghcr.io:
    url: https://ghcr.io
    username: bot
    password_file: `+pw+`
  registry.k8s.io: {url: "https://registry.k8s.io/"}
cache:
  pin: [docker.io/library/python:3.12, docker.io/ubuntu:24.04, registry.k8s.io/pause:3.10]
tracking:
  repositories: [nvidia/pytorch, docker.io/python]
prefetch:
  rules:
    - {name: hub, repositories: ["docker.io/library/*"], tags: {exact: ["3.12"]}}
`)
	c, err := Load(p, envOf(map[string]string{"MIRROR_UPSTREAMS_DOCKER_IO_PASSWORD": "from-env"}))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(c.UpstreamNames(), ","); got != "docker.io,ghcr.io,registry.k8s.io" {
		t.Errorf("UpstreamNames = %s", got)
	}
	d := c.Upstreams["docker.io"]
	if d.Password != "from-env" || d.Username != "labuser" || time.Duration(d.TagFreshness) != 10*time.Minute ||
		d.Repositories[0] != "library/*" || d.RootHosts[0] != "hub.mirror.lab" {
		t.Errorf("docker.io = %+v", d)
	}
	if got := strings.Join(c.Tracking.Repositories, ","); got != "nvidia/pytorch,docker.io/library/python" {
		t.Errorf("tracking.repositories = %s, want docker.io's official image with library/", got)
	}
	if g := c.Upstreams["ghcr.io"]; g.Password != "ghp_fromfile" {
		t.Errorf("ghcr.io password from file = %q", g.Password)
	}
	if u := c.ExtraUpstreamURL("registry.k8s.io"); u.String() != "https://registry.k8s.io" {
		t.Errorf("ExtraUpstreamURL = %s", u)
	}
	if got := PasswordEnv("registry.k8s-x.io"); got != "MIRROR_UPSTREAMS_REGISTRY_K8S_X_IO_PASSWORD" {
		t.Errorf("PasswordEnv = %s", got)
	}
}

// TestUpstreamsRefused: each mistake names its key, and no message holds a
// password or a URL's user info.
func TestUpstreamsRefused(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, yaml, want string }{
		{"no url", "upstreams:\n  docker.io: {username: x}\n", "upstreams.docker.io.url is required"},
		{"ftp", "upstreams:\n  docker.io: {url: ftp://registry-1.docker.io}\n", "upstreams.docker.io.url: scheme"},
		{"path", "upstreams:\n  docker.io: {url: https://registry-1.docker.io/v2/}\n", "upstreams.docker.io.url for host"},
		{"query", "upstreams:\n  docker.io: {url: 'https://registry-1.docker.io?t=1'}\n", "no path or query"},
		{"userinfo", "upstreams:\n  docker.io: {url: 'https://bob:s3cr3t@registry-1.docker.io'}\n", "not the URL"},
		{"name without dot", "upstreams:\n  dockerhub: {url: https://registry-1.docker.io}\n", "upstreams.dockerhub: the key is a registry name"},
		{"name with port", "upstreams:\n  'reg.lab:5000': {url: https://reg.lab:5000}\n", "the key is a registry name"},
		{"name with scheme", "upstreams:\n  'https://ghcr.io': {url: https://ghcr.io}\n", "the key is a registry name"},
		{"upper-case name", "upstreams:\n  GHCR.io: {url: https://ghcr.io}\n", "the key is a registry name"},
		{"localhost", "upstreams:\n  localhost: {url: http://127.0.0.1:5001}\n", "the key is a registry name"},
		{"the default", "upstreams:\n  nvcr.io: {url: https://nvcr.io}\n", "is the default upstream"},
		{"the default's host", "upstream: {url: 'http://fake.lab:8080'}\nupstreams:\n  fake.lab: {url: https://x.io}\n", "is the default upstream"},
		{"an ns alias", "upstream: {ns_aliases: [nvcr.lab]}\nupstreams:\n  nvcr.lab: {url: https://x.io}\n", "is the default upstream"},
		{"password without user", "upstreams:\n  ghcr.io: {url: https://ghcr.io, password: s3cr3t}\n", "a password needs a username"},
		{"negative freshness", "upstreams:\n  ghcr.io: {url: https://ghcr.io, tag_freshness: -1s}\n", "upstreams.ghcr.io.tag_freshness"},
		{"bad pattern", "upstreams:\n  ghcr.io: {url: https://ghcr.io, repositories: ['org/[']}\n", "upstreams.ghcr.io.repositories"},
		{"pattern with the registry", "upstreams:\n  ghcr.io: {url: https://ghcr.io, repositories: ['ghcr.io/org/*']}\n", "without its name"},
		{"root host with port", "upstreams:\n  docker.io: {url: https://r.io, root_hosts: ['hub.lab:5000']}\n", "upstreams.docker.io.root_hosts"},
		{"root host twice", "upstreams:\n  docker.io: {url: https://r.io, root_hosts: [hub.lab]}\n  ghcr.io: {url: https://ghcr.io, root_hosts: [hub.lab]}\n", "a root host of upstreams.docker.io too"},
		{"unknown key", "upstreams:\n  docker.io: {url: https://r.io, passwd: x}\n", "upstreams.docker.io.passwd"},
		{"pin of an unconfigured registry", "cache: {pin: ['quay.io/org/img:1']}\n", "cache.pin"},
		{"tracked repository of an unconfigured registry", "tracking: {repositories: [quay.io/org/img]}\n", "tracking.repositories"},
		{"prefetch rule of an unconfigured registry", "prefetch: {rules: [{name: r, repositories: ['ghcr.io/**'], tags: {latest: 1}}]}\n", "prefetch.rules[0].repositories"},
		{"password file missing", "upstreams:\n  ghcr.io: {url: https://ghcr.io, username: u, password_file: /nonexistent/x}\n", "upstreams.ghcr.io.password_file"},
		// A registry's name alone is no repository to poll (it was polled
		// as nvcr.io's repository "ghcr.io"); as a public namespace it is.
		{"tracked registry name alone", "upstreams:\n  ghcr.io: {url: https://ghcr.io}\ntracking: {repositories: [ghcr.io]}\n", `tracking.repositories: "ghcr.io" is a registry's name`},
		{"tracked unconfigured registry alone", "tracking: {repositories: [quay.io]}\n", `tracking.repositories: "quay.io" is a registry's name`},
		{"prefetch rule registry name alone", "upstreams:\n  ghcr.io: {url: https://ghcr.io}\nprefetch: {rules: [{name: r, repositories: [ghcr.io], tags: {latest: 1}}]}\n", `prefetch.rules[0].repositories: "ghcr.io" is a registry's name`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := Load(writeFile(t, "mirror.yaml", tc.yaml), noEnv)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load = %v, want an error with %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "s3cr3t") || strings.Contains(err.Error(), "bob") {
				t.Fatalf("error shows a secret: %v", err)
			}
		})
	}
}

// TestDefaultRegistryPrefixRemoved: the mirror names the default
// upstream's repositories bare (nvidia/pytorch), so a name written with
// its registry in front (nvcr.io/, the upstream's host, an ns alias; any
// case) in access rules, public namespaces, tracked repositories and
// prefetch rules is read without it, and does not silently never match.
// docker.io's official images in access rules gain library/ as elsewhere.
func TestDefaultRegistryPrefixRemoved(t *testing.T) {
	t.Parallel()
	p := writeFile(t, "mirror.yaml", `
upstream: {url: 'http://fake.lab:8080', ns_aliases: [nvcr.lab]}
upstreams:
  docker.io: {url: https://registry-1.docker.io}
access:
  mode: htpasswd
  htpasswd_file: /etc/mirror/htpasswd
  public_namespaces: [nvcr.io/nvidia, nvidia-ai, docker.io/library]
  rules:
    - {repositories: ["nvcr.io/myorg/**", "fake.lab:8080/team/x", "NVCR.IO/other/*", "nvcr.lab/lab/*", "docker.io/python", "docker.io/org/*", "plain/x"], users: [alice]}
tracking:
  repositories: [nvcr.io/nvidia/pytorch, nvcr.lab/nvidia/cuda, nvidia/tritonserver]
prefetch:
  rules:
    - {name: r, repositories: ["nvcr.io/nvidia/*", "docker.io/library/*"], tags: {latest: 1}}
cache:
  pin: [nvcr.io/nvidia/pytorch:24.05-py3]
`)
	c, err := Load(p, noEnv)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		key       string
		got, want []string
	}{
		{"access.public_namespaces", c.Access.PublicNamespaces, []string{"nvidia", "nvidia-ai", "docker.io/library"}},
		{"access.rules[0].repositories", c.Access.Rules[0].Repositories,
			[]string{"myorg/**", "team/x", "other/*", "lab/*", "docker.io/library/python", "docker.io/org/*", "plain/x"}},
		{"tracking.repositories", c.Tracking.Repositories, []string{"nvidia/pytorch", "nvidia/cuda", "nvidia/tritonserver"}},
		{"prefetch.rules[0].repositories", c.Prefetch.Rules[0].Repositories, []string{"nvidia/*", "docker.io/library/*"}},
	} {
		if strings.Join(tc.got, ",") != strings.Join(tc.want, ",") {
			t.Errorf("%s = %v, want %v", tc.key, tc.got, tc.want)
		}
	}
}

// TestDefaultRegistryAloneRefused: the default's registry name alone as a
// public namespace (or as an access rule's or prefetch rule's pattern) has
// no bare form; it would open (or select) every repository of nvcr.io, the
// private org's included, so it is refused with the entry named.
func TestDefaultRegistryAloneRefused(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, yaml, want string }{
		{"public namespace", "access: {public_namespaces: [nvidia, nvcr.io]}\n", `access.public_namespaces: "nvcr.io"`},
		{"access rule", "access: {mode: htpasswd, htpasswd_file: /x, rules: [{repositories: [nvcr.io], users: [a]}]}\n", `access.rules[0].repositories: "nvcr.io"`},
		{"tracked repository", "tracking: {repositories: [NVCR.IO]}\n", `tracking.repositories: "NVCR.IO"`},
		// A wildcard right after it: "**" would match every upstream's
		// names, docker.io's too.
		{"all of nvcr.io by pattern", "access: {mode: htpasswd, htpasswd_file: /x, rules: [{repositories: [\"nvcr.io/**\"], users: [a]}]}\n", `access.rules[0].repositories: "nvcr.io/**"`},
		{"prefetch pattern", "prefetch: {rules: [{name: r, repositories: [\"nvcr.io/*/pytorch\"], tags: {latest: 1}}]}\n", `prefetch.rules[0].repositories: "nvcr.io/*/pytorch"`},
		{"registry name twice", "access: {public_namespaces: [nvcr.io/nvcr.io/nvidia]}\n", `must start with a namespace`},
		{"another registry after it", "upstreams: {docker.io: {url: \"https://registry-1.docker.io\"}}\naccess: {public_namespaces: [nvcr.io/docker.io]}\n", `access.public_namespaces: "nvcr.io/docker.io"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := Load(writeFile(t, "mirror.yaml", tc.yaml), noEnv)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load = %v, want an error with %q", err, tc.want)
			}
		})
	}
}

// TestMaxFillsPerUpstreamConfig: upstreams.<name>.max_fills and
// upstream.max_fills (the default's) bound one upstream's downloads
// beside limits.max_fills; 0 (absent) leaves only the global bound, and a
// negative one is refused.
func TestMaxFillsPerUpstreamConfig(t *testing.T) {
	t.Parallel()
	c, err := Load(writeFile(t, "mirror.yaml", `
upstream: {max_fills: 40}
upstreams:
  docker.io: {url: https://registry-1.docker.io, max_fills: 8}
  ghcr.io: {url: https://ghcr.io}
`), noEnv)
	if err != nil {
		t.Fatal(err)
	}
	if c.Upstream.MaxFills != 40 || c.Upstreams["docker.io"].MaxFills != 8 || c.Upstreams["ghcr.io"].MaxFills != 0 || c.Limits.MaxFills != 64 {
		t.Fatalf("max_fills: default %d, docker.io %d, ghcr.io %d, global %d", c.Upstream.MaxFills, c.Upstreams["docker.io"].MaxFills,
			c.Upstreams["ghcr.io"].MaxFills, c.Limits.MaxFills)
	}
	for yaml, want := range map[string]string{
		"upstreams:\n  docker.io: {url: https://r.io, max_fills: -1}\n": "upstreams.docker.io.max_fills",
		"upstream: {max_fills: -2}\n":                                   "upstream.max_fills",
	} {
		if _, err := Load(writeFile(t, "mirror.yaml", yaml), noEnv); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Load(%q) = %v, want an error naming %s", yaml, err, want)
		}
	}
}

// TestMaxFillsAboveTheGlobalBoundWarned: an upstream's max_fills larger
// than a non-zero limits.max_fills is accepted with a warning naming both
// keys and their values; one equal to it or below, or any under
// limits.max_fills 0 (no global bound), is not warned of.
func TestMaxFillsAboveTheGlobalBoundWarned(t *testing.T) {
	t.Parallel()
	const upstreams = `
upstreams:
  docker.io: {url: https://registry-1.docker.io, max_fills: 100}
  ghcr.io: {url: https://ghcr.io, max_fills: 10}
  quay.io: {url: https://quay.io}
`
	c, err := Load(writeFile(t, "mirror.yaml", "limits: {max_fills: 10}\nupstream: {max_fills: 11}\n"+upstreams), noEnv)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, w := range c.Warnings() {
		line := w.Message
		for _, a := range w.Attrs {
			line += " " + a.String()
		}
		got = append(got, line)
	}
	want := []string{
		"upstream.max_fills is larger than limits.max_fills and can never bind: at most limits.max_fills downloads run, all upstreams together upstream.max_fills=11 limits.max_fills=10",
		"upstreams.docker.io.max_fills is larger than limits.max_fills and can never bind: at most limits.max_fills downloads run, all upstreams together upstreams.docker.io.max_fills=100 limits.max_fills=10",
	}
	if !slices.Equal(got, want) {
		t.Errorf("warnings:\n%q\nwant\n%q", got, want)
	}
	c, err = Load(writeFile(t, "mirror.yaml", "limits: {max_fills: 0}\nupstream: {max_fills: 11}\n"+upstreams), noEnv)
	if err != nil {
		t.Fatal(err)
	}
	if w := c.Warnings(); len(w) != 0 {
		t.Errorf("warnings without a global bound: %v", w)
	}
	if w := Default().Warnings(); len(w) != 0 {
		t.Errorf("warnings of the defaults: %v", w)
	}
}
