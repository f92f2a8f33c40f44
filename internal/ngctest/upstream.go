// Package ngctest is a faithful imitation of nvcr.io for tests: a registry
// with NGC's token realm ("$oauthtoken" and API keys, anonymous tokens for
// public repositories, a private org), token expiry with the realm switch,
// blob GETs redirected to a second "CDN" listener that rejects any
// Authorization header and checks a signed, expiring URL, request counters
// and fault injection. It serves real images (valid tar+gzip layers, configs
// whose diff_ids match) in Docker and OCI forms.
//
// See shared/ngc-upstream-notes.md for the behaviour it imitates.
package ngctest

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	mrand "math/rand"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
)

// APIKey is the NGC API key the fixture accepts ("nvapi-" personal key form).
const APIKey = "nvapi-ngctest-0123456789abcdef"

// Options tune the fake. Zero values imitate nvcr.io's usual answers.
type Options struct {
	// TokenTTL is the token lifetime (default 600 s, as observed).
	TokenTTL time.Duration
	// OmitExpiresIn leaves expires_in out of token responses.
	OmitExpiresIn bool
	// AccessTokenField answers {"access_token": …} instead of {"token": …}.
	AccessTokenField bool
	// TokenContentType overrides the token response Content-Type (an old
	// nvcr.io sent JSON as text/html).
	TokenContentType string
	// RealmQuery is appended to the realm URL in challenges ("a=b"), as
	// realms with their own query string once did.
	RealmQuery string
}

// Request is one request the fake received.
type Request struct {
	Host   string // "registry", "cdn", or (Docker Hub) "auth"
	Method string
	Path   string
	Query  string // the raw query (?ns= must never reach an upstream)
	Auth   string // the Authorization header's scheme, or ""
	Range  string
}

// Upstream is a running fake nvcr.io. Close it when done.
type Upstream struct {
	Registry *httptest.Server
	CDN      *httptest.Server
	opts     Options
	secret   []byte
	// gate is the authentication (and, for Docker Hub, the rate limit) in
	// front of the registry API: NGC's realm unless a sibling fake set
	// another.
	gate gate
	// direct serves blob GETs from the registry listener itself instead of
	// redirecting them to the CDN.
	direct bool

	mu        sync.Mutex
	repos     map[string]*repo
	manifests map[digest.Digest]Content
	blobs     map[digest.Digest]Content
	tokens    map[string]tokenInfo
	requests  []Request
	fault     func(w http.ResponseWriter, r *http.Request) bool

	// layerSrc, when set (SeedContent), makes the layers Populate and
	// AddRelease build; nil: crypto-random ones. Guarded by layerMu.
	layerMu  sync.Mutex
	layerSrc mrand.Source
}

type repo struct {
	private bool
	tags    map[string]digest.Digest
	// holds is the content published in this repository: like a real
	// registry, the fake serves a manifest or blob by digest only under a
	// repository that holds it.
	holds map[digest.Digest]bool
}

func newRepo() *repo {
	return &repo{tags: map[string]digest.Digest{}, holds: map[digest.Digest]bool{}}
}

type tokenInfo struct {
	repos   map[string]bool
	expires time.Time
	// service is the audience the token was issued for (Docker Hub's
	// service parameter; "" on NGC, whose realm has none).
	service string
	// anonymous marks a token issued without credentials.
	anonymous bool
}

// gate is what stands in front of the registry API of a fake: its own
// endpoints on the registry host, and the admission of each API request.
type gate interface {
	// serveOwn answers requests for endpoints of the gate's own on the
	// registry listener (NGC's token realm) and reports whether it did.
	serveOwn(w http.ResponseWriter, r *http.Request) bool
	// admit decides an API request for repository name ("" for /v2/): it
	// either answers it (401, 429...) and returns false, or returns true
	// (possibly after setting response headers) to let the fake serve it.
	admit(w http.ResponseWriter, r *http.Request, name string) bool
}

// New starts a fake with no content. Add content with AddImage.
func New(opts Options) *Upstream {
	if opts.TokenTTL <= 0 {
		opts.TokenTTL = 600 * time.Second
	}
	u := &Upstream{
		opts:      opts,
		secret:    randomBytes(16),
		repos:     map[string]*repo{},
		manifests: map[digest.Digest]Content{},
		blobs:     map[digest.Digest]Content{},
		tokens:    map[string]tokenInfo{},
	}
	u.gate = ngcGate{u}
	u.start()
	return u
}

// newBare returns a fake without listeners or gate, for the sibling fakes
// (Docker Hub, plain registry) to finish and start.
func newBare(tokenTTL time.Duration) *Upstream {
	return &Upstream{
		opts:      Options{TokenTTL: tokenTTL},
		secret:    randomBytes(16),
		repos:     map[string]*repo{},
		manifests: map[digest.Digest]Content{},
		blobs:     map[digest.Digest]Content{},
		tokens:    map[string]tokenInfo{},
	}
}

func (u *Upstream) start() {
	u.Registry = httptest.NewServer(http.HandlerFunc(u.serveRegistry))
	u.CDN = httptest.NewServer(http.HandlerFunc(u.serveCDN))
}

// Close stops both listeners.
func (u *Upstream) Close() {
	u.Registry.CloseClientConnections()
	u.CDN.CloseClientConnections()
	u.Registry.Close()
	u.CDN.Close()
}

// URL is the registry's base URL (http://127.0.0.1:PORT).
func (u *Upstream) URL() string { return u.Registry.URL }

// Host is the registry's host:port.
func (u *Upstream) Host() string { return strings.TrimPrefix(u.Registry.URL, "http://") }

// AddImage publishes im (and its children and blobs) as repository:tags.
// private repositories need the API key.
func (u *Upstream) AddImage(repository string, private bool, im *Image, tags ...string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	r := u.repos[repository]
	if r == nil {
		r = newRepo()
		u.repos[repository] = r
	}
	r.private = private
	var add func(*Image)
	add = func(im *Image) {
		u.manifests[im.Manifest.Digest] = im.Manifest
		r.holds[im.Manifest.Digest] = true
		if im.Config.Digest != "" {
			u.blobs[im.Config.Digest] = im.Config
			r.holds[im.Config.Digest] = true
		}
		for _, l := range im.Layers {
			u.blobs[l.Digest] = l
			r.holds[l.Digest] = true
		}
		for _, c := range im.Children {
			add(c)
		}
	}
	add(im)
	for _, t := range tags {
		r.tags[t] = im.Manifest.Digest
	}
}

// AddTag points repository:tag at a manifest already added.
func (u *Upstream) AddTag(repository, tag string, dgst digest.Digest) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.repos[repository].tags[tag] = dgst
}

// SetFault installs a hook that sees every request to either listener first
// (r.Host tells which: compare with Registry.URL / CDN.URL, or use IsCDN);
// when it returns true it has answered and the fake does nothing more. nil
// removes it.
func (u *Upstream) SetFault(f func(w http.ResponseWriter, r *http.Request) bool) {
	u.mu.Lock()
	u.fault = f
	u.mu.Unlock()
}

// CaptivePortalPage is the body CaptivePortal answers with.
const CaptivePortalPage = "<!DOCTYPE html><html><head><title>Network login</title></head><body><form action=\"/login\">Accept the terms of use to continue</form></body></html>\n"

// CaptivePortal is a fault for SetFault that answers every request, on the
// registry and the CDN alike, with 200 and an HTML login page and no
// registry headers, as a captive portal or a misconfigured proxy on the
// uplink does (the "upstream that is not a registry").
func CaptivePortal(w http.ResponseWriter, r *http.Request) bool {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(CaptivePortalPage)))
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		_, _ = w.Write([]byte(CaptivePortalPage))
	}
	return true
}

// IsCDN reports whether r arrived at the CDN listener.
func (u *Upstream) IsCDN(r *http.Request) bool { return "http://"+r.Host == u.CDN.URL }

// Requests returns a copy of every request received so far.
func (u *Upstream) Requests() []Request {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]Request(nil), u.requests...)
}

// CDNRequests returns a copy of the requests the CDN listener received.
func (u *Upstream) CDNRequests() []Request {
	var out []Request
	for _, r := range u.Requests() {
		if r.Host == "cdn" {
			out = append(out, r)
		}
	}
	return out
}

// CDNRanges returns the Range header of each CDN request ("" for none).
func (u *Upstream) CDNRanges() []string {
	var out []string
	for _, r := range u.CDNRequests() {
		out = append(out, r.Range)
	}
	return out
}

// Count returns how many requests matched host ("registry", "cdn"), method
// and path (exact).
func (u *Upstream) Count(host, method, path string) int {
	n := 0
	for _, r := range u.Requests() {
		if r.Host == host && r.Method == method && r.Path == path {
			n++
		}
	}
	return n
}

// BlobFetches returns how many times the CDN served (started sending) blob
// d; for a fake that serves blobs itself (NewPlain without a redirect), how
// many GETs of d its registry listener received.
func (u *Upstream) BlobFetches(d digest.Digest) int {
	if !u.direct {
		return u.Count("cdn", http.MethodGet, "/blobs/"+d.String())
	}
	n := 0
	for _, r := range u.Requests() {
		if r.Host == "registry" && r.Method == http.MethodGet && strings.HasSuffix(r.Path, "/blobs/"+d.String()) {
			n++
		}
	}
	return n
}

// ExpireTokens makes every issued token expire now.
func (u *Upstream) ExpireTokens() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for k, t := range u.tokens {
		t.expires = time.Now().Add(-time.Second)
		u.tokens[k] = t
	}
}

func (u *Upstream) record(host string, r *http.Request) func(http.ResponseWriter, *http.Request) bool {
	scheme, _, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	u.mu.Lock()
	defer u.mu.Unlock()
	u.requests = append(u.requests, Request{Host: host, Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, Auth: scheme, Range: r.Header.Get("Range")})
	return u.fault
}

func (u *Upstream) realm() string {
	realm := u.Registry.URL + "/proxy_auth"
	if u.opts.RealmQuery != "" {
		realm += "?" + u.opts.RealmQuery
	}
	return realm
}

func writeErr(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"errors": []map[string]string{{"code": code, "message": msg}}})
}

func (u *Upstream) serveRegistry(w http.ResponseWriter, r *http.Request) {
	if f := u.record("registry", r); f != nil && f(w, r) {
		return
	}
	if u.gate.serveOwn(w, r) {
		return
	}
	if r.URL.Path == "/v2/" || r.URL.Path == "/v2" {
		if !u.gate.admit(w, r, "") {
			return
		}
		w.Header().Set("Docker-Distribution-Api-Version", "registry/2.0")
		_, _ = w.Write([]byte("{}"))
		return
	}
	rest, ok := strings.CutPrefix(r.URL.Path, "/v2/")
	if !ok {
		http.NotFound(w, r)
		return
	}
	var name, verb, ref string
	if n, ok := strings.CutSuffix(rest, "/tags/list"); ok {
		name, verb = n, "tags"
	} else if i := strings.LastIndex(rest, "/manifests/"); i > 0 {
		name, verb, ref = rest[:i], "manifests", rest[i+len("/manifests/"):]
	} else if i := strings.LastIndex(rest, "/blobs/"); i > 0 {
		name, verb, ref = rest[:i], "blobs", rest[i+len("/blobs/"):]
	} else {
		writeErr(w, http.StatusNotFound, "NAME_UNKNOWN", "unknown")
		return
	}
	if !u.gate.admit(w, r, name) {
		return
	}
	u.mu.Lock()
	rp := u.repos[name]
	u.mu.Unlock()
	if rp == nil {
		writeErr(w, http.StatusNotFound, "NAME_UNKNOWN", "repository not found")
		return
	}
	switch verb {
	case "tags":
		u.serveTags(w, r, name, rp)
	case "manifests":
		u.serveManifest(w, r, rp, ref)
	case "blobs":
		u.serveBlob(w, r, rp, ref)
	}
}

// ngcGate is nvcr.io's authentication: the /proxy_auth realm on the
// registry host, a challenge without service, and after expiry a challenge
// naming another realm that refuses everyone.
type ngcGate struct{ u *Upstream }

func (g ngcGate) serveOwn(w http.ResponseWriter, r *http.Request) bool {
	switch r.URL.Path {
	case "/proxy_auth":
		g.u.serveToken(w, r)
		return true
	case "/authn/token":
		// The realm named after a token expired: it refuses anonymous and
		// API-key callers alike.
		writeErr(w, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required")
		return true
	}
	return false
}

func (g ngcGate) admit(w http.ResponseWriter, r *http.Request, name string) bool {
	u := g.u
	expired, ok := u.checkToken(r, name)
	if ok {
		return true
	}
	switch {
	case name == "":
		w.Header().Set("Www-Authenticate", fmt.Sprintf(`Bearer realm="%s",scope=""`, u.realm()))
	case expired:
		w.Header().Set("Www-Authenticate", fmt.Sprintf(`Bearer realm="%s/authn/token",service="registry",error="invalid_token"`, u.Registry.URL))
	default:
		w.Header().Set("Www-Authenticate", fmt.Sprintf(`Bearer realm="%s",scope="repository:%s:pull"`, u.realm(), name))
	}
	writeErr(w, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required")
	return false
}

// checkToken validates the Bearer token for access to repository name ("" for
// /v2/). expired reports a token that was valid but has expired.
func (u *Upstream) checkToken(r *http.Request, name string) (expired, ok bool) {
	tok, found := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !found {
		return false, false
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	ti, known := u.tokens[tok]
	if !known {
		return false, false
	}
	if time.Now().After(ti.expires) {
		return true, false
	}
	return false, name == "" || ti.repos[name]
}

func (u *Upstream) serveToken(w http.ResponseWriter, r *http.Request) {
	if u.opts.RealmQuery != "" {
		k, v, _ := strings.Cut(u.opts.RealmQuery, "=")
		if r.URL.Query().Get(k) != v {
			writeErr(w, http.StatusBadRequest, "BAD_REQUEST", "realm query parameter lost")
			return
		}
	}
	authed := false
	if h := r.Header.Get("Authorization"); h != "" {
		raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(h, "Basic "))
		if !strings.HasPrefix(h, "Basic ") || err != nil || string(raw) != "$oauthtoken:"+APIKey {
			writeErr(w, http.StatusUnauthorized, "UNAUTHORIZED", "invalid credentials")
			return
		}
		authed = true
	}
	ti := tokenInfo{repos: map[string]bool{}, expires: time.Now().Add(u.opts.TokenTTL)}
	for _, scope := range r.URL.Query()["scope"] {
		parts := strings.Split(scope, ":")
		if len(parts) != 3 || parts[0] != "repository" {
			continue
		}
		u.mu.Lock()
		rp := u.repos[parts[1]]
		u.mu.Unlock()
		// Anonymous tokens are issued but grant nothing on private repos.
		if rp == nil || !rp.private || authed {
			ti.repos[parts[1]] = true
		}
	}
	tok := hex.EncodeToString(randomBytes(16))
	u.mu.Lock()
	u.tokens[tok] = ti
	u.mu.Unlock()
	body := map[string]any{}
	if u.opts.AccessTokenField {
		body["access_token"] = tok
	} else {
		body["token"] = tok
	}
	if !u.opts.OmitExpiresIn {
		body["expires_in"] = int(u.opts.TokenTTL / time.Second)
	}
	ct := "application/json"
	if u.opts.TokenContentType != "" {
		ct = u.opts.TokenContentType
	}
	w.Header().Set("Content-Type", ct)
	_ = json.NewEncoder(w).Encode(body)
}

// TagPageSize is the most tags one tag list page holds: nvcr.io answers
// 100 at most, with a Link rel="next" to the rest, whatever n asks.
const TagPageSize = 100

func (u *Upstream) serveTags(w http.ResponseWriter, r *http.Request, name string, rp *repo) {
	u.mu.Lock()
	tags := make([]string, 0, len(rp.tags))
	for t := range rp.tags {
		tags = append(tags, t)
	}
	u.mu.Unlock()
	sort.Strings(tags)
	if last := r.URL.Query().Get("last"); last != "" {
		i := sort.SearchStrings(tags, last)
		if i < len(tags) && tags[i] == last {
			i++
		}
		tags = tags[i:]
	}
	// Like nvcr.io: pages of at most TagPageSize, whatever n asks for more.
	n := TagPageSize
	if v, err := strconv.Atoi(r.URL.Query().Get("n")); err == nil && v >= 0 && v < n {
		n = v
	}
	if n < len(tags) {
		tags = tags[:n]
		w.Header().Set("Link", fmt.Sprintf(`<%s/v2/%s/tags/list?n=%d&last=%s>; rel="next"`, u.Registry.URL, name, n, url.QueryEscape(tags[len(tags)-1])))
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"name": name, "tags": tags})
}

func (u *Upstream) serveManifest(w http.ResponseWriter, r *http.Request, rp *repo, ref string) {
	u.mu.Lock()
	d, isTag := rp.tags[ref]
	if !isTag {
		d = digest.Digest(ref)
	}
	m, ok := u.manifests[d]
	ok = ok && rp.holds[d]
	u.mu.Unlock()
	if !ok {
		writeErr(w, http.StatusNotFound, "MANIFEST_UNKNOWN", "manifest unknown")
		return
	}
	w.Header().Set("Content-Type", m.MediaType)
	w.Header().Set("Content-Length", strconv.Itoa(len(m.Body)))
	w.Header().Set("Docker-Content-Digest", m.Digest.String())
	if r.Method == http.MethodHead {
		return
	}
	_, _ = w.Write(m.Body)
}

func (u *Upstream) serveBlob(w http.ResponseWriter, r *http.Request, rp *repo, ref string) {
	u.mu.Lock()
	b, ok := u.blobs[digest.Digest(ref)]
	ok = ok && rp.holds[digest.Digest(ref)]
	u.mu.Unlock()
	if !ok {
		writeErr(w, http.StatusNotFound, "BLOB_UNKNOWN", "blob unknown")
		return
	}
	if r.Method == http.MethodHead {
		w.Header().Set("Content-Length", strconv.Itoa(len(b.Body)))
		w.Header().Set("Docker-Content-Digest", b.Digest.String())
		w.Header().Set("Content-Type", "application/octet-stream")
		return
	}
	if u.direct {
		// As registry:2 on a filesystem: the bytes come from the registry
		// itself, Range honoured.
		w.Header().Set("Docker-Content-Digest", b.Digest.String())
		w.Header().Set("Content-Type", "application/octet-stream")
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(b.Body))
		return
	}
	http.Redirect(w, r, u.SignedURL(b.Digest, time.Now().Add(10*time.Minute)), http.StatusTemporaryRedirect)
}

// SignedURL returns a CDN URL for blob d that expires at exp.
func (u *Upstream) SignedURL(d digest.Digest, exp time.Time) string {
	e := strconv.FormatInt(exp.Unix(), 10)
	return fmt.Sprintf("%s/blobs/%s?Expires=%s&Signature=%s", u.CDN.URL, d, e, u.sign(d, e))
}

func (u *Upstream) sign(d digest.Digest, exp string) string {
	m := hmac.New(sha256.New, u.secret)
	m.Write([]byte(d.String() + "|" + exp))
	return hex.EncodeToString(m.Sum(nil))
}

// serveCDN imitates an S3-style CDN: a request carrying Authorization is
// refused (two auth mechanisms), the signature and expiry are checked, and
// Range requests are honoured.
func (u *Upstream) serveCDN(w http.ResponseWriter, r *http.Request) {
	if f := u.record("cdn", r); f != nil && f(w, r) {
		return
	}
	if r.Header.Get("Authorization") != "" {
		w.Header().Set("Content-Type", "application/xml")
		w.WriteHeader(http.StatusBadRequest)
		_, _ = w.Write([]byte(`<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>`))
		return
	}
	ref, ok := strings.CutPrefix(r.URL.Path, "/blobs/")
	exp := r.URL.Query().Get("Expires")
	if !ok || !hmac.Equal([]byte(r.URL.Query().Get("Signature")), []byte(u.sign(digest.Digest(ref), exp))) {
		http.Error(w, "SignatureDoesNotMatch", http.StatusForbidden)
		return
	}
	if e, err := strconv.ParseInt(exp, 10, 64); err != nil || time.Now().Unix() > e {
		http.Error(w, "AccessDenied: Request has expired", http.StatusForbidden)
		return
	}
	u.mu.Lock()
	b, found := u.blobs[digest.Digest(ref)]
	u.mu.Unlock()
	if !found {
		http.Error(w, "NoSuchKey", http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "binary/octet-stream")
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(b.Body))
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// Tokens returns every token the realm issued (for tests that check that
// none leaks into logs).
func (u *Upstream) Tokens() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := make([]string, 0, len(u.tokens))
	for t := range u.tokens {
		out = append(out, t)
	}
	return out
}
