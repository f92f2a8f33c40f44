package access

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ocierr"
)

// tokenIssuer makes and checks the mirror's own bearer tokens:
// base64url(JSON claims) "." base64url(HMAC-SHA256(key, claims)).
// They are opaque to clients (the Docker token flow does not need JWTs).
type tokenIssuer struct {
	key      []byte
	lifetime time.Duration
	seal     cipher.AEAD // seals pass-through keys carried in tokens
}

type claims struct {
	Sub string `json:"sub"` // user name, "" for an anonymous token
	Exp int64  `json:"exp"` // Unix seconds
	// Key is a pass-through client's NGC key, sealed (AES-256-GCM under a
	// key derived from the signing key): base64url(nonce || ciphertext).
	// Requests with the token are checked with the upstream under that
	// key, as a Basic login would be. "" in the other modes.
	Key string `json:"key,omitempty"`
}

func newTokenIssuer(key []byte, lifetime time.Duration) (*tokenIssuer, error) {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("ngc-mirror pass-through key seal"))
	block, err := aes.NewCipher(m.Sum(nil))
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &tokenIssuer{key: key, lifetime: lifetime, seal: aead}, nil
}

func loadTokenKey(file string) ([]byte, error) {
	if file == "" {
		key := make([]byte, 32)
		_, err := rand.Read(key)
		return key, err
	}
	raw, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("access.token_key_file: %w", err)
	}
	key := []byte(strings.TrimSpace(string(raw)))
	if len(key) < 32 {
		return nil, errors.New("access.token_key_file: the key must be at least 32 bytes")
	}
	return key, nil
}

// issue returns a token for user (and, in pass-through mode, the client's
// NGC key, sealed).
func (t *tokenIssuer) issue(user, key string, now time.Time) string {
	c := claims{Sub: user, Exp: now.Add(t.lifetime).Unix()}
	if key != "" {
		nonce := make([]byte, t.seal.NonceSize())
		_, _ = rand.Read(nonce)
		c.Key = base64.RawURLEncoding.EncodeToString(t.seal.Seal(nonce, nonce, []byte(key), nil))
	}
	body, _ := json.Marshal(c)
	b := base64.RawURLEncoding.EncodeToString(body)
	return b + "." + base64.RawURLEncoding.EncodeToString(t.mac(b))
}

func (t *tokenIssuer) mac(b string) []byte {
	m := hmac.New(sha256.New, t.key)
	m.Write([]byte(b))
	return m.Sum(nil)
}

// verify returns the token's user ("" for anonymous) and sealed NGC key
// ("" unless pass-through), or an error.
func (t *tokenIssuer) verify(tok string, now time.Time) (user, key string, err error) {
	b, sig, ok := strings.Cut(tok, ".")
	if !ok {
		return "", "", errors.New("malformed token")
	}
	got, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil || !hmac.Equal(got, t.mac(b)) {
		return "", "", errors.New("bad token signature")
	}
	raw, err := base64.RawURLEncoding.DecodeString(b)
	if err != nil {
		return "", "", errors.New("malformed token")
	}
	var c claims
	if err := json.Unmarshal(raw, &c); err != nil {
		return "", "", errors.New("malformed token")
	}
	if now.Unix() >= c.Exp {
		return "", "", errors.New("token expired")
	}
	if c.Key != "" {
		sealed, err := base64.RawURLEncoding.DecodeString(c.Key)
		ns := t.seal.NonceSize()
		if err != nil || len(sealed) < ns {
			return "", "", errors.New("malformed token")
		}
		plain, err := t.seal.Open(nil, sealed[:ns], sealed[ns:], nil)
		if err != nil {
			return "", "", errors.New("bad token seal")
		}
		key = string(plain)
	}
	return c.Sub, key, nil
}

// TokenHandler serves the Docker token endpoint (GET /auth/token) in every
// mode with client authentication (htpasswd, token, passthrough): with
// valid Basic credentials it issues a token for that user (in pass-through
// mode: for that NGC key, which the upstream must take (passthroughLogin)
// and which is checked with it on each request as a Basic login is),
// without credentials an anonymous one (which opens only
// the public namespaces), with wrong ones 401. The answer carries both
// "token" and "access_token", "expires_in" (seconds) and "issued_at"
// (Docker token authentication specification; distribution's
// docs/spec/auth/token.md).
//
// The endpoint exists because Docker learns the scheme once, from its
// unauthenticated GET /v2/, and answers a Basic challenge only with stored
// credentials ("no basic auth credentials" otherwise): a Bearer challenge
// is the one an anonymous Docker daemon can meet (with an anonymous token)
// while a logged-in one still sends its credentials (to this endpoint).
func (p *Policy) TokenHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p.tokens == nil {
			http.NotFound(w, r)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			// The OAuth2 POST form flow is not offered; Docker falls back to GET.
			w.Header().Set("Allow", "GET")
			ocierr.Write(w, http.StatusMethodNotAllowed, ocierr.New("UNSUPPORTED", "the token endpoint answers GET (the OAuth2 POST form flow is not offered)"))
			return
		}
		user, key := "", ""
		if u, pw, ok := r.BasicAuth(); ok && (u != "" || pw != "") {
			id, err := p.login(r)
			if err == nil && p.cfg.Mode == ModePassthrough {
				err = p.passthroughLogin(r.Context(), id.key)
			}
			if err != nil {
				w.Header().Set("WWW-Authenticate", `Basic realm="ngc-mirror"`)
				msg := "invalid credentials"
				if errors.Is(err, ErrDenied) {
					msg = "the upstream (nvcr.io) refused this API key"
				}
				ocierr.Write(w, http.StatusUnauthorized, ocierr.New("UNAUTHORIZED", msg))
				return
			}
			user, key = id.User, id.key
		}
		now := time.Now()
		tok := p.tokens.issue(user, key, now)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"token":        tok,
			"access_token": tok,
			"expires_in":   int(p.tokens.lifetime / time.Second),
			"issued_at":    now.UTC().Format(time.RFC3339),
		})
	})
}

// passthroughLogin checks a pass-through login's NGC key with the upstream
// (UpstreamChecker with repository "", cached as the pull checks are), so
// that `docker login` with a wrong key fails at login rather than at the
// first pull. It returns an error wrapping ErrDenied when the upstream
// refused the key. When the upstream cannot answer (the uplink is down)
// the login succeeds: each pull of a private repository is checked anyway,
// and the public namespaces are served from the cache meanwhile.
func (p *Policy) passthroughLogin(ctx context.Context, key string) error {
	if err := p.upstreamCheck(ctx, key, ""); errors.Is(err, ErrDenied) {
		return err
	}
	return nil
}
