//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// Tests of one mirror in front of three upstreams (#12): the NGC-like one
// as the default (nvcr.io), the Docker-Hub-like one as docker.io and the
// plain registry as registry.k8s.io, pulled by real clients.

// upstreams are the three running test upstreams and their fixtures.
type upstreams struct {
	ngc   *ngctest.Upstream
	nfx   *ngctest.Fixture
	hub   *ngctest.DockerHub
	hfx   *ngctest.DockerHubFixture
	plain *ngctest.Plain
	pfx   *ngctest.PlainFixture
}

func newUpstreams(t *testing.T, layerSize int64) *upstreams {
	t.Helper()
	u := &upstreams{
		ngc:   ngctest.New(ngctest.Options{}),
		hub:   ngctest.NewDockerHub(ngctest.DockerHubOptions{}),
		plain: ngctest.NewPlain(ngctest.PlainOptions{}),
	}
	t.Cleanup(u.ngc.Close)
	t.Cleanup(u.hub.Close)
	t.Cleanup(u.plain.Close)
	var err error
	if u.nfx, err = u.ngc.Populate(layerSize); err != nil {
		t.Fatal(err)
	}
	if u.hfx, err = u.hub.Populate(layerSize); err != nil {
		t.Fatal(err)
	}
	if u.pfx, err = u.plain.Populate(layerSize); err != nil {
		t.Fatal(err)
	}
	return u
}

// config is a mirror config serving the three: nvcr.io (also as ?ns=) by
// default, docker.io and registry.k8s.io as further upstreams; hubExtra
// and top are added under upstreams.docker.io and at the top level.
func (u *upstreams) config(t *testing.T, hubExtra, top string) string {
	t.Helper()
	return testsupport.WriteConfig(t, fmt.Sprintf(`upstream:
  ns_aliases: [nvcr.io]
upstreams:
  docker.io:
    url: %s
%s  registry.k8s.io:
    url: %s
%s`, u.hub.URL(), hubExtra, u.plain.URL(), top))
}

// image is one fixture image, named at its upstream and through the mirror.
type image struct {
	registry string // as clients name it: nvcr.io, docker.io, registry.k8s.io
	upstream string // host/repository:tag at the test upstream
	path     string // repository:tag through the mirror, path-prefixed
	im       *ngctest.Image
}

func (u *upstreams) images() []image {
	return []image{
		{"nvcr.io", u.ngc.Host() + "/" + ngctest.PytorchRepo + ":" + ngctest.PytorchTag, ngctest.PytorchRepo + ":" + ngctest.PytorchTag, u.nfx.Pytorch},
		{"nvcr.io", u.ngc.Host() + "/" + ngctest.DCGMRepo + ":" + ngctest.DCGMTag, ngctest.DCGMRepo + ":" + ngctest.DCGMTag, u.nfx.DCGM},
		{"docker.io", u.hub.Host() + "/" + ngctest.HubUbuntuRepo + ":" + ngctest.HubUbuntuTag, "docker.io/" + ngctest.HubUbuntuRepo + ":" + ngctest.HubUbuntuTag, u.hfx.Ubuntu},
		{"docker.io", u.hub.Host() + "/" + ngctest.HubToolRepo + ":" + ngctest.HubToolTag, "docker.io/" + ngctest.HubToolRepo + ":" + ngctest.HubToolTag, u.hfx.Tool},
		{"registry.k8s.io", u.plain.Host() + "/" + ngctest.PlainPauseRepo + ":" + ngctest.PlainPauseTag, "registry.k8s.io/" + ngctest.PlainPauseRepo + ":" + ngctest.PlainPauseTag, u.pfx.Pause},
		{"registry.k8s.io", u.plain.Host() + "/" + ngctest.PlainCoreDNSRepo + ":" + ngctest.PlainCoreDNSTag, "registry.k8s.io/" + ngctest.PlainCoreDNSRepo + ":" + ngctest.PlainCoreDNSTag, u.pfx.CoreDNS},
	}
}

// noNSUpstream fails if a ?ns= parameter reached any test upstream: it is
// for the mirror, never to be passed on.
func (u *upstreams) noNSUpstream(t *testing.T) {
	t.Helper()
	all := append(append(u.ngc.Requests(), u.hub.Requests()...), u.plain.Requests()...)
	for _, r := range all {
		if strings.Contains(r.Query, "ns=") {
			t.Fatalf("?ns= reached an upstream: %s %s?%s", r.Method, r.Path, r.Query)
		}
	}
}

// craneDigest is the digest crane resolves ref to.
func craneDigest(t *testing.T, ref string) (string, error) {
	t.Helper()
	out, err := run(t, time.Minute, "crane", "digest", "--insecure", ref)
	return strings.TrimSpace(out), err
}

// TestUpstreamsSkopeoCrane: skopeo copies images of all three upstreams
// through one mirror (path prefixes docker.io/ and registry.k8s.io/,
// nvcr.io names at the root), byte-identical to copies straight from the
// upstreams; crane resolves the same digests and pulls valid images;
// docker.io/ubuntu means docker.io/library/ubuntu. The mirror logs in to
// docker.io with a user and password, neither of which (nor any token)
// reaches its log.
func TestUpstreamsSkopeoCrane(t *testing.T) {
	need(t, "skopeo", "crane")
	u := newUpstreams(t, 128<<10)
	// With credentials, docker.io is not public by itself: list it.
	cfg := u.config(t, "    username: "+ngctest.DockerHubUser+"\n", "access:\n  public_namespaces: [nvidia, docker.io]\n")
	m := startMirrorWithConfig(t, u.ngc.URL(), cfg, "MIRROR_UPSTREAMS_DOCKER_IO_PASSWORD="+ngctest.DockerHubPassword)
	tmp := t.TempDir()
	for i, im := range u.images() {
		direct := filepath.Join(tmp, fmt.Sprintf("direct-%d", i))
		via := filepath.Join(tmp, fmt.Sprintf("mirror-%d", i))
		if out, err := skopeoCopy(t, im.upstream, direct); err != nil {
			t.Fatalf("skopeo from the upstream %s: %v\n%s", im.upstream, err, out)
		}
		if out, err := skopeoCopy(t, m.addr+"/"+im.path, via); err != nil {
			t.Fatalf("skopeo through the mirror %s: %v\n%s", im.path, err, out)
		}
		sameTree(t, direct, via)

		if got, err := craneDigest(t, m.addr+"/"+im.path); err != nil || got != im.im.Manifest.Digest.String() {
			t.Fatalf("crane digest %s: %q (%v), want %s", im.path, got, err, im.im.Manifest.Digest)
		}
		dir := t.TempDir()
		mustRun(t, "crane", "pull", "--insecure", "--format=oci", m.addr+"/"+im.path, dir)
		for _, b := range im.im.Blobs() {
			if _, err := os.Stat(filepath.Join(dir, "blobs", "sha256", b.Digest.Encoded())); err != nil {
				t.Fatalf("crane pull %s lacks blob %s: %v", im.path, b.Digest, err)
			}
		}
		mustRun(t, "crane", "validate", "--insecure", "--remote", m.addr+"/"+im.path)
	}
	// Official images: the mirror adds library/ as Docker does.
	bare := m.addr + "/docker.io/ubuntu:" + ngctest.HubUbuntuTag
	if got, err := craneDigest(t, bare); err != nil || got != u.hfx.Ubuntu.Manifest.Digest.String() {
		t.Fatalf("crane digest %s: %q (%v), want library/ubuntu's %s", bare, got, err, u.hfx.Ubuntu.Manifest.Digest)
	}
	// The plain registry's single-component name is not an official image.
	if n := u.plain.Count("registry", http.MethodGet, "/v2/library/pause/manifests/"+ngctest.PlainPauseTag); n != 0 {
		t.Fatal("the mirror asked the plain registry for library/pause")
	}
	// Every blob came from its upstream once (the direct copies once more).
	for _, im := range u.images() {
		up := map[string]*ngctest.Upstream{"nvcr.io": u.ngc, "docker.io": u.hub.Upstream, "registry.k8s.io": u.plain.Upstream}[im.registry]
		for _, b := range im.im.Blobs() {
			if n := up.BlobFetches(b.Digest); n != 2 {
				t.Errorf("%s: blob %s fetched %d times, want 2 (once direct, once by the mirror)", im.path, b.Digest.Encoded()[:12], n)
			}
		}
	}
	for _, r := range append(u.ngc.CDNRequests(), u.hub.CDNRequests()...) {
		if r.Auth != "" {
			t.Fatal("Authorization was sent to a CDN")
		}
	}
	if u.hub.Pulls() != 0 {
		t.Fatalf("%d anonymous Docker Hub pulls; the mirror was to log in", u.hub.Pulls())
	}
	u.noNSUpstream(t)
	waitLog(t, m, " route=manifest ")
	assertNoSecrets(t, u.hub.Upstream, m.log.String(), ngctest.DockerHubPassword)
	assertNoSecrets(t, u.ngc, m.log.String())
}

// TestUpstreamsContainerdHostsToml: containerd with a hosts.toml for each
// registry (docker.io, registry.k8s.io, nvcr.io) naming the one mirror
// fetches images of all three; the mirror routes by the ?ns= containerd
// sends, which no upstream sees, and containerd ends up with every blob and
// manifest of the upstreams' images.
func TestUpstreamsContainerdHostsToml(t *testing.T) {
	need(t, "containerd", "ctr")
	u := newUpstreams(t, 128<<10)
	m := startMirrorWithConfig(t, u.ngc.URL(), u.config(t, "", ""))
	sock := startContainerd(t)
	hostsDir := hostsTomlDir(t, m.addr, "docker.io", "registry.k8s.io", "nvcr.io")
	for _, im := range u.images() {
		// The name as containerd knows it: registry/repository:tag.
		ref := strings.TrimPrefix(im.path, im.registry+"/")
		ref = im.registry + "/" + ref
		out, err := run(t, 3*time.Minute, "ctr", "-a", sock, "-n", "e2e", "content", "fetch", "--all-platforms", "--hosts-dir", hostsDir, ref)
		if err != nil {
			t.Fatalf("ctr content fetch %s: %v\n%s", ref, err, out)
		}
	}
	have := mustRun(t, "ctr", "-a", sock, "-n", "e2e", "content", "ls", "-q")
	for _, im := range u.images() {
		want := append([]ngctest.Content{im.im.Manifest}, im.im.Blobs()...)
		for _, c := range im.im.Children {
			want = append(want, c.Manifest)
		}
		for _, c := range want {
			if !strings.Contains(have, c.Digest.String()) {
				t.Fatalf("containerd lacks %s of %s", c.Digest, im.path)
			}
		}
	}
	for _, ns := range []string{"ns=docker.io", "ns=registry.k8s.io", "ns=nvcr.io"} {
		if !strings.Contains(m.log.String(), ns) {
			t.Fatalf("the mirror's request log shows no containerd request with ?%s", ns)
		}
	}
	u.noNSUpstream(t)
}

// hostsTomlDir writes a containerd hosts directory with a hosts.toml for
// each registry that names the mirror at addr as its host.
func hostsTomlDir(t *testing.T, addr string, registries ...string) string {
	t.Helper()
	dir := t.TempDir()
	for _, reg := range registries {
		server := "https://" + reg
		if reg == "docker.io" {
			server = "https://registry-1.docker.io"
		}
		if err := os.MkdirAll(filepath.Join(dir, reg), 0o755); err != nil {
			t.Fatal(err)
		}
		hosts := fmt.Sprintf("server = %q\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", server, addr)
		if err := os.WriteFile(filepath.Join(dir, reg, "hosts.toml"), []byte(hosts), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestUpstreamsConcurrentOneFetchPerBlob: skopeo, crane (path prefix) and
// containerd (hosts.toml, ?ns=docker.io) pull the same cold Docker Hub
// image at the same moment, several of each, while an NGC image is pulled
// alongside; each upstream serves every blob once.
func TestUpstreamsConcurrentOneFetchPerBlob(t *testing.T) {
	need(t, "skopeo", "crane", "containerd", "ctr")
	u := newUpstreams(t, 1<<20)
	slow := func(up *ngctest.Upstream) {
		up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
			if up.IsCDN(r) {
				time.Sleep(300 * time.Millisecond) // every client asks while the fills run
			}
			return false
		})
	}
	slow(u.hub.Upstream)
	slow(u.ngc)
	m := startMirrorWithConfig(t, u.ngc.URL(), u.config(t, "", ""))
	sock := startContainerd(t)
	hostsDir := hostsTomlDir(t, m.addr, "docker.io")
	path := "docker.io/" + ngctest.HubUbuntuRepo + ":" + ngctest.HubUbuntuTag
	var jobs [][]string
	for i := range 3 {
		jobs = append(jobs,
			[]string{"skopeo", "--insecure-policy", "copy", "--all", "--retry-times", "0", "--src-tls-verify=false", "docker://" + m.addr + "/" + path, "dir:" + filepath.Join(t.TempDir(), "s")},
			[]string{"crane", "pull", "--insecure", "--format=oci", m.addr + "/" + path, filepath.Join(t.TempDir(), "c")},
			[]string{"ctr", "-a", sock, "-n", fmt.Sprint("e2e", i), "content", "fetch", "--all-platforms", "--hosts-dir", hostsDir, path},
		)
	}
	jobs = append(jobs, []string{"crane", "pull", "--insecure", "--format=oci", m.addr + "/" + ngctest.PytorchRepo + ":" + ngctest.PytorchTag, filepath.Join(t.TempDir(), "n")})
	errs := make(chan string, len(jobs))
	for _, j := range jobs {
		go func() {
			out, err := run(t, 3*time.Minute, j[0], j[1:]...)
			if err != nil {
				errs <- fmt.Sprintf("%s: %v\n%s", j[0], err, out)
				return
			}
			errs <- ""
		}()
	}
	for range jobs {
		if e := <-errs; e != "" {
			t.Error(e)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	for up, im := range map[*ngctest.Upstream]*ngctest.Image{u.hub.Upstream: u.hfx.Ubuntu, u.ngc: u.nfx.Pytorch} {
		for _, b := range im.Blobs() {
			if n := up.BlobFetches(b.Digest); n != 1 {
				t.Errorf("blob %s (%s) fetched %d times from its upstream, want 1", b.Digest.Encoded()[:12], b.MediaType, n)
			}
		}
	}
	u.noNSUpstream(t)
}

// TestUpstreamsDocker: a real Docker daemon pulls a Docker Hub image by the
// path prefix (mirror/docker.io/library/ubuntu:24.04, and
// mirror/docker.io/busybox for the official image), a registry.k8s.io
// image and an nvcr.io one through one mirror, and, with the mirror as its
// registry-mirrors entry (the root host for docker.io), a plain
// `docker pull busybox:1.36`; every image ID is the upstream's config
// digest. The daemon has no network, so nothing came from Docker Hub.
func TestUpstreamsDocker(t *testing.T) {
	need(t, "dockerd", "docker")
	u := newUpstreams(t, 128<<10)
	m := startMirrorWithConfig(t, u.ngc.URL(), u.config(t, "    root_hosts: [localhost]\n", ""))
	_, port, _ := strings.Cut(m.addr, ":")
	sock := startDockerd(t, "--registry-mirror", "http://localhost:"+port)
	amd64 := func(im *ngctest.Image) string {
		if c := im.Child("linux/amd64"); c != nil {
			return c.Config.Digest.String()
		}
		return im.Config.Digest.String()
	}
	for _, tc := range []struct {
		ref string
		im  *ngctest.Image
	}{
		// Docker Hub through registry-mirrors first, cold: the mirror has
		// to route the root path by the host to docker.io.
		{"busybox:" + ngctest.HubBusyboxTag, u.hfx.Busybox},
		{m.addr + "/docker.io/" + ngctest.HubUbuntuRepo + ":" + ngctest.HubUbuntuTag, u.hfx.Ubuntu},
		{m.addr + "/docker.io/busybox:" + ngctest.HubBusyboxTag, u.hfx.Busybox},
		{m.addr + "/registry.k8s.io/" + ngctest.PlainPauseRepo + ":" + ngctest.PlainPauseTag, u.pfx.Pause},
		{m.addr + "/" + ngctest.CUDARepo + ":" + ngctest.CUDATag, u.nfx.CUDA},
		{"ubuntu:" + ngctest.HubUbuntuTag, u.hfx.Ubuntu},
	} {
		if out, err := run(t, 5*time.Minute, "docker", "-H", "unix://"+sock, "pull", tc.ref); err != nil {
			t.Fatalf("docker pull %s: %v\n%s", tc.ref, err, out)
		}
		id := strings.TrimSpace(mustRun(t, "docker", "-H", "unix://"+sock, "image", "inspect", "--format", "{{.Id}}", tc.ref))
		if want := amd64(tc.im); id != want {
			t.Fatalf("docker pull %s: image ID %s, want %s", tc.ref, id, want)
		}
		if tc.ref == "busybox:"+ngctest.HubBusyboxTag && u.hub.Count("registry", http.MethodGet, "/v2/library/busybox/manifests/"+ngctest.HubBusyboxTag) == 0 {
			t.Fatal("docker pull busybox through registry-mirrors did not reach the Docker-Hub-like upstream")
		}
	}
	u.noNSUpstream(t)
}

// TestUpstreamOutageIsolation: while one upstream is offline, answers 429
// to everything, or (Docker Hub) has used up its anonymous pull limit, the
// images of it the mirror has cached still pull (by tag, served stale, and
// by digest, without asking it), an uncached one fails, and the other
// upstreams are unaffected, warm and cold.
func TestUpstreamOutageIsolation(t *testing.T) {
	need(t, "crane")
	type fault struct {
		name   string
		target string // the registry that fails
		apply  func(u *upstreams)
	}
	for _, f := range []fault{
		{"docker.io offline", "docker.io", func(u *upstreams) { u.hub.SetFault(ngctest.Offline) }},
		{"docker.io 429", "docker.io", func(u *upstreams) { u.hub.SetFault(ngctest.RateLimited(time.Hour)) }},
		{"docker.io pull limit", "docker.io", func(u *upstreams) { u.hub.SetPullLimit(1); exhaustPulls(t, u.hub) }},
		{"docker.io abuse limit", "docker.io", func(u *upstreams) { u.hub.SetFault(ngctest.DockerHubAbuseLimit) }},
		{"nvcr.io offline", "nvcr.io", func(u *upstreams) { u.ngc.SetFault(ngctest.Offline) }},
		{"nvcr.io 429", "nvcr.io", func(u *upstreams) { u.ngc.SetFault(ngctest.RateLimited(time.Hour)) }},
	} {
		t.Run(f.name, func(t *testing.T) {
			u := newUpstreams(t, 64<<10)
			// Tags are revalidated on every pull, so the failing upstream
			// is asked for them.
			m := startMirrorWithConfig(t, u.ngc.URL(), u.config(t, "    tag_freshness: 1ms\n", "cache:\n  tag_freshness: 1ms\n"))
			hub := func(repo, tag string) string { return "docker.io/" + repo + ":" + tag }
			ngc := func(repo, tag string) string { return repo + ":" + tag }
			type pull struct {
				ref string
				im  *ngctest.Image
			}
			var warmA, coldA, warmB, coldB []pull
			dh := []pull{{hub(ngctest.HubUbuntuRepo, ngctest.HubUbuntuTag), u.hfx.Ubuntu}, {hub(ngctest.HubBusyboxRepo, ngctest.HubBusyboxTag), u.hfx.Busybox}}
			nv := []pull{{ngc(ngctest.CUDARepo, ngctest.CUDATag), u.nfx.CUDA}, {ngc(ngctest.DCGMRepo, ngctest.DCGMTag), u.nfx.DCGM}}
			k8s := pull{"registry.k8s.io/" + ngctest.PlainPauseRepo + ":" + ngctest.PlainPauseTag, u.pfx.Pause}
			a, b := dh, nv
			if f.target == "nvcr.io" {
				a, b = nv, dh
			}
			warmA, coldA, warmB, coldB = a[:1], a[1:], b[:1], []pull{b[1], k8s}
			pullOK := func(p pull, what string) {
				t.Helper()
				if got, err := craneDigest(t, m.addr+"/"+p.ref); err != nil || got != p.im.Manifest.Digest.String() {
					t.Fatalf("%s %s: digest %q (%v), want %s", what, p.ref, got, err, p.im.Manifest.Digest)
				}
				mustRun(t, "crane", "pull", "--insecure", "--format=oci", m.addr+"/"+p.ref, t.TempDir())
			}
			for _, p := range slices.Concat(warmA, warmB) {
				pullOK(p, "warming")
			}
			failing := u.hub.Upstream
			if f.target == "nvcr.io" {
				failing = u.ngc
			}
			f.apply(u)

			for _, p := range warmA {
				before := len(failing.Requests())
				pullOK(p, "cached image of the failing upstream, by tag:")
				if len(failing.Requests()) == before {
					t.Fatal("the tag was not revalidated with the failing upstream; the test would prove nothing about serving stale")
				}
				before = len(failing.Requests())
				byDigest := p.ref[:strings.LastIndex(p.ref, ":")] + "@" + p.im.Manifest.Digest.String()
				pullOK(pull{byDigest, p.im}, "cached image of the failing upstream, by digest:")
				if n := len(failing.Requests()) - before; n != 0 {
					t.Fatalf("a pull by digest of a cached image made %d requests to the failing upstream", n)
				}
			}
			for _, p := range coldA {
				if out, err := run(t, time.Minute, "crane", "manifest", "--insecure", m.addr+"/"+p.ref); err == nil {
					t.Fatalf("an uncached image of the failing upstream was served: %s\n%.200s", p.ref, out)
				}
			}
			for _, p := range warmB {
				pullOK(p, "other upstream, cached:")
			}
			for _, p := range coldB {
				pullOK(p, "other upstream, cold:")
			}
			// /readyz: still ready (the cache serves), every upstream
			// reported by its registry name. Asked last: its ping of a
			// 429ing upstream backs that client off, and the pulls above
			// must reach it.
			code, rep := readyz(t, m)
			ups, _ := rep["upstreams"].(map[string]any)
			state := func(name string) any { s, _ := ups[name].(map[string]any); return s["status"] }
			def := "nvcr.io" // the default's name in /readyz and metrics, whatever its URL's host
			if code != http.StatusOK || rep["status"] != "ready" {
				t.Fatalf("/readyz with %s: %d %v, want 200 ready", f.name, code, rep)
			}
			for _, name := range []string{def, "docker.io", "registry.k8s.io"} {
				down := name == f.target || (f.target == "nvcr.io" && name == def)
				if !down && state(name) != "ok" {
					t.Errorf("/readyz with %s: upstreams[%s] = %v, want ok", f.name, name, ups[name])
				}
				if down && strings.HasSuffix(f.name, "offline") && state(name) != "unreachable" {
					t.Errorf("/readyz with %s: upstreams[%s] = %v, want unreachable", f.name, name, ups[name])
				}
			}
			u.noNSUpstream(t)
		})
	}
}

// exhaustPulls uses up the Docker-Hub-like upstream's anonymous pull limit
// with manifest GETs of its own, as other machines behind the same address
// would.
func exhaustPulls(t *testing.T, d *ngctest.DockerHub) {
	t.Helper()
	for range 10 {
		resp, err := http.Get(d.Realm() + "?service=" + ngctest.DockerHubService + "&scope=repository:" + ngctest.HubBusyboxRepo + ":pull")
		if err != nil {
			t.Fatal(err)
		}
		var tok struct{ Token string }
		err = json.NewDecoder(resp.Body).Decode(&tok)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		req, _ := http.NewRequest(http.MethodGet, d.URL()+"/v2/"+ngctest.HubBusyboxRepo+"/manifests/"+ngctest.HubBusyboxTag, nil)
		req.Header.Set("Authorization", "Bearer "+tok.Token)
		resp, err = http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusTooManyRequests {
			return
		}
	}
	t.Fatal("the Docker-Hub-like upstream never answered 429")
}

// TestUpstreamsUnknownRegistry: a registry that is not configured, by path
// prefix or ?ns=, and path-prefix tricks get a 4xx and reach no upstream
// (the start-up pings aside).
func TestUpstreamsUnknownRegistry(t *testing.T) {
	u := newUpstreams(t, 4<<10)
	m := startMirrorWithConfig(t, u.ngc.URL(), u.config(t, "", ""))
	for _, target := range []string{
		"/v2/ghcr.io/org/img/manifests/1.0",
		"/v2/quay.io/org/img/tags/list",
		"/v2/org/img/manifests/1.0?ns=ghcr.io",
		"/v2/docker.io/../nvidia/cuda/manifests/" + ngctest.CUDATag,
		"/v2/docker.io/%2e%2e/nvidia/cuda/manifests/" + ngctest.CUDATag,
		"/v2/docker.io:443/library/ubuntu/manifests/" + ngctest.HubUbuntuTag,
		"/v2/registry.k8s.io:5000/pause/manifests/" + ngctest.PlainPauseTag,
		"/v2/user@docker.io/library/ubuntu/manifests/" + ngctest.HubUbuntuTag,
		"/v2/localhost/library/ubuntu/manifests/" + ngctest.HubUbuntuTag,
		"/v2/" + u.hub.Host() + "/library/ubuntu/manifests/" + ngctest.HubUbuntuTag,
	} {
		status, _, body := rawRequest(t, m.addr, target)
		if status < 400 || status > 499 {
			t.Errorf("GET %s: %d %.200s, want a 4xx", target, status, body)
		}
	}
	for name, reqs := range map[string][]ngctest.Request{"nvcr.io": u.ngc.Requests(), "docker.io": u.hub.Requests(), "registry.k8s.io": u.plain.Requests()} {
		for _, r := range reqs {
			if r.Path != "/v2/" && r.Path != "/proxy_auth" && r.Path != "/token" {
				t.Errorf("a request for an unknown registry reached %s: %s %s", name, r.Method, r.Path)
			}
		}
	}
}

// TestFakesServeRealClients: the test upstreams themselves work with the
// real clients, straight (no mirror): crane validates every fixture image,
// skopeo copies them, containerd fetches them, Docker pulls from the
// Docker-Hub-like one (its realm on another port) and the plain one. Would
// a fake drift from what real clients accept, this fails before any mirror
// test does.
func TestFakesServeRealClients(t *testing.T) {
	need(t, "crane", "skopeo", "containerd", "ctr", "dockerd", "docker")
	u := newUpstreams(t, 64<<10)
	sock := startContainerd(t)
	for _, im := range u.images() {
		mustRun(t, "crane", "validate", "--insecure", "--remote", im.upstream)
		if out, err := skopeoCopy(t, im.upstream, t.TempDir()); err != nil {
			t.Fatalf("skopeo %s: %v\n%s", im.upstream, err, out)
		}
		if out, err := run(t, 3*time.Minute, "ctr", "-a", sock, "-n", "direct", "content", "fetch", "--all-platforms", "--plain-http", im.upstream); err != nil {
			t.Fatalf("ctr %s: %v\n%s", im.upstream, err, out)
		}
	}
	private := u.hub.Host() + "/" + ngctest.HubPrivateRepo + ":" + ngctest.HubPrivateTag
	if out, err := run(t, time.Minute, "crane", "manifest", "--insecure", private); err == nil {
		t.Fatalf("the private repository was served anonymously:\n%s", out)
	}
	if out, err := skopeoCopy(t, private, t.TempDir(), "--src-creds", ngctest.DockerHubUser+":"+ngctest.DockerHubPassword); err != nil {
		t.Fatalf("skopeo with credentials: %v\n%s", err, out)
	}
	if out, err := run(t, 3*time.Minute, "ctr", "-a", sock, "-n", "direct", "content", "fetch", "--plain-http", "--user", ngctest.DockerHubUser+":"+ngctest.DockerHubPassword, private); err != nil {
		t.Fatalf("ctr with credentials: %v\n%s", err, out)
	}
	dsock := startDockerd(t)
	for _, tc := range []struct {
		ref string
		id  string
	}{
		{u.hub.Host() + "/" + ngctest.HubUbuntuRepo + ":" + ngctest.HubUbuntuTag, u.hfx.Ubuntu.Child("linux/amd64").Config.Digest.String()},
		{u.plain.Host() + "/" + ngctest.PlainCoreDNSRepo + ":" + ngctest.PlainCoreDNSTag, u.pfx.CoreDNS.Config.Digest.String()},
	} {
		if out, err := run(t, 5*time.Minute, "docker", "-H", "unix://"+dsock, "pull", tc.ref); err != nil {
			t.Fatalf("docker pull %s: %v\n%s", tc.ref, err, out)
		}
		if id := strings.TrimSpace(mustRun(t, "docker", "-H", "unix://"+dsock, "image", "inspect", "--format", "{{.Id}}", tc.ref)); id != tc.id {
			t.Fatalf("docker pull %s: image ID %s, want %s", tc.ref, id, tc.id)
		}
	}
	for _, r := range u.hub.CDNRequests() {
		if r.Auth != "" {
			t.Fatal("a client sent Authorization to the Docker Hub CDN")
		}
	}
	if u.hub.Count("auth", http.MethodGet, "/token")+u.hub.Count("auth", http.MethodPost, "/token") == 0 {
		t.Fatal("no client asked the Docker Hub realm for a token")
	}
}

// TestUpstreamsPrefetchThenOffline: `mirror prefetch` takes images of the
// further upstreams by their registry-qualified names (docker.io/busybox
// meaning docker.io/library/busybox), fetches each blob once, and skopeo
// then pulls them with every upstream gone.
func TestUpstreamsPrefetchThenOffline(t *testing.T) {
	need(t, "skopeo")
	u := newUpstreams(t, 64<<10)
	dataDir := t.TempDir()
	m := startMirrorAt(t, u.ngc.URL(), dataDir, u.config(t, "", ""))
	env := []string{"MIRROR_ADDR=" + m.addr, "MIRROR_DATA_DIR=" + dataDir}
	for _, tc := range []struct {
		arg  string
		up   *ngctest.Upstream
		im   *ngctest.Image
		args []string
	}{
		{"docker.io/" + ngctest.HubUbuntuRepo + ":" + ngctest.HubUbuntuTag, u.hub.Upstream, u.hfx.Ubuntu.Child("linux/amd64"), []string{"--platform", "linux/amd64"}},
		{"docker.io/busybox:" + ngctest.HubBusyboxTag, u.hub.Upstream, u.hfx.Busybox, nil},
		{"registry.k8s.io/" + ngctest.PlainPauseRepo + ":" + ngctest.PlainPauseTag, u.plain.Upstream, u.pfx.Pause, nil},
	} {
		out, code := runCLI(t, env, append([]string{"prefetch", tc.arg}, tc.args...)...)
		if code != 0 || !strings.Contains(out, "prefetched") {
			t.Fatalf("mirror prefetch %s: exit %d\n%s", tc.arg, code, out)
		}
		for _, b := range tc.im.Blobs() {
			if n := tc.up.BlobFetches(b.Digest); n != 1 {
				t.Errorf("%s: blob %s fetched %d times, want 1", tc.arg, b.Digest.Encoded()[:12], n)
			}
		}
	}
	u.ngc.Close()
	u.hub.Close()
	u.plain.Close()
	for _, ref := range []string{
		"docker.io/" + ngctest.HubUbuntuRepo + ":" + ngctest.HubUbuntuTag,
		"docker.io/" + ngctest.HubBusyboxRepo + ":" + ngctest.HubBusyboxTag,
		"registry.k8s.io/" + ngctest.PlainPauseRepo + ":" + ngctest.PlainPauseTag,
	} {
		out, err := run(t, 2*time.Minute, "skopeo", "--override-os", "linux", "--override-arch", "amd64", "--insecure-policy",
			"copy", "--retry-times", "0", "--src-tls-verify=false", "docker://"+m.addr+"/"+ref, "dir:"+t.TempDir())
		if err != nil {
			t.Fatalf("offline pull of the prefetched %s: %v\n%s", ref, err, out)
		}
	}
}

// TestUpstreamsPrivateRepo: docker.io configured with credentials is not
// public: an anonymous client cannot pull its private repository, cold or
// after an allowed user pulled it; with htpasswd and a rule
// docker.io/ngctest/**, that user can. Neither password reaches the log.
func TestUpstreamsPrivateRepo(t *testing.T) {
	need(t, "skopeo")
	u := newUpstreams(t, 64<<10)
	priv := "docker.io/" + ngctest.HubPrivateRepo + ":" + ngctest.HubPrivateTag
	creds := "MIRROR_UPSTREAMS_DOCKER_IO_PASSWORD=" + ngctest.DockerHubPassword
	hub := "    username: " + ngctest.DockerHubUser + "\n"

	def := startMirrorWithConfig(t, u.ngc.URL(), u.config(t, hub, ""), creds)
	if out, err := skopeoCopy(t, def.addr+"/"+priv, t.TempDir()); err == nil {
		t.Fatalf("default access settings served docker.io's private repository anonymously:\n%s", out)
	}

	cfg := u.config(t, hub, `access:
  mode: htpasswd
  htpasswd_file: `+ngctest.WriteHtpasswd(t, "alice", "alice-pw", "bob", "bob-pw")+`
  rules:
    - repositories: ["docker.io/ngctest/**"]
      users: [alice]
`)
	m := startMirrorWithConfig(t, u.ngc.URL(), cfg, creds)
	if out, err := skopeoCopy(t, m.addr+"/"+priv, t.TempDir()); err == nil {
		t.Fatalf("anonymous pull of docker.io's private repository, cold:\n%s", out)
	}
	dir := t.TempDir()
	if out, err := skopeoCopy(t, m.addr+"/"+priv, dir, "--src-creds", "alice:alice-pw"); err != nil {
		t.Fatalf("alice, allowed by the rule: %v\n%s", err, out)
	}
	if got, err := os.ReadFile(filepath.Join(dir, "manifest.json")); err != nil || string(got) != string(u.hfx.Private.Manifest.Body) {
		t.Fatalf("alice's copy of the private manifest differs from the upstream's (%v)", err)
	}
	for _, who := range [][]string{nil, {"--src-creds", "bob:bob-pw"}} {
		if out, err := skopeoCopy(t, m.addr+"/"+priv, t.TempDir(), who...); err == nil {
			t.Fatalf("pull of the cached private repository by %v:\n%s", who, out)
		}
	}
	waitLog(t, m, " route=manifest ")
	assertNoSecrets(t, u.hub.Upstream, m.log.String(), ngctest.DockerHubPassword, "alice-pw")
	if strings.Contains(def.log.String(), ngctest.DockerHubPassword) {
		t.Fatal("the Docker Hub password appears in the log")
	}
}
