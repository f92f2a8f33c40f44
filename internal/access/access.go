// Package access decides which clients may pull which repositories from the
// mirror: client authentication (none, htpasswd Basic, mirror-issued bearer
// tokens, or pass-through NGC keys checked against the upstream) and
// authorization rules, with a safe default: repositories under the public
// namespaces are open to anyone, everything else only to authenticated
// clients a rule allows.
//
// The mirror holds the lab's NGC API key, which reads the lab's private org;
// without this package every client on the network could read it too.
package access

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path"
	"strings"
	"sync"
	"time"

	dauth "github.com/distribution/distribution/v3/registry/auth"
	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd" // registers "htpasswd"
	"golang.org/x/crypto/bcrypt"
	"golang.org/x/sync/singleflight"

	"github.com/ngc-mirror/ngc-mirror/internal/names"
)

// Modes of client authentication.
const (
	ModeNone        = "none"        // nobody authenticates: public namespaces only
	ModeHtpasswd    = "htpasswd"    // users of an htpasswd file (bcrypt): HTTP Basic, or tokens from /auth/token
	ModeToken       = "token"       // the same users; named for the Docker token flow (docker login)
	ModePassthrough = "passthrough" // clients present their own NGC key (Basic, or a token carrying it); the upstream decides
)

// Errors of Authorize. Compare with errors.Is.
var (
	// ErrUnauthenticated: the repository needs an authenticated client (401).
	ErrUnauthenticated = errors.New("access: authentication required")
	// ErrDenied: the client is authenticated but may not pull (403).
	ErrDenied = errors.New("access: denied")
	// ErrBadCredentials: credentials were presented and are wrong (401).
	ErrBadCredentials = errors.New("access: invalid credentials")
	// ErrUnavailable: the upstream could not answer a pass-through check
	// (503); nothing is granted and nothing cached.
	ErrUnavailable = errors.New("access: the upstream could not confirm access")
)

// Rule grants users (names, "@group" or "*" for any authenticated user) pull
// access to repositories matching any of its patterns. In a pattern "*"
// matches within one path component and "**" any number of components:
// "myorg/**" covers myorg/a and myorg/team/b.
type Rule struct {
	Repositories []string `yaml:"repositories"`
	Users        []string `yaml:"users"`
}

// Config configures a Policy.
type Config struct {
	Mode string `yaml:"mode"`
	// HtpasswdFile holds users for the htpasswd and token modes. It must
	// exist (distribution's htpasswd controller would otherwise create one
	// with a generated password).
	HtpasswdFile string `yaml:"htpasswd_file"`
	// PublicNamespaces are served to anyone, anonymous clients included:
	// the first path component of a repository ("nvidia" opens
	// nvidia/pytorch and nvidia/k8s/dcgm-exporter), or its first
	// components ("docker.io/library" opens docker.io/library/ubuntu, and
	// "docker.io" all of docker.io's qualified names).
	PublicNamespaces []string            `yaml:"public_namespaces"`
	Groups           map[string][]string `yaml:"groups"`
	Rules            []Rule              `yaml:"rules"`
	// TokenLifetime of mirror-issued bearer tokens (every mode but none).
	TokenLifetime time.Duration `yaml:"-"`
	// TokenKeyFile holds the key that signs bearer tokens; when empty a
	// random key is made at start (tokens then end with the process, and
	// replicas behind one name need the same file).
	TokenKeyFile string `yaml:"token_key_file"`
	// PassthroughCacheTTL is how long an upstream access check is reused.
	PassthroughCacheTTL time.Duration `yaml:"-"`
}

// Identity is who made a request.
type Identity struct {
	User string // "" when anonymous
	// key is a pass-through client's NGC key (never logged or exposed).
	key string
}

// Anonymous reports whether the request carried no credentials.
func (id Identity) Anonymous() bool { return id.User == "" }

// UpstreamChecker asks the upstream whether the NGC key may pull repository
// (pass-through mode), or, for repository "", whether the upstream takes
// the key at all (a login at /auth/token: nvcr.io's token exchange without
// a scope refuses an unknown key with 401). allowed is the upstream's
// answer; err means it could not answer.
type UpstreamChecker func(ctx context.Context, key, repository string) (allowed bool, err error)

// Policy authenticates and authorizes clients. It is safe for concurrent use.
type Policy struct {
	cfg      Config
	htpasswd dauth.AccessController
	tokens   *tokenIssuer
	check    UpstreamChecker

	mu     sync.Mutex
	checks map[string]checkResult // by sha256(key) + "\x00" + repository
	flight singleflight.Group
	// logins remembers Basic credentials that passed the htpasswd check
	// for basicTTL, by sha256(user, password): clients send them on every
	// request, and each check is a bcrypt comparison (milliseconds of CPU
	// per blob GET otherwise).
	logins map[[32]byte]time.Time
}

// basicTTL is how long a verified Basic login is trusted without another
// bcrypt check; a password changed or removed in the htpasswd file takes
// effect within it. maxLogins bounds the memory of logins.
const (
	basicTTL  = time.Minute
	maxLogins = 4096
)

type checkResult struct {
	err     error
	expires time.Time
}

// New builds a Policy. check is needed in pass-through mode only.
func New(cfg Config, check UpstreamChecker) (*Policy, error) {
	p := &Policy{cfg: cfg, check: check, checks: map[string]checkResult{}, logins: map[[32]byte]time.Time{}}
	if p.cfg.TokenLifetime <= 0 {
		p.cfg.TokenLifetime = 15 * time.Minute
	}
	if p.cfg.PassthroughCacheTTL <= 0 {
		p.cfg.PassthroughCacheTTL = time.Minute
	}
	switch cfg.Mode {
	case "", ModeNone:
		p.cfg.Mode = ModeNone
	case ModeHtpasswd, ModeToken:
		if cfg.HtpasswdFile == "" {
			return nil, fmt.Errorf("access.htpasswd_file (MIRROR_HTPASSWD_FILE) must name a file of users in mode %s (make one with `mirror htpasswd USER >> FILE`, password on stdin, or htpasswd -B -c FILE USER)", cfg.Mode)
		}
		if err := checkHtpasswd(cfg.HtpasswdFile); err != nil {
			return nil, err
		}
		ac, err := dauth.GetAccessController("htpasswd", map[string]any{"realm": "ngc-mirror", "path": cfg.HtpasswdFile})
		if err != nil {
			return nil, fmt.Errorf("access.htpasswd_file: %w", err)
		}
		p.htpasswd = ac
	case ModePassthrough:
		if check == nil {
			return nil, errors.New("access: pass-through mode needs an upstream checker")
		}
	default:
		return nil, fmt.Errorf("access.mode %q: want none, htpasswd, token or passthrough", cfg.Mode)
	}
	if p.cfg.Mode != ModeNone {
		// Every mode with client authentication offers the token endpoint:
		// it is what anonymous Docker clients can use (see TokenHandler).
		key, err := loadTokenKey(cfg.TokenKeyFile)
		if err != nil {
			return nil, err
		}
		if p.tokens, err = newTokenIssuer(key, p.cfg.TokenLifetime); err != nil {
			return nil, err
		}
	}
	for _, r := range cfg.Rules {
		for _, pat := range r.Repositories {
			if _, err := path.Match(strings.ReplaceAll(pat, "**", "*"), "x"); err != nil {
				return nil, fmt.Errorf("access.rules: bad repository pattern %q: %w", pat, err)
			}
		}
	}
	return p, nil
}

// checkHtpasswd refuses an htpasswd file that distribution's controller
// would load but never match: it compares bcrypt hashes only, so a user
// whose entry is MD5 ("$apr1$", what plain "htpasswd -c" writes), SHA-1
// ("{SHA}") or crypt(3) could never log in, and nothing would say why.
// Lines are "user:hash"; blank lines and "#" comments are skipped, as
// distribution does.
func checkHtpasswd(file string) error {
	raw, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("access.htpasswd_file: %w", err)
	}
	var bad []string
	for i, line := range strings.Split(string(raw), "\n") {
		t := strings.TrimSpace(line)
		if t == "" || t[0] == '#' {
			continue
		}
		user, hash, ok := strings.Cut(t, ":")
		if !ok {
			return fmt.Errorf("access.htpasswd_file %s: line %d is not user:hash", file, i+1)
		}
		if _, err := bcrypt.Cost([]byte(hash)); err != nil {
			kind := "not bcrypt"
			switch {
			case strings.HasPrefix(hash, "$apr1$"):
				kind = "MD5 ($apr1$, what htpasswd writes without -B)"
			case strings.HasPrefix(hash, "{SHA}"):
				kind = "SHA-1 ({SHA})"
			}
			bad = append(bad, fmt.Sprintf("%s (line %d: %s)", user, i+1, kind))
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("access.htpasswd_file %s: only bcrypt password hashes work, and these are not: %s; "+
			"recreate each with `mirror htpasswd USER` (password on stdin) or htpasswd -B %s USER", file, strings.Join(bad, ", "), file)
	}
	return nil
}

// Mode returns the authentication mode.
func (p *Policy) Mode() string { return p.cfg.Mode }

// Authenticate reads the request's credentials: a bearer token from the
// mirror's token endpoint, or HTTP Basic (htpasswd users, or "$oauthtoken"
// and an NGC key in pass-through mode). No credentials (or an anonymous
// token) give the anonymous identity; wrong ones ErrBadCredentials. In
// mode none credentials are ignored.
func (p *Policy) Authenticate(r *http.Request) (Identity, error) {
	h := r.Header.Get("Authorization")
	if h == "" || p.cfg.Mode == ModeNone {
		return Identity{}, nil
	}
	if tok, ok := strings.CutPrefix(h, "Bearer "); ok {
		user, key, err := p.tokens.verify(tok, time.Now())
		if err != nil {
			return Identity{}, ErrBadCredentials
		}
		return Identity{User: user, key: key}, nil
	}
	if u, pw, ok := r.BasicAuth(); ok && u == "" && pw == "" {
		// containers/image (skopeo, podman) answers a Basic challenge with
		// empty credentials when it has none: that is an anonymous client.
		return Identity{}, nil
	}
	return p.login(r)
}

// login checks a request's Basic credentials for the mode.
func (p *Policy) login(r *http.Request) (Identity, error) {
	if p.cfg.Mode == ModePassthrough {
		user, key, ok := r.BasicAuth()
		if !ok || key == "" {
			return Identity{}, ErrBadCredentials
		}
		if user == "" {
			user = "$oauthtoken"
		}
		return Identity{User: user + "#" + keyID(key), key: key}, nil
	}
	return p.basic(r)
}

// Bearer reports whether r carries a bearer token (valid or not).
func Bearer(r *http.Request) bool {
	return strings.HasPrefix(r.Header.Get("Authorization"), "Bearer ")
}

func (p *Policy) basic(r *http.Request) (Identity, error) {
	user, pw, ok := r.BasicAuth()
	if !ok {
		return Identity{}, ErrBadCredentials
	}
	key := sha256.Sum256([]byte(user + "\x00" + pw))
	now := time.Now()
	p.mu.Lock()
	exp, seen := p.logins[key]
	p.mu.Unlock()
	if seen && now.Before(exp) {
		return Identity{User: user}, nil
	}
	grant, err := p.htpasswd.Authorized(r)
	if err != nil {
		return Identity{}, ErrBadCredentials
	}
	p.mu.Lock()
	if len(p.logins) >= maxLogins {
		clear(p.logins)
	}
	p.logins[key] = now.Add(basicTTL)
	p.mu.Unlock()
	return Identity{User: grant.User.Name}, nil
}

// keyID names a key in logs and caches without revealing it.
func keyID(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:6])
}

// Public reports whether repository is under a public namespace: its first
// path component is one, or, for a namespace of several components (a
// further upstream's, docker.io/library), it begins with those.
func (p *Policy) Public(repository string) bool {
	for _, pub := range p.cfg.PublicNamespaces {
		if pub != "" && (repository == pub || strings.HasPrefix(repository, pub+"/")) {
			return true
		}
	}
	return false
}

// Authorize decides whether id may pull repository. It returns nil,
// ErrUnauthenticated (anonymous client, non-public repository) or an error
// wrapping ErrDenied whose text after "access: denied: " says why, for the
// client (DeniedReason). In pass-through mode it asks the upstream (cached for
// PassthroughCacheTTL, concurrent checks of one key and repository shared).
func (p *Policy) Authorize(ctx context.Context, id Identity, repository string) error {
	if p.Public(repository) {
		return nil
	}
	if p.cfg.Mode == ModeNone {
		// No credentials can work here: say so rather than challenge.
		return fmt.Errorf("%w: %s is not in a public namespace (access.public_namespaces) and client authentication is off (access.mode: none)", ErrDenied, repository)
	}
	if id.Anonymous() {
		return ErrUnauthenticated
	}
	if p.cfg.Mode == ModePassthrough {
		return p.upstreamCheck(ctx, id.key, repository)
	}
	for _, r := range p.cfg.Rules {
		if p.ruleAllows(r, id.User, repository) {
			return nil
		}
	}
	return fmt.Errorf("%w: no rule in access.rules lets %s pull %s", ErrDenied, id.User, repository)
}

// DeniedReason returns why err (from Authorize, wrapping ErrDenied) denied
// a pull, in words for the client: "no rule in access.rules lets bob pull
// myorg/x". It names the user's own name and the repository asked, never a
// key or password.
func DeniedReason(err error) string {
	return strings.TrimPrefix(err.Error(), ErrDenied.Error()+": ")
}

func (p *Policy) ruleAllows(r Rule, user, repository string) bool {
	userOK := false
	for _, u := range r.Users {
		switch {
		case u == "*" || u == user:
			userOK = true
		case strings.HasPrefix(u, "@"):
			for _, m := range p.cfg.Groups[u[1:]] {
				if m == user {
					userOK = true
				}
			}
		}
	}
	if !userOK {
		return false
	}
	for _, pat := range r.Repositories {
		if MatchRepository(pat, repository) {
			return true
		}
	}
	return false
}

// MatchRepository matches a repository name against a pattern in which "*"
// matches within one path component and "**" any number of components
// (names.MatchRepository).
func MatchRepository(pattern, repository string) bool {
	return names.MatchRepository(pattern, repository)
}

func (p *Policy) upstreamCheck(ctx context.Context, key, repository string) error {
	sum := sha256.Sum256([]byte(key))
	ck := string(sum[:]) + "\x00" + repository // the full hash: a short one could collide
	now := time.Now()
	p.mu.Lock()
	if c, ok := p.checks[ck]; ok && now.Before(c.expires) {
		p.mu.Unlock()
		return c.err
	}
	p.mu.Unlock()
	v, _, _ := p.flight.Do(ck, func() (any, error) {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		allowed, cerr := p.check(cctx, key, repository)
		if cerr != nil {
			// The upstream could not answer: do not cache, do not grant.
			return fmt.Errorf("%w: %w", ErrUnavailable, cerr), nil
		}
		var err error
		switch {
		case !allowed && repository == "":
			err = fmt.Errorf("%w: the upstream refused this key", ErrDenied)
		case !allowed:
			err = fmt.Errorf("%w: the upstream refused this key for %s", ErrDenied, repository)
		}
		p.mu.Lock()
		if len(p.checks) > 100_000 {
			p.checks = map[string]checkResult{} // bounded: start over
		}
		p.checks[ck] = checkResult{err: err, expires: time.Now().Add(p.cfg.PassthroughCacheTTL)}
		p.mu.Unlock()
		return err, nil
	})
	if v == nil {
		return nil
	}
	return v.(error)
}

// Challenge returns the WWW-Authenticate value for a 401 on repository (""
// for the /v2/ base). host is the mirror's own scheme://host, used as the
// token realm. Every mode with client authentication challenges with
// Bearer (the Docker token flow, distribution's docs/spec/auth/token.md),
// never Basic: Docker reads the scheme from its unauthenticated GET /v2/
// and cannot meet a Basic challenge without stored credentials, while any
// client can fetch an anonymous token. Clients with credentials present
// them to the realm, or send Basic on every request (accepted too).
func (p *Policy) Challenge(host, repository string) string {
	c := fmt.Sprintf(`Bearer realm="%s/auth/token",service="ngc-mirror"`, host)
	if repository != "" {
		c += fmt.Sprintf(`,scope="repository:%s:pull"`, repository)
	}
	return c
}
