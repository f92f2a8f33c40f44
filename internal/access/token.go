package access

import (
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
)

// tokenIssuer makes and checks the mirror's own bearer tokens:
// base64url(JSON claims) "." base64url(HMAC-SHA256(key, claims)).
// They are opaque to clients (the Docker token flow does not need JWTs).
type tokenIssuer struct {
	key      []byte
	lifetime time.Duration
}

type claims struct {
	Sub string `json:"sub"` // user name, "" for an anonymous token
	Exp int64  `json:"exp"` // Unix seconds
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

func (t *tokenIssuer) issue(user string, now time.Time) string {
	body, _ := json.Marshal(claims{Sub: user, Exp: now.Add(t.lifetime).Unix()})
	b := base64.RawURLEncoding.EncodeToString(body)
	return b + "." + base64.RawURLEncoding.EncodeToString(t.mac(b))
}

func (t *tokenIssuer) mac(b string) []byte {
	m := hmac.New(sha256.New, t.key)
	m.Write([]byte(b))
	return m.Sum(nil)
}

// verify returns the token's user ("" for anonymous) or an error.
func (t *tokenIssuer) verify(tok string, now time.Time) (string, error) {
	b, sig, ok := strings.Cut(tok, ".")
	if !ok {
		return "", errors.New("malformed token")
	}
	got, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil || !hmac.Equal(got, t.mac(b)) {
		return "", errors.New("bad token signature")
	}
	raw, err := base64.RawURLEncoding.DecodeString(b)
	if err != nil {
		return "", errors.New("malformed token")
	}
	var c claims
	if err := json.Unmarshal(raw, &c); err != nil {
		return "", errors.New("malformed token")
	}
	if now.Unix() >= c.Exp {
		return "", errors.New("token expired")
	}
	return c.Sub, nil
}

// TokenHandler serves the Docker token endpoint (GET /auth/token) in token
// mode: with valid Basic credentials it issues a token for that user,
// without credentials an anonymous one (which opens only the public
// namespaces), with wrong ones 401. The answer carries both "token" and
// "access_token", "expires_in" (seconds) and "issued_at".
func (p *Policy) TokenHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p.tokens == nil {
			http.NotFound(w, r)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			// The OAuth2 POST form flow is not offered; Docker falls back to GET.
			w.Header().Set("Allow", "GET")
			http.Error(w, "use GET", http.StatusMethodNotAllowed)
			return
		}
		user := ""
		if _, _, ok := r.BasicAuth(); ok {
			id, err := p.basic(r)
			if err != nil {
				w.Header().Set("WWW-Authenticate", `Basic realm="ngc-mirror"`)
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusUnauthorized)
				_, _ = w.Write([]byte(`{"errors":[{"code":"UNAUTHORIZED","message":"invalid credentials"}]}` + "\n"))
				return
			}
			user = id.User
		}
		now := time.Now()
		tok := p.tokens.issue(user, now)
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
