package ngctest

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// noRedirect is a client that shows redirects instead of following them.
var noRedirect = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// do sends method to rawURL with headers ("Key: value") and returns the
// response with its body read.
func do(t *testing.T, method, rawURL string, headers ...string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, rawURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range headers {
		k, v, _ := strings.Cut(h, ": ")
		req.Header.Set(k, v)
	}
	resp, err := noRedirect.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, body
}

func errCode(t *testing.T, body []byte) string {
	t.Helper()
	var e struct {
		Errors []struct{ Code string } `json:"errors"`
	}
	if err := json.Unmarshal(body, &e); err != nil || len(e.Errors) == 0 {
		t.Fatalf("not an OCI error body: %q", body)
	}
	return e.Errors[0].Code
}

func newHub(t *testing.T, opts DockerHubOptions) (*DockerHub, *DockerHubFixture) {
	t.Helper()
	d := NewDockerHub(opts)
	t.Cleanup(d.Close)
	fx, err := d.Populate(4 << 10)
	if err != nil {
		t.Fatal(err)
	}
	return d, fx
}

// hubToken gets a token from the fake's realm for scope, anonymously
// unless basic ("user:password") is given.
func hubToken(t *testing.T, d *DockerHub, service, scope string, basic ...string) string {
	t.Helper()
	q := url.Values{}
	if service != "" {
		q.Set("service", service)
	}
	q.Set("scope", scope)
	var hdr []string
	if len(basic) > 0 {
		user, pass, _ := strings.Cut(basic[0], ":")
		req, _ := http.NewRequest(http.MethodGet, "http://x", nil)
		req.SetBasicAuth(user, pass)
		hdr = append(hdr, "Authorization: "+req.Header.Get("Authorization"))
	}
	resp, body := do(t, http.MethodGet, d.Realm()+"?"+q.Encode(), hdr...)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("token: %s %s", resp.Status, body)
	}
	var tr struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
		ExpiresIn   int    `json:"expires_in"`
		IssuedAt    string `json:"issued_at"`
	}
	if err := json.Unmarshal(body, &tr); err != nil {
		t.Fatal(err)
	}
	if tr.Token == "" || tr.AccessToken != tr.Token || tr.ExpiresIn != 300 {
		t.Fatalf("token response %s: want token = access_token and expires_in 300", body)
	}
	if _, err := time.Parse(time.RFC3339, tr.IssuedAt); err != nil {
		t.Fatalf("issued_at %q: %v", tr.IssuedAt, err)
	}
	return tr.Token
}

// TestDockerHubChallenge: the registry's challenges name the realm on a
// separate listener and service="registry.docker.io", with the
// repository's scope on API requests, as registry-1.docker.io does.
func TestDockerHubChallenge(t *testing.T) {
	t.Parallel()
	d, _ := newHub(t, DockerHubOptions{})
	if d.Auth.URL == d.URL() || d.Auth.URL == d.CDN.URL {
		t.Fatal("the realm must be a host of its own")
	}
	realm := d.Realm()
	if !strings.HasPrefix(realm, "http://localhost:") || !strings.HasSuffix(realm, "/token") {
		t.Fatalf("realm %s, want http://localhost:PORT/token", realm)
	}
	for _, tc := range []struct{ path, want string }{
		{"/v2/", fmt.Sprintf(`Bearer realm="%s",service="registry.docker.io"`, realm)},
		{"/v2/library/ubuntu/manifests/24.04", fmt.Sprintf(`Bearer realm="%s",service="registry.docker.io",scope="repository:library/ubuntu:pull"`, realm)},
		{"/v2/library/ubuntu/tags/list", fmt.Sprintf(`Bearer realm="%s",service="registry.docker.io",scope="repository:library/ubuntu:pull"`, realm)},
	} {
		resp, body := do(t, http.MethodGet, d.URL()+tc.path)
		if resp.StatusCode != http.StatusUnauthorized || errCode(t, body) != "UNAUTHORIZED" {
			t.Fatalf("%s: %s %s, want 401 UNAUTHORIZED", tc.path, resp.Status, body)
		}
		if got := resp.Header.Get("Www-Authenticate"); got != tc.want {
			t.Fatalf("%s: challenge\n %s\nwant\n %s", tc.path, got, tc.want)
		}
	}
	if n := d.Count("auth", http.MethodGet, "/token"); n != 0 {
		t.Fatalf("%d realm requests before any token was asked for", n)
	}
}

// TestDockerHubAnonymousPull: an anonymous token for a public repository
// pulls its manifest (by tag and digest) and lists its tags; without a
// limit configured no RateLimit header is sent and nothing is counted.
func TestDockerHubAnonymousPull(t *testing.T) {
	t.Parallel()
	d, fx := newHub(t, DockerHubOptions{})
	tok := hubToken(t, d, DockerHubService, "repository:library/ubuntu:pull")
	for _, ref := range []string{HubUbuntuTag, "latest", fx.Ubuntu.Manifest.Digest.String()} {
		resp, body := do(t, http.MethodGet, d.URL()+"/v2/library/ubuntu/manifests/"+ref, "Authorization: Bearer "+tok)
		if resp.StatusCode != http.StatusOK || digest.FromBytes(body) != fx.Ubuntu.Manifest.Digest {
			t.Fatalf("manifest %s: %s, digest %s", ref, resp.Status, digest.FromBytes(body))
		}
		if resp.Header.Get("Content-Type") != "application/vnd.oci.image.index.v1+json" {
			t.Fatalf("media type %q", resp.Header.Get("Content-Type"))
		}
		if resp.Header.Get("RateLimit-Limit") != "" {
			t.Fatal("RateLimit-Limit sent without a limit")
		}
	}
	resp, body := do(t, http.MethodGet, d.URL()+"/v2/library/ubuntu/tags/list", "Authorization: Bearer "+tok)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"24.04"`) {
		t.Fatalf("tags: %s %s", resp.Status, body)
	}
	// The token is for library/ubuntu only.
	resp, body = do(t, http.MethodGet, d.URL()+"/v2/library/busybox/manifests/"+HubBusyboxTag, "Authorization: Bearer "+tok)
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("Www-Authenticate"), `error="insufficient_scope"`) {
		t.Fatalf("other repository with ubuntu's token: %s %s %q", resp.Status, body, resp.Header.Get("Www-Authenticate"))
	}
	if d.Pulls() != 0 {
		t.Fatalf("%d pulls counted without a limit", d.Pulls())
	}
}

// TestDockerHubServiceRequired: a token asked for without
// service=registry.docker.io (or for another service) is issued but the
// registry refuses it as invalid_token, so a client that drops the
// challenge's service cannot pull.
func TestDockerHubServiceRequired(t *testing.T) {
	t.Parallel()
	d, _ := newHub(t, DockerHubOptions{})
	for _, service := range []string{"", "registry"} {
		tok := hubToken(t, d, service, "repository:library/ubuntu:pull")
		resp, body := do(t, http.MethodGet, d.URL()+"/v2/library/ubuntu/manifests/"+HubUbuntuTag, "Authorization: Bearer "+tok)
		if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("Www-Authenticate"), `error="invalid_token"`) {
			t.Fatalf("token for service %q: %s %s %q", service, resp.Status, body, resp.Header.Get("Www-Authenticate"))
		}
	}
}

// TestDockerHubLibraryOnly: official images exist only as library/NAME; the
// single-component name gets no access (401 insufficient_scope, as Docker
// Hub answers for a repository that does not exist), so whoever forgets
// library/ cannot pull.
func TestDockerHubLibraryOnly(t *testing.T) {
	t.Parallel()
	d, fx := newHub(t, DockerHubOptions{})
	tok := hubToken(t, d, DockerHubService, "repository:ubuntu:pull")
	resp, body := do(t, http.MethodGet, d.URL()+"/v2/ubuntu/manifests/"+HubUbuntuTag, "Authorization: Bearer "+tok)
	if resp.StatusCode != http.StatusUnauthorized || errCode(t, body) != "UNAUTHORIZED" ||
		!strings.Contains(resp.Header.Get("Www-Authenticate"), `scope="repository:ubuntu:pull",error="insufficient_scope"`) {
		t.Fatalf("ubuntu without library/: %s %s %q", resp.Status, body, resp.Header.Get("Www-Authenticate"))
	}
	tok = hubToken(t, d, DockerHubService, "repository:library/busybox:pull")
	resp, body = do(t, http.MethodGet, d.URL()+"/v2/library/busybox/manifests/"+HubBusyboxTag, "Authorization: Bearer "+tok)
	if resp.StatusCode != http.StatusOK || digest.FromBytes(body) != fx.Busybox.Manifest.Digest {
		t.Fatalf("library/busybox: %s", resp.Status)
	}
}

// TestDockerHubCredentials: a private repository needs the user's
// credentials, by GET with Basic or by the OAuth2 POST form; wrong ones are
// refused at the realm with {"details": ...}.
func TestDockerHubCredentials(t *testing.T) {
	t.Parallel()
	d, fx := newHub(t, DockerHubOptions{AnonymousPullLimit: 1})
	scope := "repository:" + HubPrivateRepo + ":pull"
	manifest := d.URL() + "/v2/" + HubPrivateRepo + "/manifests/" + HubPrivateTag

	tok := hubToken(t, d, DockerHubService, scope)
	if resp, _ := do(t, http.MethodGet, manifest, "Authorization: Bearer "+tok); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("anonymous token on the private repository: %s", resp.Status)
	}

	req, _ := http.NewRequest(http.MethodGet, "http://x", nil)
	req.SetBasicAuth(DockerHubUser, "wrong")
	resp, body := do(t, http.MethodGet, d.Realm()+"?service=registry.docker.io&scope="+url.QueryEscape(scope), "Authorization: "+req.Header.Get("Authorization"))
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(string(body), `"details"`) {
		t.Fatalf("wrong password: %s %s", resp.Status, body)
	}

	tok = hubToken(t, d, DockerHubService, scope, DockerHubUser+":"+DockerHubPassword)
	for range 3 { // authenticated pulls are not held to the anonymous limit
		resp, body = do(t, http.MethodGet, manifest, "Authorization: Bearer "+tok)
		if resp.StatusCode != http.StatusOK || digest.FromBytes(body) != fx.Private.Manifest.Digest {
			t.Fatalf("private with credentials: %s %s", resp.Status, body)
		}
		if resp.Header.Get("RateLimit-Limit") != "" {
			t.Fatal("RateLimit headers on an authenticated pull")
		}
	}

	form := url.Values{"grant_type": {"password"}, "username": {DockerHubUser}, "password": {DockerHubPassword},
		"service": {DockerHubService}, "scope": {scope}, "client_id": {"test"}}
	presp, err := http.PostForm(d.Realm(), form)
	if err != nil {
		t.Fatal(err)
	}
	var tr struct {
		AccessToken string `json:"access_token"`
	}
	err = json.NewDecoder(presp.Body).Decode(&tr)
	presp.Body.Close()
	if err != nil || presp.StatusCode != http.StatusOK {
		t.Fatalf("POST token: %s %v", presp.Status, err)
	}
	if resp, _ := do(t, http.MethodGet, manifest, "Authorization: Bearer "+tr.AccessToken); resp.StatusCode != http.StatusOK {
		t.Fatalf("private with the POSTed token: %s", resp.Status)
	}
	if d.Pulls() != 0 {
		t.Fatalf("%d anonymous pulls counted, want 0", d.Pulls())
	}
}

// TestDockerHubPullLimit: anonymous manifest GETs beyond the limit get 429
// TOOMANYREQUESTS; every anonymous manifest answer carries RateLimit-Limit
// and RateLimit-Remaining ("N;w=21600"); HEADs and blobs are not counted
// and still answered; Retry-After only when configured.
func TestDockerHubPullLimit(t *testing.T) {
	t.Parallel()
	for _, retryAfter := range []time.Duration{0, 30 * time.Second} {
		t.Run(fmt.Sprint(retryAfter), func(t *testing.T) {
			t.Parallel()
			d, fx := newHub(t, DockerHubOptions{AnonymousPullLimit: 2, RetryAfter: retryAfter})
			tok := "Authorization: Bearer " + hubToken(t, d, DockerHubService, "repository:library/busybox:pull")
			manifest := d.URL() + "/v2/library/busybox/manifests/" + HubBusyboxTag
			check := func(resp *http.Response, status int, remaining string) {
				t.Helper()
				if resp.StatusCode != status {
					t.Fatalf("%s, want %d", resp.Status, status)
				}
				if got := resp.Header.Get("RateLimit-Limit"); got != "2;w=21600" {
					t.Fatalf("RateLimit-Limit %q", got)
				}
				if got := resp.Header.Get("RateLimit-Remaining"); got != remaining+";w=21600" {
					t.Fatalf("RateLimit-Remaining %q, want %s;w=21600", got, remaining)
				}
				if resp.Header.Get("Docker-RateLimit-Source") != "127.0.0.1" {
					t.Fatalf("Docker-RateLimit-Source %q", resp.Header.Get("Docker-RateLimit-Source"))
				}
			}
			resp, _ := do(t, http.MethodGet, manifest, tok)
			check(resp, http.StatusOK, "1")
			resp, _ = do(t, http.MethodHead, manifest, tok)
			check(resp, http.StatusOK, "1")
			resp, _ = do(t, http.MethodGet, manifest, tok)
			check(resp, http.StatusOK, "0")
			resp, body := do(t, http.MethodGet, manifest, tok)
			check(resp, http.StatusTooManyRequests, "0")
			if errCode(t, body) != "TOOMANYREQUESTS" {
				t.Fatalf("429 body %s", body)
			}
			want := ""
			if retryAfter > 0 {
				want = "30"
			}
			if got := resp.Header.Get("Retry-After"); got != want {
				t.Fatalf("Retry-After %q, want %q", got, want)
			}
			resp, _ = do(t, http.MethodHead, manifest, tok)
			check(resp, http.StatusOK, "0")
			b := fx.Busybox.Layers[0]
			if resp, _ := do(t, http.MethodGet, d.URL()+"/v2/library/busybox/blobs/"+b.Digest.String(), tok); resp.StatusCode != http.StatusTemporaryRedirect {
				t.Fatalf("blob while rate limited: %s", resp.Status)
			}
			if d.Pulls() != 3 {
				t.Fatalf("Pulls %d, want 3", d.Pulls())
			}
			d.SetPullLimit(0)
			if resp, _ := do(t, http.MethodGet, manifest, tok); resp.StatusCode != http.StatusOK || resp.Header.Get("RateLimit-Limit") != "" {
				t.Fatalf("after SetPullLimit(0): %s %q", resp.Status, resp.Header.Get("RateLimit-Limit"))
			}
		})
	}
}

// TestDockerHubBlobsOnCDN: blob GETs redirect to the CDN host, which
// refuses Authorization, serves the bytes without it and honours Range.
func TestDockerHubBlobsOnCDN(t *testing.T) {
	t.Parallel()
	d, fx := newHub(t, DockerHubOptions{})
	tok := "Authorization: Bearer " + hubToken(t, d, DockerHubService, "repository:library/ubuntu:pull")
	b := fx.Ubuntu.Children[0].Layers[0]
	resp, _ := do(t, http.MethodGet, d.URL()+"/v2/library/ubuntu/blobs/"+b.Digest.String(), tok)
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusTemporaryRedirect || !strings.HasPrefix(loc, d.CDN.URL+"/") {
		t.Fatalf("blob GET: %s to %q, want a redirect to %s", resp.Status, loc, d.CDN.URL)
	}
	if resp, _ := do(t, http.MethodGet, loc, tok); resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("CDN with Authorization: %s, want 400", resp.Status)
	}
	resp, body := do(t, http.MethodGet, loc)
	if resp.StatusCode != http.StatusOK || digest.FromBytes(body) != b.Digest {
		t.Fatalf("CDN: %s, digest %s", resp.Status, digest.FromBytes(body))
	}
	resp, body = do(t, http.MethodGet, loc, "Range: bytes=10-")
	if resp.StatusCode != http.StatusPartialContent || string(body) != string(b.Body[10:]) {
		t.Fatalf("CDN Range: %s", resp.Status)
	}
	if n := d.BlobFetches(b.Digest); n != 3 {
		t.Fatalf("BlobFetches %d, want 3 (the one refused included)", n)
	}
}

// TestDockerHubTokenExpiry: an expired token gets 401 invalid_token naming
// the same realm, where a fresh token works.
func TestDockerHubTokenExpiry(t *testing.T) {
	t.Parallel()
	d, _ := newHub(t, DockerHubOptions{})
	tok := hubToken(t, d, DockerHubService, "repository:library/ubuntu:pull")
	d.ExpireTokens()
	resp, _ := do(t, http.MethodGet, d.URL()+"/v2/library/ubuntu/manifests/"+HubUbuntuTag, "Authorization: Bearer "+tok)
	want := fmt.Sprintf(`Bearer realm="%s",service="registry.docker.io",scope="repository:library/ubuntu:pull",error="invalid_token"`, d.Realm())
	if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("Www-Authenticate") != want {
		t.Fatalf("expired: %s %q", resp.Status, resp.Header.Get("Www-Authenticate"))
	}
	tok = hubToken(t, d, DockerHubService, "repository:library/ubuntu:pull")
	if resp, _ := do(t, http.MethodGet, d.URL()+"/v2/library/ubuntu/manifests/"+HubUbuntuTag, "Authorization: Bearer "+tok); resp.StatusCode != http.StatusOK {
		t.Fatalf("fresh token: %s", resp.Status)
	}
}

func newPlain(t *testing.T, opts PlainOptions) (*Plain, *PlainFixture) {
	t.Helper()
	p := NewPlain(opts)
	t.Cleanup(p.Close)
	fx, err := p.Populate(4 << 10)
	if err != nil {
		t.Fatal(err)
	}
	return p, fx
}

// TestPlainRegistry: no challenge anywhere, single-component names at the
// root (no library/), 404 NAME_UNKNOWN for unknown names, blobs served by
// the registry itself (Range honoured) unless Redirect is set.
func TestPlainRegistry(t *testing.T) {
	t.Parallel()
	p, fx := newPlain(t, PlainOptions{})
	resp, _ := do(t, http.MethodGet, p.URL()+"/v2/")
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Www-Authenticate") != "" || resp.Header.Get("Docker-Distribution-Api-Version") != "registry/2.0" {
		t.Fatalf("/v2/: %s %q", resp.Status, resp.Header.Get("Www-Authenticate"))
	}
	resp, body := do(t, http.MethodGet, p.URL()+"/v2/pause/manifests/"+PlainPauseTag)
	if resp.StatusCode != http.StatusOK || digest.FromBytes(body) != fx.Pause.Manifest.Digest {
		t.Fatalf("pause: %s", resp.Status)
	}
	resp, body = do(t, http.MethodGet, p.URL()+"/v2/library/pause/manifests/"+PlainPauseTag)
	if resp.StatusCode != http.StatusNotFound || errCode(t, body) != "NAME_UNKNOWN" {
		t.Fatalf("library/pause: %s %s", resp.Status, body)
	}
	b := fx.CoreDNS.Layers[1]
	blob := p.URL() + "/v2/coredns/coredns/blobs/" + b.Digest.String()
	resp, body = do(t, http.MethodGet, blob)
	if resp.StatusCode != http.StatusOK || digest.FromBytes(body) != b.Digest || resp.Header.Get("Docker-Content-Digest") != b.Digest.String() {
		t.Fatalf("blob: %s", resp.Status)
	}
	resp, body = do(t, http.MethodGet, blob, "Range: bytes=5-9")
	if resp.StatusCode != http.StatusPartialContent || string(body) != string(b.Body[5:10]) {
		t.Fatalf("blob Range: %s", resp.Status)
	}
	if resp, _ := do(t, http.MethodHead, blob); resp.StatusCode != http.StatusOK {
		t.Fatalf("blob HEAD: %s", resp.Status)
	}
	if n := p.BlobFetches(b.Digest); n != 2 {
		t.Fatalf("BlobFetches %d, want 2 (the HEAD is no fetch)", n)
	}
	if n := len(p.CDNRequests()); n != 0 {
		t.Fatalf("%d CDN requests without Redirect", n)
	}

	r, _ := newPlain(t, PlainOptions{Redirect: true})
	r.AddImage(PlainCoreDNSRepo, false, fx.CoreDNS, PlainCoreDNSTag)
	resp, _ = do(t, http.MethodGet, r.URL()+"/v2/coredns/coredns/blobs/"+b.Digest.String())
	if resp.StatusCode != http.StatusTemporaryRedirect || !strings.HasPrefix(resp.Header.Get("Location"), r.CDN.URL+"/") {
		t.Fatalf("with Redirect: %s %q", resp.Status, resp.Header.Get("Location"))
	}
}

// TestNGCChallengeUnchanged: the NGC fake's challenges (no service; the
// other realm after expiry) are as before the gate was made pluggable.
func TestNGCChallengeUnchanged(t *testing.T) {
	t.Parallel()
	u := New(Options{})
	t.Cleanup(u.Close)
	if _, err := u.Populate(4 << 10); err != nil {
		t.Fatal(err)
	}
	resp, _ := do(t, http.MethodGet, u.URL()+"/v2/")
	if got, want := resp.Header.Get("Www-Authenticate"), fmt.Sprintf(`Bearer realm="%s/proxy_auth",scope=""`, u.URL()); got != want {
		t.Fatalf("/v2/ challenge %q, want %q", got, want)
	}
	_, body := do(t, http.MethodGet, u.URL()+"/proxy_auth?scope=repository:nvidia/cuda:pull")
	var tr struct{ Token string }
	if err := json.Unmarshal(body, &tr); err != nil || tr.Token == "" {
		t.Fatalf("token: %s", body)
	}
	manifest := u.URL() + "/v2/nvidia/cuda/manifests/" + CUDATag
	if resp, _ := do(t, http.MethodGet, manifest, "Authorization: Bearer "+tr.Token); resp.StatusCode != http.StatusOK {
		t.Fatalf("manifest: %s", resp.Status)
	}
	u.ExpireTokens()
	resp, _ = do(t, http.MethodGet, manifest, "Authorization: Bearer "+tr.Token)
	if got, want := resp.Header.Get("Www-Authenticate"), fmt.Sprintf(`Bearer realm="%s/authn/token",service="registry",error="invalid_token"`, u.URL()); got != want {
		t.Fatalf("expired challenge %q, want %q", got, want)
	}
}

// TestFaults: FailWith, RateLimited and Offline answer on every listener
// (the Docker Hub realm included), are recorded, and SetFault(nil) brings
// the fake back.
func TestFaults(t *testing.T) {
	t.Parallel()
	d, _ := newHub(t, DockerHubOptions{})
	urls := []string{d.URL() + "/v2/", d.Realm() + "?service=registry.docker.io", d.CDN.URL + "/blobs/x"}

	d.SetFault(FailWith(http.StatusServiceUnavailable))
	for _, u := range urls {
		resp, body := do(t, http.MethodGet, u)
		if resp.StatusCode != http.StatusServiceUnavailable || errCode(t, body) != "UNAVAILABLE" {
			t.Fatalf("%s: %s %s", u, resp.Status, body)
		}
	}
	d.SetFault(RateLimited(7 * time.Second))
	resp, body := do(t, http.MethodGet, urls[0])
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "7" || errCode(t, body) != "TOOMANYREQUESTS" {
		t.Fatalf("RateLimited: %s %q %s", resp.Status, resp.Header.Get("Retry-After"), body)
	}
	d.SetFault(DockerHubAbuseLimit)
	resp, body = do(t, http.MethodGet, urls[0])
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "60" || !strings.HasPrefix(string(body), "Too Many Requests") {
		t.Fatalf("abuse limit: %s %s", resp.Status, body)
	}
	d.SetFault(Offline)
	before := len(d.Requests())
	for _, u := range urls {
		resp, err := http.Get(u)
		if err == nil {
			resp.Body.Close()
			t.Fatalf("%s answered %s while offline", u, resp.Status)
		}
		var ue *url.Error
		if !errors.As(err, &ue) {
			t.Fatalf("%s: %v", u, err)
		}
	}
	if n := len(d.Requests()) - before; n < len(urls) {
		t.Fatalf("%d requests recorded while offline, want at least %d", n, len(urls))
	}
	d.SetFault(nil)
	if resp, _ := do(t, http.MethodGet, urls[0]); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("back online: %s, want the 401 challenge", resp.Status)
	}
}

// TestSeedContent: fakes seeded alike make the same images (every digest
// of the fixture and of a release); another seed, or none, makes others.
func TestSeedContent(t *testing.T) {
	t.Parallel()
	digests := func(seed int64) []digest.Digest {
		u := New(Options{})
		t.Cleanup(u.Close)
		if seed != 0 {
			u.SeedContent(seed)
		}
		f, err := u.Populate(4 << 10)
		if err != nil {
			t.Fatal(err)
		}
		rel, err := u.AddRelease(PytorchRepo, "24.05-py3", 4<<10)
		if err != nil {
			t.Fatal(err)
		}
		var out []digest.Digest
		for _, im := range []*Image{f.Pytorch, f.CUDA, f.DCGM, f.Private, rel} {
			out = append(out, im.Manifest.Digest)
			for _, b := range im.Blobs() {
				out = append(out, b.Digest)
			}
		}
		return out
	}
	a, b := digests(7), digests(7)
	if !slices.Equal(a, b) {
		t.Fatalf("seed 7 twice made different content:\n%v\n%v", a, b)
	}
	if c := digests(8); slices.Equal(a, c) || c[1] == a[1] {
		t.Fatal("seeds 7 and 8 made the same content")
	}
	if r := digests(0); r[1] == a[1] {
		t.Fatal("an unseeded fake made the seeded content")
	}
}
