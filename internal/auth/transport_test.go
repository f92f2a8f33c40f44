package auth

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
)

const testKey = "nvapi-TEST-secret-0123456789"

// fakeClock is a settable clock for Transport.now and the fake realm.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

type realmRequest struct {
	Query url.Values
	Authz string
}

type registryRequest struct {
	Path   string
	Authz  string
	Status int
}

// fakeOpts configure a fakeUpstream.
type fakeOpts struct {
	// challenge builds the registry's WWW-Authenticate value from the realm
	// URL. Default: nvcr.io's `Bearer realm="…",scope=""`.
	challenge func(realm string) string
	// realmQuery is appended to the realm URL ("a=b&c=d").
	realmQuery string
	// expiresIn is the token lifetime in seconds; 0 omits expires_in.
	expiresIn int64
	// issuedAt, when set, adds issued_at to token responses.
	issuedAt func() time.Time
	// realmDelay is slept by the realm before answering.
	realmDelay time.Duration
	// requireKey makes the realm refuse requests without $oauthtoken:testKey.
	requireKey bool
	// tls serves the registry over https (and the realm on the same server).
	tls bool
}

// fakeUpstream is a registry that wants bearer tokens and a token realm
// that issues "tok-1", "tok-2", ….
type fakeUpstream struct {
	registry *httptest.Server
	realm    *httptest.Server // nil when opts.tls (the realm is on registry)
	realmURL string

	mu          sync.Mutex
	opts        fakeOpts
	valid       map[string]bool
	issued      int
	realmReqs   []realmRequest
	regReqs     []registryRequest
	realmStatus int // when non-zero, the realm answers this status
	challengeFn func(realm string) string
}

func newFakeUpstream(t *testing.T, o fakeOpts) *fakeUpstream {
	t.Helper()
	f := &fakeUpstream{opts: o, valid: map[string]bool{}}
	if o.challenge == nil {
		o.challenge = func(realm string) string { return `Bearer realm="` + realm + `",scope=""` }
	}
	f.challengeFn = o.challenge
	mux := http.NewServeMux()
	mux.HandleFunc("/v2/", f.serveRegistry)
	mux.HandleFunc("/token", f.serveRealm)
	if o.tls {
		f.registry = httptest.NewTLSServer(mux)
		f.realmURL = f.registry.URL + "/token"
	} else {
		f.registry = httptest.NewServer(mux)
		rmux := http.NewServeMux()
		rmux.HandleFunc("/token", f.serveRealm)
		f.realm = httptest.NewServer(rmux)
		t.Cleanup(f.realm.Close)
		f.realmURL = f.realm.URL + "/token"
	}
	t.Cleanup(f.registry.Close)
	if o.realmQuery != "" {
		f.realmURL += "?" + o.realmQuery
	}
	return f
}

func (f *fakeUpstream) origin(t *testing.T) *url.URL {
	t.Helper()
	u, err := url.Parse(f.registry.URL)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// base is the RoundTripper to give the Transport (trusts the TLS cert).
func (f *fakeUpstream) base() http.RoundTripper { return f.registry.Client().Transport }

func (f *fakeUpstream) serveRegistry(w http.ResponseWriter, r *http.Request) {
	authz := r.Header.Get("Authorization")
	f.mu.Lock()
	tok, ok := strings.CutPrefix(authz, "Bearer ")
	good := ok && f.valid[tok]
	status := http.StatusOK
	if !good {
		status = http.StatusUnauthorized
	}
	body, _ := io.ReadAll(r.Body)
	f.regReqs = append(f.regReqs, registryRequest{Path: r.URL.Path, Authz: authz, Status: status})
	challenge := f.challengeFn(f.realmURL)
	f.mu.Unlock()
	if !good {
		w.Header().Set("WWW-Authenticate", challenge)
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED"}]}`)
		return
	}
	_, _ = fmt.Fprintf(w, "ok %s %d", r.URL.Path, len(body))
}

func (f *fakeUpstream) serveRealm(w http.ResponseWriter, r *http.Request) {
	if f.opts.realmDelay > 0 {
		time.Sleep(f.opts.realmDelay)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.realmReqs = append(f.realmReqs, realmRequest{Query: r.URL.Query(), Authz: r.Header.Get("Authorization")})
	if f.realmStatus != 0 {
		w.WriteHeader(f.realmStatus)
		return
	}
	if f.opts.requireKey {
		u, p, ok := r.BasicAuth()
		if !ok || u != DefaultUsername || p != testKey {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
	}
	f.issued++
	tok := fmt.Sprintf("tok-%d", f.issued)
	f.valid[tok] = true
	resp := map[string]any{"token": tok}
	if f.opts.expiresIn > 0 {
		resp["expires_in"] = f.opts.expiresIn
	}
	if f.opts.issuedAt != nil {
		resp["issued_at"] = f.opts.issuedAt().Format(time.RFC3339Nano)
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(resp)
}

func (f *fakeUpstream) realmHits() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.realmReqs)
}

func (f *fakeUpstream) realmRequests() []realmRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]realmRequest(nil), f.realmReqs...)
}

func (f *fakeUpstream) registryRequests() []registryRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]registryRequest(nil), f.regReqs...)
}

func (f *fakeUpstream) count401() int {
	n := 0
	for _, r := range f.registryRequests() {
		if r.Status == http.StatusUnauthorized {
			n++
		}
	}
	return n
}

func (f *fakeUpstream) revokeAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	clear(f.valid)
}

func (f *fakeUpstream) setRealmStatus(s int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.realmStatus = s
}

func (f *fakeUpstream) setChallenge(fn func(realm string) string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.challengeFn = fn
}

// get does a GET of path on the fake registry through tr and returns the
// status and body.
func get(t *testing.T, tr http.RoundTripper, rawURL string, hdr ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, rawURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatalf("GET %s: %v", rawURL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

func TestTransportOtherOriginNeverGetsAuthorization(t *testing.T) {
	t.Parallel()
	f := newFakeUpstream(t, fakeOpts{})

	var mu sync.Mutex
	var cdnSaw []string
	cdn := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		cdnSaw = append(cdnSaw, r.Header.Get("Authorization"))
		mu.Unlock()
		_, _ = io.WriteString(w, "blob bytes")
	}))
	t.Cleanup(cdn.Close)

	origin := f.origin(t)
	cdnURL, _ := url.Parse(cdn.URL)
	if cdnURL.Hostname() != origin.Hostname() || cdnURL.Port() == origin.Port() {
		t.Fatalf("test setup: want same host, different port: %s vs %s", cdn.URL, f.registry.URL)
	}
	tr := NewTransport(nil, origin, Credentials{Secret: testKey}, nil)

	// Learn a token for the registry first, so the transport has something
	// it could (wrongly) attach.
	if st, _ := get(t, tr, f.registry.URL+"/v2/nvidia/cuda/manifests/latest"); st != http.StatusOK {
		t.Fatalf("registry GET: status %d", st)
	}

	// A caller-set Authorization header is removed for another origin, and
	// the caller's request is left untouched.
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, cdn.URL+"/v2/nvidia/cuda/blobs/sha256:abc", nil)
	req.Header.Set("Authorization", "Bearer caller-set")
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if got := req.Header.Get("Authorization"); got != "Bearer caller-set" {
		t.Errorf("RoundTrip modified the caller's request header: %q", got)
	}

	// Through an http.Client following the registry's redirect: Go copies
	// the caller's Authorization to a same-hostname target, the transport
	// must still strip it.
	mux := http.NewServeMux()
	mux.HandleFunc("/v2/", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, cdn.URL+"/signed?sig=x", http.StatusTemporaryRedirect)
	})
	reg2 := httptest.NewServer(mux)
	t.Cleanup(reg2.Close)
	origin2, _ := url.Parse(reg2.URL)
	hc := &http.Client{Transport: NewTransport(nil, origin2, Credentials{Secret: testKey}, nil)}
	req2, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, reg2.URL+"/v2/nvidia/cuda/blobs/sha256:abc", nil)
	req2.Header.Set("Authorization", "Bearer caller-set")
	resp2, err := hc.Do(req2)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp2.Body)
	_ = resp2.Body.Close()
	if resp2.StatusCode != http.StatusOK || string(body) != "blob bytes" {
		t.Fatalf("redirected GET: %d %q", resp2.StatusCode, body)
	}

	mu.Lock()
	defer mu.Unlock()
	if len(cdnSaw) != 2 {
		t.Fatalf("CDN got %d requests, want 2", len(cdnSaw))
	}
	for i, a := range cdnSaw {
		if a != "" {
			t.Errorf("CDN request %d carried Authorization %q", i, a)
		}
	}
}

func TestTransportSameOriginReplacesCallerAuthorization(t *testing.T) {
	t.Parallel()
	f := newFakeUpstream(t, fakeOpts{})
	tr := NewTransport(nil, f.origin(t), Credentials{}, nil)
	st, _ := get(t, tr, f.registry.URL+"/v2/a/b/manifests/1", "Authorization", "Basic Y2FsbGVyOnNldA==")
	if st != http.StatusOK {
		t.Fatalf("status %d", st)
	}
	for _, r := range f.registryRequests() {
		if strings.HasPrefix(r.Authz, "Basic") {
			t.Errorf("registry received the caller's Authorization %q", r.Authz)
		}
	}
}

func TestTransportCachesTokensPerScope(t *testing.T) {
	t.Parallel()
	f := newFakeUpstream(t, fakeOpts{expiresIn: 600})
	tr := NewTransport(nil, f.origin(t), Credentials{}, nil)
	base := f.registry.URL

	steps := []struct {
		path      string
		wantHits  int
		wantScope string // scope of the latest realm request
	}{
		{"/v2/nvidia/cuda/manifests/12.4", 1, "repository:nvidia/cuda:pull"},
		{"/v2/nvidia/cuda/manifests/12.4", 1, "repository:nvidia/cuda:pull"},
		{"/v2/nvidia/cuda/blobs/sha256:0123", 1, "repository:nvidia/cuda:pull"},
		{"/v2/nvidia/cuda/tags/list", 1, "repository:nvidia/cuda:pull"},
		{"/v2/nvidia/pytorch/manifests/24.01-py3", 2, "repository:nvidia/pytorch:pull"},
		{"/v2/nvidia/cuda/manifests/latest", 2, "repository:nvidia/pytorch:pull"},
		{"/v2/nvidia/pytorch/manifests/24.01-py3", 2, "repository:nvidia/pytorch:pull"},
	}
	for i, s := range steps {
		st, body := get(t, tr, base+s.path)
		if st != http.StatusOK || !strings.HasPrefix(body, "ok "+s.path) {
			t.Fatalf("step %d GET %s: %d %q", i, s.path, st, body)
		}
		reqs := f.realmRequests()
		if len(reqs) != s.wantHits {
			t.Fatalf("step %d GET %s: realm hit %d times, want %d", i, s.path, len(reqs), s.wantHits)
		}
		if got := reqs[len(reqs)-1].Query.Get("scope"); got != s.wantScope {
			t.Fatalf("step %d: realm scope %q, want %q", i, got, s.wantScope)
		}
	}
	// Only the very first request was challenged: once the scheme is known,
	// a new scope's token is fetched before the request is sent.
	if n := f.count401(); n != 1 {
		t.Errorf("registry answered 401 %d times, want 1", n)
	}
}

func TestTransportConcurrentFirstRequestsShareOneExchange(t *testing.T) {
	t.Parallel()
	f := newFakeUpstream(t, fakeOpts{expiresIn: 600, realmDelay: 80 * time.Millisecond})
	tr := NewTransport(nil, f.origin(t), Credentials{Secret: testKey}, nil)

	const n = 16
	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet,
				fmt.Sprintf("%s/v2/nvidia/tritonserver/blobs/sha256:%04d", f.registry.URL, i), nil)
			resp, err := tr.RoundTrip(req)
			if err != nil {
				errs <- err
				return
			}
			_ = resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				errs <- fmt.Errorf("request %d: status %d", i, resp.StatusCode)
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if hits := f.realmHits(); hits != 1 {
		t.Fatalf("%d concurrent first requests for one scope made %d token exchanges, want 1", n, hits)
	}
}

func TestTransportSendsCredentialsToRealm(t *testing.T) {
	t.Parallel()
	t.Run("api key", func(t *testing.T) {
		t.Parallel()
		f := newFakeUpstream(t, fakeOpts{
			realmQuery: "client=ngc-mirror&v=2",
			requireKey: true,
			challenge: func(realm string) string {
				return `Bearer realm="` + realm + `",service="registry"`
			},
		})
		var logs bytes.Buffer
		log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
		// Username empty: NewTransport must default it to $oauthtoken.
		tr := NewTransport(nil, f.origin(t), Credentials{Secret: testKey}, log)
		st, _ := get(t, tr, f.registry.URL+"/v2/nvidia/cuda/manifests/12.4")
		if st != http.StatusOK {
			t.Fatalf("status %d", st)
		}
		reqs := f.realmRequests()
		if len(reqs) != 1 {
			t.Fatalf("realm hit %d times, want 1", len(reqs))
		}
		r := reqs[0]
		wantAuthz := "Basic " + base64.StdEncoding.EncodeToString([]byte("$oauthtoken:"+testKey))
		if r.Authz != wantAuthz {
			t.Errorf("realm Authorization = %q, want %q", r.Authz, wantAuthz)
		}
		want := url.Values{
			"client":  {"ngc-mirror"},
			"v":       {"2"},
			"scope":   {"repository:nvidia/cuda:pull"},
			"service": {"registry"},
			"account": {"$oauthtoken"},
		}
		if fmt.Sprint(r.Query) != fmt.Sprint(want) {
			t.Errorf("realm query = %v, want %v", r.Query, want)
		}
		// The registry itself only ever sees bearer tokens, never the key.
		for _, rr := range f.registryRequests() {
			if rr.Authz != "" && !strings.HasPrefix(rr.Authz, "Bearer tok-") {
				t.Errorf("registry received Authorization %q", rr.Authz)
			}
		}
		if strings.Contains(logs.String(), testKey) {
			t.Errorf("logs reveal the API key:\n%s", logs.String())
		}
	})
	t.Run("explicit username", func(t *testing.T) {
		t.Parallel()
		f := newFakeUpstream(t, fakeOpts{})
		tr := NewTransport(nil, f.origin(t), Credentials{Username: "robot", Secret: "pw"}, nil)
		if st, _ := get(t, tr, f.registry.URL+"/v2/org/team/img/manifests/1"); st != http.StatusOK {
			t.Fatalf("status %d", st)
		}
		r := f.realmRequests()[0]
		if want := "Basic " + base64.StdEncoding.EncodeToString([]byte("robot:pw")); r.Authz != want {
			t.Errorf("realm Authorization = %q, want %q", r.Authz, want)
		}
		if got := r.Query.Get("account"); got != "robot" {
			t.Errorf("account = %q, want robot", got)
		}
		if got := r.Query.Get("scope"); got != "repository:org/team/img:pull" {
			t.Errorf("scope = %q", got)
		}
	})
	t.Run("docker hub challenge", func(t *testing.T) {
		// registry-1.docker.io sends clients to auth.docker.io, another
		// host, with service=registry.docker.io and the scope in the
		// challenge: the service goes along, the credentials to the realm
		// only, and the official image's scope is library/NAME.
		t.Parallel()
		f := newFakeUpstream(t, fakeOpts{challenge: func(realm string) string {
			return `Bearer realm="` + realm + `",service="registry.docker.io",scope="repository:library/ubuntu:pull"`
		}})
		for _, creds := range []Credentials{{}, {Username: "labuser", Secret: "dckr_pat"}} {
			tr := NewTransport(nil, f.origin(t), creds, nil)
			if st, _ := get(t, tr, f.registry.URL+"/v2/library/ubuntu/manifests/24.04"); st != http.StatusOK {
				t.Fatalf("status %d", st)
			}
			reqs := f.realmRequests()
			r := reqs[len(reqs)-1]
			want := url.Values{"scope": {"repository:library/ubuntu:pull"}, "service": {"registry.docker.io"}}
			wantAuthz := ""
			if creds.Secret != "" {
				want.Set("account", "labuser")
				wantAuthz = "Basic " + base64.StdEncoding.EncodeToString([]byte("labuser:dckr_pat"))
			}
			if fmt.Sprint(r.Query) != fmt.Sprint(want) || r.Authz != wantAuthz {
				t.Errorf("realm request %v %q, want %v %q", r.Query, r.Authz, want, wantAuthz)
			}
		}
		for _, rr := range f.registryRequests() {
			if rr.Authz != "" && !strings.HasPrefix(rr.Authz, "Bearer tok-") {
				t.Errorf("registry received Authorization %q", rr.Authz)
			}
		}
	})
	t.Run("anonymous nvcr.io challenge", func(t *testing.T) {
		t.Parallel()
		f := newFakeUpstream(t, fakeOpts{}) // `Bearer realm="…",scope=""`
		tr := NewTransport(nil, f.origin(t), Credentials{}, nil)
		if st, _ := get(t, tr, f.registry.URL+"/v2/nvidia/cuda/manifests/12.4"); st != http.StatusOK {
			t.Fatalf("status %d", st)
		}
		r := f.realmRequests()[0]
		if r.Authz != "" {
			t.Errorf("anonymous realm request carried Authorization %q", r.Authz)
		}
		want := url.Values{"scope": {"repository:nvidia/cuda:pull"}}
		if fmt.Sprint(r.Query) != fmt.Sprint(want) {
			t.Errorf("realm query = %v, want %v (no service, no account)", r.Query, want)
		}
	})
}

func TestTransportRefreshesBeforeExpiry(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		expiresIn int64
		issuedAgo time.Duration // issued_at this long before the request; 0: none
		cachedAt  time.Duration // still served from cache at this age
		refreshAt time.Duration // refreshed (before expiry) at this age
	}{
		// Refresh with a fifth of the lifetime left: 300 s → at 240 s.
		{name: "expires_in", expiresIn: 300, cachedAt: 239 * time.Second, refreshAt: 241 * time.Second},
		// No expires_in: 60 s default → refresh at 48 s.
		{name: "default lifetime", cachedAt: 47 * time.Second, refreshAt: 49 * time.Second},
		// issued_at 100 s ago with a 300 s life: refresh at 240-100 = 140 s.
		{name: "issued_at in the past", expiresIn: 300, issuedAgo: 100 * time.Second, cachedAt: 139 * time.Second, refreshAt: 141 * time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			clock := newFakeClock()
			o := fakeOpts{expiresIn: tc.expiresIn}
			if tc.issuedAgo > 0 {
				o.issuedAt = func() time.Time { return clock.Now().Add(-tc.issuedAgo) }
			}
			f := newFakeUpstream(t, o)
			tr := NewTransport(nil, f.origin(t), Credentials{}, nil)
			tr.now = clock.Now
			u := f.registry.URL + "/v2/nvidia/cuda/manifests/12.4"

			if st, _ := get(t, tr, u); st != http.StatusOK || f.realmHits() != 1 {
				t.Fatalf("first GET: status %d, realm hits %d", st, f.realmHits())
			}
			clock.Advance(tc.cachedAt)
			if st, _ := get(t, tr, u); st != http.StatusOK || f.realmHits() != 1 {
				t.Fatalf("GET at %v: status %d, realm hits %d, want the cached token", tc.cachedAt, st, f.realmHits())
			}
			clock.Advance(tc.refreshAt - tc.cachedAt)
			if st, _ := get(t, tr, u); st != http.StatusOK || f.realmHits() != 2 {
				t.Fatalf("GET at %v: status %d, realm hits %d, want a refresh", tc.refreshAt, st, f.realmHits())
			}
			regs := f.registryRequests()
			if last := regs[len(regs)-1]; last.Authz != "Bearer tok-2" || last.Status != http.StatusOK {
				t.Errorf("last registry request: %+v, want the refreshed token", last)
			}
			if n := f.count401(); n != 1 {
				t.Errorf("registry answered 401 %d times, want 1 (refresh must be proactive)", n)
			}
		})
	}
}

func TestTransportRealmFailure(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	f := newFakeUpstream(t, fakeOpts{expiresIn: 300, realmQuery: "sig=realm-secret"})
	tr := NewTransport(nil, f.origin(t), Credentials{Secret: testKey}, nil)
	tr.now = clock.Now
	u := f.registry.URL + "/v2/nvidia/cuda/manifests/12.4"
	if st, _ := get(t, tr, u); st != http.StatusOK {
		t.Fatalf("status %d", st)
	}
	f.setRealmStatus(http.StatusServiceUnavailable)

	// Past the refresh point but before expiry: the refresh fails, the old
	// token is still used.
	clock.Advance(250 * time.Second)
	if st, _ := get(t, tr, u); st != http.StatusOK {
		t.Fatalf("GET with a failing realm and an unexpired token: status %d", st)
	}
	if hits := f.realmHits(); hits != 2 {
		t.Fatalf("realm hits %d, want 2 (a refresh attempt)", hits)
	}

	// Expired: the error surfaces, typed, without secrets.
	clock.Advance(60 * time.Second)
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, u, nil)
	resp, err := tr.RoundTrip(req)
	if err == nil {
		_ = resp.Body.Close()
		t.Fatalf("GET with an expired token and a failing realm succeeded: %d", resp.StatusCode)
	}
	if !errors.Is(err, ErrTokenExchange) {
		t.Errorf("error %v does not wrap ErrTokenExchange", err)
	}
	var te *TokenError
	if !errors.As(err, &te) || te.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("error %v is not a *TokenError with status 503", err)
	}
	msg := err.Error()
	for _, secret := range []string{testKey, "realm-secret", base64.StdEncoding.EncodeToString([]byte("$oauthtoken:" + testKey))} {
		if strings.Contains(msg, secret) {
			t.Errorf("error %q reveals %q", msg, secret)
		}
	}
}

func TestTransportKeepsOriginalRealmAfterExpiry(t *testing.T) {
	t.Parallel()
	f := newFakeUpstream(t, fakeOpts{expiresIn: 600})
	var mu sync.Mutex
	otherHits := 0
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		otherHits++
		mu.Unlock()
		w.WriteHeader(http.StatusUnauthorized) // authn.nvidia.com refuses
	}))
	t.Cleanup(other.Close)

	tr := NewTransport(nil, f.origin(t), Credentials{Secret: testKey}, nil)
	u := f.registry.URL + "/v2/nvidia/cuda/manifests/12.4"
	if st, _ := get(t, tr, u); st != http.StatusOK {
		t.Fatalf("status %d", st)
	}
	// The upstream now considers the token expired and points at another realm.
	f.revokeAll()
	f.setChallenge(func(string) string {
		return `Bearer realm="` + other.URL + `/token",service="registry",error="invalid_token"`
	})
	if st, _ := get(t, tr, u); st != http.StatusOK {
		t.Fatalf("GET after expiry: status %d", st)
	}
	mu.Lock()
	defer mu.Unlock()
	if otherHits != 0 {
		t.Errorf("the post-expiry realm was asked %d times, want 0", otherHits)
	}
	if hits := f.realmHits(); hits != 2 {
		t.Errorf("original realm hit %d times, want 2", hits)
	}
	regs := f.registryRequests()
	if last := regs[len(regs)-1]; last.Authz != "Bearer tok-2" {
		t.Errorf("retry used %q, want Bearer tok-2", last.Authz)
	}
}

func TestTransportReplaysBodyOnRetry(t *testing.T) {
	t.Parallel()
	f := newFakeUpstream(t, fakeOpts{})
	tr := NewTransport(nil, f.origin(t), Credentials{}, nil)
	u := f.registry.URL + "/v2/a/b/blobs/uploads/x"

	// http.NewRequest sets GetBody for a *bytes.Reader: replayable.
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, u, bytes.NewReader([]byte("12345")))
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.HasSuffix(string(body), " 5") {
		t.Fatalf("replayable POST: %d %q, want 200 with the 5-byte body resent", resp.StatusCode, body)
	}

	// A body that cannot be replayed: the 401 is returned as is. Use a new
	// scope... the scheme is known now, so use a fresh transport.
	tr2 := NewTransport(nil, f.origin(t), Credentials{}, nil)
	req2, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, u, io.NopCloser(strings.NewReader("12345")))
	resp2, err := tr2.RoundTrip(req2)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp2.Body.Close()
	if resp2.StatusCode != http.StatusUnauthorized {
		t.Fatalf("unreplayable POST: status %d, want 401", resp2.StatusCode)
	}
}

func TestTransportBasicScheme(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var saw []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		saw = append(saw, r.Header.Get("Authorization"))
		mu.Unlock()
		if u, p, ok := r.BasicAuth(); ok && u == DefaultUsername && p == testKey {
			return
		}
		w.Header().Set("WWW-Authenticate", `Basic realm="registry"`)
		w.WriteHeader(http.StatusUnauthorized)
	}))
	t.Cleanup(srv.Close)
	origin, _ := url.Parse(srv.URL)

	anon := NewTransport(nil, origin, Credentials{}, nil)
	if st, _ := get(t, anon, srv.URL+"/v2/a/manifests/1"); st != http.StatusUnauthorized {
		t.Fatalf("anonymous against a Basic registry: status %d, want 401", st)
	}
	mu.Lock()
	if len(saw) != 1 {
		t.Errorf("anonymous: %d requests, want 1 (no pointless retry)", len(saw))
	}
	saw = nil
	mu.Unlock()

	tr := NewTransport(nil, origin, Credentials{Secret: testKey}, nil)
	for range 2 {
		if st, _ := get(t, tr, srv.URL+"/v2/a/manifests/1"); st != http.StatusOK {
			t.Fatalf("with key against a Basic registry: status %d", st)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	want := "Basic " + base64.StdEncoding.EncodeToString([]byte("$oauthtoken:"+testKey))
	// 401, retry with Basic, then Basic straight away.
	if len(saw) != 3 || saw[0] != "" || saw[1] != want || saw[2] != want {
		t.Errorf("registry saw %q", saw)
	}
}

func TestTransportRefusesUnsafeRealm(t *testing.T) {
	t.Parallel()
	// A plain-http realm server the https registry points at.
	var mu sync.Mutex
	plainHits := 0
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		plainHits++
		mu.Unlock()
		_, _ = io.WriteString(w, `{"token":"leaked"}`)
	}))
	t.Cleanup(plain.Close)

	tests := []struct {
		name  string
		realm func(f *fakeUpstream) string
		ok    bool
	}{
		{"https realm on the registry (control)", func(f *fakeUpstream) string { return f.realmURL }, true},
		{"http realm for an https registry", func(*fakeUpstream) string { return plain.URL + "/token" }, false},
		{"non-http realm", func(*fakeUpstream) string { return "ftp://127.0.0.1/token" }, false},
		{"relative realm", func(*fakeUpstream) string { return "/token" }, false},
		{"empty realm", func(*fakeUpstream) string { return "" }, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// Not parallel: they share plainHits.
			f := newFakeUpstream(t, fakeOpts{tls: true})
			realm := tc.realm(f)
			f.setChallenge(func(string) string { return `Bearer realm="` + realm + `",service="registry"` })
			tr := NewTransport(f.base(), f.origin(t), Credentials{Secret: testKey}, nil)
			u := f.registry.URL + "/v2/nvidia/cuda/manifests/12.4"
			for range 2 {
				st, _ := get(t, tr, u)
				if tc.ok && st != http.StatusOK {
					t.Fatalf("status %d, want 200", st)
				}
				if !tc.ok && st != http.StatusUnauthorized {
					t.Fatalf("status %d, want the upstream's 401 passed through", st)
				}
			}
			if !tc.ok {
				if hits := f.realmHits(); hits != 0 {
					t.Errorf("registry realm hit %d times", hits)
				}
				for _, r := range f.registryRequests() {
					if r.Authz != "" {
						t.Errorf("registry received Authorization %q", r.Authz)
					}
				}
			}
		})
	}
	mu.Lock()
	defer mu.Unlock()
	if plainHits != 0 {
		t.Errorf("the plain-http realm was asked %d times; credentials would travel in clear", plainHits)
	}
}

func TestScopeForPath(t *testing.T) {
	t.Parallel()
	tests := []struct{ path, want string }{
		{"/v2/", ""},
		{"/v2", ""},
		{"", ""},
		{"/v2/_catalog", ""},
		{"/v2/nvidia/cuda/manifests/12.4.1-devel-ubuntu22.04", "repository:nvidia/cuda:pull"},
		{"/v2/nvidia/cuda/manifests/sha256:0123456789abcdef", "repository:nvidia/cuda:pull"},
		{"/v2/nvidia/pytorch/blobs/sha256:abcdef", "repository:nvidia/pytorch:pull"},
		{"/v2/nvidia/pytorch/blobs/uploads/", "repository:nvidia/pytorch:pull"},
		{"/v2/nvidia/tritonserver/tags/list", "repository:nvidia/tritonserver:pull"},
		{"/v2/org/team/image/manifests/latest", "repository:org/team/image:pull"},
		{"/v2/ubuntu/tags/list", "repository:ubuntu:pull"},
		// Repository components named like API words.
		{"/v2/org/blobs/manifests/latest", "repository:org/blobs:pull"},
		{"/v2/manifests/manifests/latest", "repository:manifests:pull"},
		{"/v2/org/tags/blobs/sha256:abc", "repository:org/tags:pull"},
		{"/v2/org/manifests/blobs/sha256:abc", "repository:org/manifests:pull"},
		{"/v2/org/blobs/tags/list", "repository:org/blobs:pull"},
		// No repository.
		{"/v2/manifests/latest", ""},
		{"/v2//manifests/latest", ""},
		{"/v3/nvidia/cuda/manifests/latest", ""},
		{"/nvidia/cuda/manifests/latest", ""},
		{"/v2/nvidia/cuda", ""},
	}
	for _, tc := range tests {
		if got := ScopeForPath(tc.path); got != tc.want {
			t.Errorf("ScopeForPath(%q) = %q, want %q", tc.path, got, tc.want)
		}
	}
}

func TestCredentialsNeverRevealSecret(t *testing.T) {
	t.Parallel()
	tests := []struct {
		c    Credentials
		want string
	}{
		{Credentials{Username: "$oauthtoken", Secret: testKey}, "$oauthtoken:<redacted>"},
		{Credentials{Username: "robot", Secret: testKey}, "robot:<redacted>"},
		{Credentials{}, "anonymous"},
		{Credentials{Username: "$oauthtoken"}, "anonymous"},
	}
	for _, tc := range tests {
		if got := tc.c.String(); got != tc.want {
			t.Errorf("String() = %q, want %q", got, tc.want)
		}
		if got := tc.c.LogValue(); got.Kind() != slog.KindString || got.String() != tc.want {
			t.Errorf("LogValue() = %v, want %q", got, tc.want)
		}
		var out []string
		for _, verb := range []string{"%v", "%+v", "%s", "%q"} {
			out = append(out, fmt.Sprintf(verb, tc.c), fmt.Sprintf(verb, &tc.c))
		}
		out = append(out, fmt.Sprintf("%v", struct{ Creds Credentials }{tc.c}))
		var text, js bytes.Buffer
		slog.New(slog.NewTextHandler(&text, nil)).Info("x", "creds", tc.c, "ptr", &tc.c)
		slog.New(slog.NewJSONHandler(&js, nil)).Info("x", "creds", tc.c, slog.Group("g", "creds", tc.c))
		out = append(out, text.String(), js.String())
		for _, s := range out {
			if strings.Contains(s, testKey) {
				t.Errorf("output reveals the secret: %s", s)
			}
		}
		if !strings.Contains(text.String(), tc.want) || !strings.Contains(js.String(), tc.want) {
			t.Errorf("slog output lacks %q:\n%s%s", tc.want, text.String(), js.String())
		}
	}
}
