package auth

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
)

// DefaultUsername is the user name NGC expects with an API key.
const DefaultUsername = "$oauthtoken"

// defaultTokenLifetime applies when a token response has no expires_in
// (the Docker token spec says 60 seconds).
const defaultTokenLifetime = 60 * time.Second

// maxCachedTokens bounds the token cache (one token per repository scope).
const maxCachedTokens = 10000

// maxTokenResponse caps how much of a token response is read (bytes).
const maxTokenResponse = 1 << 20

// ErrTokenExchange is wrapped by every failure to obtain a token from a realm.
var ErrTokenExchange = errors.New("auth: token exchange failed")

// ErrTokenNotJSON is wrapped (with ErrTokenExchange) when a realm answered
// 200 with a body that is not JSON at all, such as a captive portal's HTML
// page.
var ErrTokenNotJSON = errors.New("auth: token response is not JSON")

// Credentials are the upstream credentials. An empty Secret means anonymous.
// String and LogValue never reveal Secret.
type Credentials struct {
	Username string
	Secret   string
}

// String implements fmt.Stringer without the secret.
func (c Credentials) String() string {
	if c.Secret == "" {
		return "anonymous"
	}
	return c.Username + ":<redacted>"
}

// LogValue implements slog.LogValuer without the secret.
func (c Credentials) LogValue() slog.Value { return slog.StringValue(c.String()) }

// TokenError is returned (wrapping ErrTokenExchange) when a realm refuses to
// issue a token. It holds the realm's HTTP status, never the request's
// credentials.
type TokenError struct {
	Realm      string
	StatusCode int
	// RetryAfter is the realm's Retry-After header value (on a 429), or "".
	RetryAfter string
}

func (e *TokenError) Error() string {
	return fmt.Sprintf("auth: token realm %s answered %d", e.Realm, e.StatusCode)
}

func (e *TokenError) Unwrap() error { return ErrTokenExchange }

// Refused reports whether err says that a token realm answered and refused
// the credentials (401 or 403): a wrong or revoked API key, as opposed to a
// realm that could not be reached.
func Refused(err error) bool {
	var te *TokenError
	return errors.As(err, &te) && (te.StatusCode == http.StatusUnauthorized || te.StatusCode == http.StatusForbidden)
}

// Transport is an http.RoundTripper that authenticates requests to one
// registry origin (scheme, host and port). Requests to any other origin, such
// as the CDN a blob GET is redirected to, pass through with no Authorization
// header: the OCI distribution spec forbids forwarding registry credentials,
// and S3-style stores reject a request that carries two auth mechanisms.
//
// On a 401 it parses the challenge, fetches a token for the request's
// repository scope and retries once. The first Bearer realm seen is kept as
// the token realm for good: after a token expires nvcr.io challenges with a
// different realm (https://authn.nvidia.com/token, error="invalid_token")
// that refuses both anonymous and API-key callers, so re-exchanging there
// would fail. Tokens are cached per scope, refreshed before they expire, and
// concurrent refreshes of one scope share a single request.
type Transport struct {
	// OnTokenExchange, if set, is called after each token exchange with
	// whether it succeeded. Set it before the first request.
	OnTokenExchange func(ok bool)

	base   http.RoundTripper
	origin *url.URL
	creds  Credentials
	log    *slog.Logger
	now    func() time.Time

	mu     sync.Mutex
	scheme string // "", "bearer" or "basic"
	params map[string]string
	tokens map[string]*token // by scope
	flight singleflight.Group
}

type token struct {
	value     string
	refreshAt time.Time
	expiresAt time.Time
}

// NewTransport returns a Transport for the registry at origin (for example
// https://nvcr.io) that sends requests through base (http.DefaultTransport
// when nil).
func NewTransport(base http.RoundTripper, origin *url.URL, creds Credentials, log *slog.Logger) *Transport {
	if base == nil {
		base = http.DefaultTransport
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if creds.Secret != "" && creds.Username == "" {
		creds.Username = DefaultUsername
	}
	return &Transport{
		base:   base,
		origin: origin,
		creds:  creds,
		log:    log,
		now:    time.Now,
		tokens: map[string]*token{},
	}
}

var _ http.RoundTripper = (*Transport)(nil)

// RoundTrip implements http.RoundTripper. It never modifies req.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if !sameOrigin(req.URL, t.origin) {
		if req.Header.Get("Authorization") != "" {
			req = req.Clone(req.Context())
			req.Header.Del("Authorization")
		}
		return t.base.RoundTrip(req)
	}
	scope := ScopeForPath(req.URL.Path)
	authz, err := t.authorization(req.Context(), scope, "")
	if err != nil {
		return nil, err
	}
	resp, err := t.send(req, authz)
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	if req.Body != nil && req.GetBody == nil {
		return resp, nil // cannot replay the body
	}
	retry, err := t.learn(resp.Header.Values("Www-Authenticate"))
	if err != nil || !retry {
		return resp, nil
	}
	fresh, err := t.authorization(req.Context(), scope, authz)
	if err != nil {
		drain(resp)
		return nil, err
	}
	if fresh == authz {
		return resp, nil // nothing new to try
	}
	drain(resp)
	if req.GetBody != nil {
		req = req.Clone(req.Context())
		if req.Body, err = req.GetBody(); err != nil {
			return nil, err
		}
	}
	return t.send(req, fresh)
}

func (t *Transport) send(req *http.Request, authz string) (*http.Response, error) {
	r := req.Clone(req.Context())
	r.Header.Del("Authorization")
	if authz != "" {
		r.Header.Set("Authorization", authz)
	}
	return t.base.RoundTrip(r)
}

// learn records what a 401 challenge says about the registry's scheme and
// reports whether a retry with fresh credentials may help.
func (t *Transport) learn(headers []string) (bool, error) {
	var chosen *Challenge
	for _, h := range headers {
		cs, err := ParseChallenges(h)
		if err != nil {
			continue
		}
		for i := range cs {
			if cs[i].Scheme == "bearer" || (cs[i].Scheme == "basic" && chosen == nil) {
				chosen = &cs[i]
			}
		}
	}
	if chosen == nil {
		return false, nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch chosen.Scheme {
	case "basic":
		if t.scheme == "" {
			t.scheme = "basic"
		}
		return t.creds.Secret != "", nil
	default:
		if t.scheme != "bearer" {
			realm := chosen.Realm()
			if err := validRealm(realm, t.origin); err != nil {
				t.log.Warn("upstream sent an unusable token realm", "realm", realm, "err", err)
				return false, err
			}
			t.scheme = "bearer"
			t.params = map[string]string{"realm": realm}
			if s, ok := chosen.Params["service"]; ok {
				t.params["service"] = s
			}
		} else if chosen.Realm() != t.params["realm"] {
			t.log.Debug("upstream challenged with another realm; keeping the original",
				"realm", t.params["realm"], "challenge_realm", chosen.Realm(), "error", chosen.Params["error"])
		}
		return true, nil
	}
}

// authorization returns the Authorization header value for scope, or "" when
// the registry has not asked for credentials. When stale is the value that
// just got a 401, the cached token is dropped and a new one fetched.
func (t *Transport) authorization(ctx context.Context, scope, stale string) (string, error) {
	t.mu.Lock()
	scheme := t.scheme
	if scheme == "basic" {
		t.mu.Unlock()
		if t.creds.Secret == "" {
			return "", nil
		}
		return "Basic " + basicAuth(t.creds), nil
	}
	if scheme != "bearer" {
		t.mu.Unlock()
		return "", nil
	}
	tok := t.tokens[scope]
	if tok != nil && stale != "" && "Bearer "+tok.value == stale {
		delete(t.tokens, scope)
		tok = nil
	}
	now := t.now()
	if tok != nil && now.Before(tok.refreshAt) {
		t.mu.Unlock()
		return "Bearer " + tok.value, nil
	}
	params := t.params
	t.mu.Unlock()

	v, err, _ := t.flight.Do(scope, func() (any, error) {
		// Another caller's exchange may have finished since the check above.
		t.mu.Lock()
		if cur := t.tokens[scope]; cur != nil && cur != tok && t.now().Before(cur.refreshAt) {
			t.mu.Unlock()
			return cur, nil
		}
		t.mu.Unlock()
		// Detached from one caller's cancellation: others share the result.
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		nt, err := t.fetchToken(fctx, params, scope)
		if t.OnTokenExchange != nil {
			t.OnTokenExchange(err == nil)
		}
		if err != nil {
			return nil, err
		}
		t.mu.Lock()
		if len(t.tokens) >= maxCachedTokens {
			// Scopes come from client-chosen names: keep the map bounded.
			for sc, tk := range t.tokens {
				if !t.now().Before(tk.expiresAt) {
					delete(t.tokens, sc)
				}
			}
			if len(t.tokens) >= maxCachedTokens {
				t.tokens = map[string]*token{}
			}
		}
		t.tokens[scope] = nt
		t.mu.Unlock()
		return nt, nil
	})
	if err != nil {
		// A token that has not expired yet is still worth trying.
		if tok != nil && now.Before(tok.expiresAt) && stale == "" {
			return "Bearer " + tok.value, nil
		}
		return "", err
	}
	return "Bearer " + v.(*token).value, nil
}

// tokenResponse is the body of a token realm's answer. Registries differ:
// the Docker token spec names the field "token", OAuth2 "access_token".
type tokenResponse struct {
	Token       string    `json:"token"`
	AccessToken string    `json:"access_token"`
	ExpiresIn   int64     `json:"expires_in"`
	IssuedAt    time.Time `json:"issued_at"`
}

func (t *Transport) fetchToken(ctx context.Context, params map[string]string, scope string) (*token, error) {
	realm := params["realm"]
	u, err := url.Parse(realm)
	if err != nil {
		return nil, fmt.Errorf("%w: bad realm: %v", ErrTokenExchange, err)
	}
	// Merge, not overwrite: realms have carried their own query strings.
	q := u.Query()
	if scope != "" {
		q.Set("scope", scope)
	}
	if s, ok := params["service"]; ok && s != "" {
		q.Set("service", s)
	}
	if t.creds.Secret != "" {
		q.Set("account", t.creds.Username)
	}
	u.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrTokenExchange, err)
	}
	if t.creds.Secret != "" {
		req.Header.Set("Authorization", "Basic "+basicAuth(t.creds))
	}
	start := t.now()
	resp, err := t.base.RoundTrip(req)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrTokenExchange, err)
	}
	defer drain(resp)
	if resp.StatusCode != http.StatusOK {
		return nil, &TokenError{Realm: redactURL(u), StatusCode: resp.StatusCode, RetryAfter: resp.Header.Get("Retry-After")}
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxTokenResponse))
	if err != nil {
		return nil, fmt.Errorf("%w: reading response: %w", ErrTokenExchange, err)
	}
	tok, err := parseTokenResponse(body, start)
	if err != nil {
		return nil, err
	}
	t.log.Debug("obtained upstream token", "scope", scope, "lifetime", tok.expiresAt.Sub(tok.refreshAt)*5)
	return tok, nil
}

// maxTokenLifetime caps expires_in, so that an absurd value cannot
// overflow time arithmetic or keep a token forever.
const maxTokenLifetime = 24 * time.Hour

// parseTokenResponse reads a token realm's answer leniently, whatever its
// Content-Type claims (an old nvcr.io answered JSON as text/html): "token"
// or "access_token", "expires_in" in seconds (absent: 60 s), "issued_at"
// used only when it is plausible (not after now, within the lifetime).
func parseTokenResponse(body []byte, now time.Time) (*token, error) {
	var tr tokenResponse
	if err := json.Unmarshal(body, &tr); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrTokenExchange, ErrTokenNotJSON)
	}
	value := tr.Token
	if value == "" {
		value = tr.AccessToken
	}
	if value == "" {
		return nil, fmt.Errorf("%w: response has no token", ErrTokenExchange)
	}
	life := defaultTokenLifetime
	if tr.ExpiresIn > 0 {
		life = time.Duration(min(tr.ExpiresIn, int64(maxTokenLifetime/time.Second))) * time.Second
	}
	issued := now
	if !tr.IssuedAt.IsZero() && tr.IssuedAt.Before(now) && now.Sub(tr.IssuedAt) < life {
		issued = tr.IssuedAt
	}
	return &token{
		value:     value,
		refreshAt: issued.Add(life * 4 / 5), // refresh with a fifth of the lifetime left
		expiresAt: issued.Add(life),
	}, nil
}

// ScopeForPath returns the token scope ("repository:<name>:pull") for a
// registry API path /v2/<name>/{manifests,blobs,tags}/..., or "" for paths
// that name no repository (such as /v2/).
func ScopeForPath(p string) string {
	rest, ok := strings.CutPrefix(p, "/v2/")
	if !ok {
		return ""
	}
	// The marker nearest the end wins: a name component may itself be
	// called "manifests", "blobs" or "tags".
	best := -1
	for _, marker := range []string{"/manifests/", "/blobs/", "/tags/"} {
		best = max(best, strings.LastIndex(rest, marker))
	}
	if best <= 0 {
		return ""
	}
	return "repository:" + rest[:best] + ":pull"
}

func sameOrigin(u, origin *url.URL) bool {
	return strings.EqualFold(u.Scheme, origin.Scheme) && strings.EqualFold(hostPort(u), hostPort(origin))
}

func hostPort(u *url.URL) string {
	if u.Port() != "" {
		return u.Host
	}
	switch strings.ToLower(u.Scheme) {
	case "https":
		return u.Hostname() + ":443"
	case "http":
		return u.Hostname() + ":80"
	}
	return u.Host
}

// validRealm refuses realms that are not absolute http(s) URLs, and plain
// http realms for an https registry (credentials would travel in clear).
func validRealm(realm string, origin *url.URL) error {
	u, err := url.Parse(realm)
	if err != nil {
		return fmt.Errorf("%w: bad realm: %v", ErrTokenExchange, err)
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return fmt.Errorf("%w: realm scheme %q is not http(s)", ErrTokenExchange, u.Scheme)
	case u.Host == "":
		return fmt.Errorf("%w: realm has no host", ErrTokenExchange)
	case origin.Scheme == "https" && u.Scheme != "https":
		return fmt.Errorf("%w: realm downgrades https to http", ErrTokenExchange)
	}
	return nil
}

func basicAuth(c Credentials) string {
	return base64.StdEncoding.EncodeToString([]byte(c.Username + ":" + c.Secret))
}

// redactURL drops the query (which may carry signatures) and user info.
func redactURL(u *url.URL) string {
	c := *u
	c.RawQuery, c.User, c.Fragment = "", nil, ""
	return c.String()
}

func drain(resp *http.Response) {
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	_ = resp.Body.Close()
}
