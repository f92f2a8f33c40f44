package ngctest

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"time"
)

// Docker Hub's names and the credentials the Docker-Hub-like fake accepts.
const (
	// DockerHubService is the service parameter of Docker Hub's challenge
	// and the audience of its tokens.
	DockerHubService = "registry.docker.io"
	// DockerHubUser and DockerHubPassword log in (a Docker Hub user name
	// and a personal access token).
	DockerHubUser     = "ngctest"
	DockerHubPassword = "dckr_pat_ngctest-0123456789abcdef"
	// RateLimitWindow is the window Docker Hub names in its RateLimit-*
	// headers (";w=21600": 6 hours, in seconds).
	RateLimitWindow = 21600
)

// DockerHubOptions tune the Docker-Hub-like fake. Zero values imitate
// Docker Hub for an IP without a pull limit.
type DockerHubOptions struct {
	// TokenTTL is the token lifetime (default 300 s, auth.docker.io's
	// expires_in).
	TokenTTL time.Duration
	// AnonymousPullLimit is how many manifest GETs with anonymous tokens
	// are answered before every further one gets 429 TOOMANYREQUESTS
	// (Docker Hub counts manifest GETs; HEADs and blobs are free). 0 means
	// no limit and no RateLimit-* headers, as Docker Hub answers an
	// unlimited IP.
	AnonymousPullLimit int
	// RetryAfter, when positive, adds Retry-After (whole seconds) to the
	// pull-limit 429. Docker Hub's documentation of the pull limit names
	// no Retry-After (only its overall abuse limit sends one: see
	// DockerHubAbuseLimit), so none is sent by default.
	RetryAfter time.Duration
}

// DockerHub is a running Docker-Hub-like fake: a registry listener (as
// registry-1.docker.io), a separate token realm (as auth.docker.io, whose
// challenge names service="registry.docker.io"), official images under
// library/ only (a single-component name does not exist upstream, as on
// Docker Hub, where clients add library/), anonymous tokens, an anonymous
// pull rate limit with RateLimit-* headers, and blob GETs redirected to a
// CDN listener that rejects any Authorization header (Docker Hub's
// Cloudflare/S3 presigned URLs). Requests to the realm are recorded with
// Host "auth"; SetFault sees them too. Close it when done.
type DockerHub struct {
	*Upstream
	// Auth is the token realm's listener; the realm names it as
	// localhost:PORT (see Realm).
	Auth *httptest.Server
	hub  *hubGate
}

// hubGate is Docker Hub's authentication and pull rate limit. Its state
// is guarded by the fake's mutex.
type hubGate struct {
	u          *Upstream
	realm      string
	retryAfter time.Duration
	limit      int // anonymous manifest GETs allowed; 0: unlimited
	pulls      int // anonymous manifest GETs counted
}

// NewDockerHub starts a Docker-Hub-like fake with no content. Add content
// with Populate or AddImage (repositories named as upstream:
// "library/ubuntu", never "ubuntu").
func NewDockerHub(opts DockerHubOptions) *DockerHub {
	if opts.TokenTTL <= 0 {
		opts.TokenTTL = 300 * time.Second
	}
	u := newBare(opts.TokenTTL)
	g := &hubGate{u: u, retryAfter: opts.RetryAfter, limit: opts.AnonymousPullLimit}
	u.gate = g
	d := &DockerHub{Upstream: u, hub: g}
	d.Auth = httptest.NewServer(http.HandlerFunc(d.serveAuth))
	// A host name, like auth.docker.io: clients built on ggcr (crane)
	// refuse a realm that is a private IP literal on another host:port
	// than the registry's (an SSRF guard), so 127.0.0.1 would not do.
	_, port, _ := net.SplitHostPort(d.Auth.Listener.Addr().String())
	g.realm = "http://localhost:" + port + "/token"
	u.start()
	return d
}

// Close stops the three listeners.
func (d *DockerHub) Close() {
	d.Auth.CloseClientConnections()
	d.Auth.Close()
	d.Upstream.Close()
}

// Realm is the token realm's URL (http://localhost:PORT/token: the realm
// listener under a host name).
func (d *DockerHub) Realm() string { return d.hub.realm }

// IsAuth reports whether r arrived at the token realm's listener.
func (d *DockerHub) IsAuth(r *http.Request) bool {
	_, port, _ := net.SplitHostPort(d.Auth.Listener.Addr().String())
	_, rport, _ := net.SplitHostPort(r.Host)
	return rport == port
}

// SetPullLimit sets the anonymous pull limit (0: none) and starts counting
// afresh.
func (d *DockerHub) SetPullLimit(n int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.hub.limit, d.hub.pulls = n, 0
}

// Pulls returns how many manifest GETs with anonymous tokens were counted
// against the limit (those answered 429 included).
func (d *DockerHub) Pulls() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.hub.pulls
}

func (d *DockerHub) serveAuth(w http.ResponseWriter, r *http.Request) {
	if f := d.record("auth", r); f != nil && f(w, r) {
		return
	}
	if r.URL.Path != "/token" {
		http.NotFound(w, r)
		return
	}
	d.hub.serveToken(w, r)
}

func (g *hubGate) serveOwn(http.ResponseWriter, *http.Request) bool { return false }

// serveToken imitates auth.docker.io/token: GET with optional Basic
// credentials (the Docker Registry token protocol), or POST with a form
// (grant_type=password, the OAuth2 form containerd tries first). The token
// grants pull on each scope's repository that exists and is public, or
// private and the credentials are right; other scopes are dropped silently
// (the registry then answers 401 insufficient_scope, which is how Docker
// Hub answers for a repository that does not exist).
func (g *hubGate) serveToken(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		hubAuthError(w, http.StatusBadRequest, "malformed request")
		return
	}
	var user, pass string
	var hasCreds bool
	switch r.Method {
	case http.MethodGet:
		if h := r.Header.Get("Authorization"); h != "" {
			raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(h, "Basic "))
			u, p, ok := strings.Cut(string(raw), ":")
			if !strings.HasPrefix(h, "Basic ") || err != nil || !ok {
				hubAuthError(w, http.StatusUnauthorized, "malformed credentials")
				return
			}
			user, pass, hasCreds = u, p, true
		}
	case http.MethodPost:
		if gt := r.PostForm.Get("grant_type"); gt != "password" {
			hubAuthError(w, http.StatusBadRequest, "unsupported grant_type")
			return
		}
		user, pass, hasCreds = r.PostForm.Get("username"), r.PostForm.Get("password"), true
	default:
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	if hasCreds && (user != DockerHubUser || pass != DockerHubPassword) {
		hubAuthError(w, http.StatusUnauthorized, "incorrect username or password")
		return
	}
	ti := tokenInfo{
		repos:     map[string]bool{},
		expires:   time.Now().Add(g.u.opts.TokenTTL),
		service:   r.Form.Get("service"),
		anonymous: !hasCreds,
	}
	g.u.mu.Lock()
	for _, scope := range r.Form["scope"] {
		// Several scopes may also come space-separated in one parameter.
		for _, sc := range strings.Fields(scope) {
			parts := strings.Split(sc, ":")
			if len(parts) != 3 || parts[0] != "repository" || !strings.Contains(","+parts[2]+",", ",pull,") {
				continue
			}
			if rp := g.u.repos[parts[1]]; rp != nil && (!rp.private || hasCreds) {
				ti.repos[parts[1]] = true
			}
		}
	}
	tok := hex.EncodeToString(randomBytes(16))
	g.u.tokens[tok] = ti
	g.u.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"token":        tok,
		"access_token": tok,
		"expires_in":   int(g.u.opts.TokenTTL / time.Second),
		"issued_at":    time.Now().UTC().Format(time.RFC3339),
	})
}

// hubAuthError answers as auth.docker.io does: {"details": "..."}.
func hubAuthError(w http.ResponseWriter, status int, details string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"details": details})
}

func (g *hubGate) admit(w http.ResponseWriter, r *http.Request, name string) bool {
	u := g.u
	tok, bearer := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	u.mu.Lock()
	ti, known := u.tokens[tok]
	u.mu.Unlock()
	valid := bearer && known && ti.service == DockerHubService && time.Now().Before(ti.expires)
	switch {
	case !valid || (name != "" && !ti.repos[name]):
		challenge := fmt.Sprintf(`Bearer realm="%s",service="%s"`, g.realm, DockerHubService)
		if name != "" {
			challenge += fmt.Sprintf(`,scope="repository:%s:pull"`, name)
		}
		if bearer && !valid {
			challenge += `,error="invalid_token"`
		} else if valid {
			challenge += `,error="insufficient_scope"`
		}
		w.Header().Set("Www-Authenticate", challenge)
		writeErr(w, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required")
		return false
	case name == "" || !ti.anonymous || !strings.Contains(r.URL.Path, "/manifests/"):
		return true
	}
	u.mu.Lock()
	limit := g.limit
	if limit > 0 && r.Method == http.MethodGet {
		g.pulls++
	}
	pulls := g.pulls
	u.mu.Unlock()
	if limit <= 0 {
		return true
	}
	remaining := max(limit-pulls, 0)
	host, _, _ := net.SplitHostPort(r.RemoteAddr)
	w.Header().Set("RateLimit-Limit", fmt.Sprintf("%d;w=%d", limit, RateLimitWindow))
	w.Header().Set("RateLimit-Remaining", fmt.Sprintf("%d;w=%d", remaining, RateLimitWindow))
	w.Header().Set("Docker-RateLimit-Source", host)
	if r.Method == http.MethodGet && pulls > limit {
		if g.retryAfter > 0 {
			w.Header().Set("Retry-After", strconv.Itoa(int(g.retryAfter/time.Second)))
		}
		writeErr(w, http.StatusTooManyRequests, "TOOMANYREQUESTS",
			"You have reached your unauthenticated pull rate limit (ngctest Docker-Hub-like upstream); authenticate to pull further")
		return false
	}
	return true
}

// Official images, a user's repository and a private one of the
// Docker-Hub-like fixture, named as upstream.
const (
	HubUbuntuRepo  = "library/ubuntu"
	HubUbuntuTag   = "24.04"
	HubBusyboxRepo = "library/busybox"
	HubBusyboxTag  = "1.36"
	HubToolRepo    = "ngctestorg/tool"
	HubToolTag     = "1.0"
	HubPrivateRepo = DockerHubUser + "/private"
	HubPrivateTag  = "1.0"
)

// DockerHubFixture is the standard content of the Docker-Hub-like fake.
type DockerHubFixture struct {
	// Ubuntu is library/ubuntu:24.04 (also "latest"), an OCI image index
	// of OCI manifests for linux/amd64 and linux/arm64.
	Ubuntu *Image
	// Busybox is library/busybox:1.36, a single Docker schema2 image.
	Busybox *Image
	// Tool is ngctestorg/tool:1.0, a user's (two-component) repository.
	Tool *Image
	// Private is ngctest/private:1.0, which needs DockerHubUser's
	// credentials.
	Private *Image
}

// Populate builds the standard Docker Hub fixture (layers of about
// layerSize bytes each, uncompressed; none shared with the NGC fixture)
// and publishes it.
func (d *DockerHub) Populate(layerSize int64) (*DockerHubFixture, error) {
	var f DockerHubFixture
	amdO, err := d.buildRandom("linux/amd64", true, layerSize, 2)
	if err != nil {
		return nil, err
	}
	armO, err := d.buildRandom("linux/arm64", true, layerSize, 1)
	if err != nil {
		return nil, err
	}
	if f.Ubuntu, err = BuildIndex(true, amdO, armO); err != nil {
		return nil, err
	}
	if f.Busybox, err = d.buildRandom("linux/amd64", false, layerSize, 1); err != nil {
		return nil, err
	}
	if f.Tool, err = d.buildRandom("linux/amd64", false, layerSize, 2); err != nil {
		return nil, err
	}
	if f.Private, err = d.buildRandom("linux/amd64", false, layerSize, 1); err != nil {
		return nil, err
	}
	d.AddImage(HubUbuntuRepo, false, f.Ubuntu, HubUbuntuTag, "latest")
	d.AddImage(HubBusyboxRepo, false, f.Busybox, HubBusyboxTag)
	d.AddImage(HubToolRepo, false, f.Tool, HubToolTag)
	d.AddImage(HubPrivateRepo, true, f.Private, HubPrivateTag)
	return &f, nil
}
