package access_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/access"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

// fetchToken asks the policy's token endpoint as Docker does (GET with
// service and scope, Basic credentials when it has some) and returns the
// status and the token.
func fetchToken(t *testing.T, p *access.Policy, user, pass string) (int, string) {
	t.Helper()
	req := httptest.NewRequest(http.MethodGet, "http://mirror/auth/token?service=ngc-mirror&scope=repository:myorg/team/private-image:pull", nil)
	if user != "" || pass != "" {
		req.SetBasicAuth(user, pass)
	}
	rec := httptest.NewRecorder()
	p.TokenHandler().ServeHTTP(rec, req)
	var body struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
	}
	if rec.Code == http.StatusOK {
		if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Token == "" || body.Token != body.AccessToken {
			t.Fatalf("token answer %q: %v", rec.Body.String(), err)
		}
	}
	return rec.Code, body.Token
}

func withToken(tok string) *http.Request {
	req := httptest.NewRequest(http.MethodGet, "http://mirror/v2/", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	return req
}

// TestBearerInEveryAuthMode: every mode with client authentication
// challenges with Bearer at the mirror's token endpoint (Docker can meet
// no Basic challenge without stored credentials), issues anonymous tokens
// that open the public namespaces only, and tokens for valid credentials
// that identify the user (in pass-through mode: carry the NGC key, sealed,
// to the upstream check). Wrong credentials and tampered tokens are
// refused.
func TestBearerInEveryAuthMode(t *testing.T) {
	t.Parallel()
	const key = "nvapi-client-key-0123456789"
	for _, mode := range []string{access.ModeHtpasswd, access.ModeToken, access.ModePassthrough} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			var checked []string // key + " " + repository of each upstream check
			cfg := access.Config{Mode: mode, PublicNamespaces: []string{"nvidia"},
				Rules: []access.Rule{{Repositories: []string{"myorg/**"}, Users: []string{"alice"}}}}
			user, pass := "alice", "alice-pw"
			if mode == access.ModePassthrough {
				user, pass = "$oauthtoken", key
			} else {
				cfg.HtpasswdFile = ngctest.WriteHtpasswd(t, "alice", "alice-pw")
			}
			p, err := access.New(cfg, func(ctx context.Context, k, repo string) (bool, error) {
				checked = append(checked, k+" "+repo)
				return k == key, nil
			})
			if err != nil {
				t.Fatal(err)
			}
			for _, repo := range []string{"", ngctest.PrivateRepo} {
				if c := p.Challenge("http://mirror:5000", repo); !strings.HasPrefix(c, `Bearer realm="http://mirror:5000/auth/token",service="ngc-mirror"`) {
					t.Fatalf("challenge for %q: %s", repo, c)
				}
			}

			// Anonymous: a token that opens the public namespaces only.
			status, anon := fetchToken(t, p, "", "")
			if status != http.StatusOK {
				t.Fatalf("anonymous token: status %d", status)
			}
			id, err := p.Authenticate(withToken(anon))
			if err != nil || !id.Anonymous() {
				t.Fatalf("anonymous token: %+v, %v", id, err)
			}
			if err := p.Authorize(t.Context(), id, ngctest.PytorchRepo); err != nil {
				t.Fatalf("anonymous token, public repository: %v", err)
			}
			if err := p.Authorize(t.Context(), id, ngctest.PrivateRepo); !errors.Is(err, access.ErrUnauthenticated) {
				t.Fatalf("anonymous token, private repository: %v", err)
			}

			// Logged in: the token stands for the user.
			status, tok := fetchToken(t, p, user, pass)
			if status != http.StatusOK {
				t.Fatalf("login token: status %d", status)
			}
			if id, err = p.Authenticate(withToken(tok)); err != nil || id.Anonymous() {
				t.Fatalf("login token: %+v, %v", id, err)
			}
			if err := p.Authorize(t.Context(), id, ngctest.PrivateRepo); err != nil {
				t.Fatalf("login token, private repository: %v", err)
			}
			if mode == access.ModePassthrough {
				// The login checked the key itself (repository ""), the
				// pull the repository.
				if want := []string{key + " ", key + " " + ngctest.PrivateRepo}; strings.Join(checked, "|") != strings.Join(want, "|") {
					t.Fatalf("upstream checks %q, want %q", checked, want)
				}
				claims, _, _ := strings.Cut(tok, ".")
				raw, _ := base64.RawURLEncoding.DecodeString(claims)
				if strings.Contains(tok, key) || strings.Contains(string(raw), key) {
					t.Fatal("the token carries the NGC key in the clear")
				}
				// A key the upstream refuses gets no token: `docker login`
				// fails rather than the first pull.
				if status, _ := fetchToken(t, p, "$oauthtoken", "nvapi-someone-else"); status != http.StatusUnauthorized {
					t.Fatalf("login with a key the upstream refuses: status %d", status)
				}
				// Sent as Basic on a request, it passes authentication and
				// the upstream refuses the pull.
				req := httptest.NewRequest(http.MethodGet, "http://mirror/v2/", nil)
				req.SetBasicAuth("$oauthtoken", "nvapi-someone-else")
				oid, err := p.Authenticate(req)
				if err != nil {
					t.Fatal(err)
				}
				if err := p.Authorize(t.Context(), oid, ngctest.PrivateRepo); !errors.Is(err, access.ErrDenied) {
					t.Fatalf("refused key: %v", err)
				}
			} else if status, _ := fetchToken(t, p, "alice", "wrong"); status != http.StatusUnauthorized {
				t.Fatalf("wrong password: status %d", status)
			}

			// Tampered or foreign tokens are refused.
			claims, sig, _ := strings.Cut(tok, ".")
			forged := base64.RawURLEncoding.EncodeToString([]byte(`{"sub":"root","exp":9999999999}`)) + "." + sig
			for _, bad := range []string{forged, claims + ".AAAA", "garbage"} {
				if _, err := p.Authenticate(withToken(bad)); !errors.Is(err, access.ErrBadCredentials) {
					t.Fatalf("token %.20q…: %v", bad, err)
				}
			}
		})
	}
}

// TestHtpasswdRefusesNonBcrypt: distribution's htpasswd controller loads
// MD5 ($apr1$, what htpasswd writes without -B) and SHA-1 entries but never
// matches them; the policy refuses such a file at start, naming the users
// and the fix.
func TestHtpasswdRefusesNonBcrypt(t *testing.T) {
	t.Parallel()
	good := ngctest.WriteHtpasswd(t, "alice", "alice-pw")
	raw, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "htpasswd")
	content := string(raw) + "# a comment\n\nbob:$apr1$gmiCkWW9$Xi6Yr0ih1KFIQcOyIkiYX/\ncarol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n"
	if err := os.WriteFile(file, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{access.ModeHtpasswd, access.ModeToken} {
		_, err := access.New(access.Config{Mode: mode, HtpasswdFile: file}, nil)
		if err == nil {
			t.Fatalf("%s: a file with MD5 and SHA-1 hashes was accepted", mode)
		}
		for _, want := range []string{"bob (line 4: MD5", "carol (line 5: SHA-1", "htpasswd -B"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("%s: error %q lacks %q", mode, err, want)
			}
		}
		if strings.Contains(err.Error(), "alice") {
			t.Errorf("%s: error %q names a good entry", mode, err)
		}
	}
	if _, err := access.New(access.Config{Mode: access.ModeHtpasswd, HtpasswdFile: good}, nil); err != nil {
		t.Fatalf("bcrypt file refused: %v", err)
	}
}

// TestTokenEndpointErrors: the token endpoint's refusals are OCI error
// envelopes like every other error of the mirror: a POST (the OAuth2 form
// flow, not offered) gets 405 with Allow: GET, wrong credentials 401 with a
// Basic challenge; neither echoes the credentials sent.
func TestTokenEndpointErrors(t *testing.T) {
	t.Parallel()
	p, err := access.New(access.Config{Mode: access.ModeHtpasswd, HtpasswdFile: ngctest.WriteHtpasswd(t, "alice", "alice-pw")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		method, pass string
		status       int
		code, header string
	}{
		{http.MethodPost, "alice-pw", http.StatusMethodNotAllowed, "UNSUPPORTED", "Allow"},
		{http.MethodGet, "wrong-secret-pw", http.StatusUnauthorized, "UNAUTHORIZED", "WWW-Authenticate"},
	} {
		req := httptest.NewRequest(tc.method, "http://mirror/auth/token?service=ngc-mirror", strings.NewReader("grant_type=password"))
		req.SetBasicAuth("alice", tc.pass)
		rec := httptest.NewRecorder()
		p.TokenHandler().ServeHTTP(rec, req)
		var env struct {
			Errors []struct{ Code string } `json:"errors"`
		}
		if rec.Code != tc.status || json.Unmarshal(rec.Body.Bytes(), &env) != nil || len(env.Errors) != 1 || env.Errors[0].Code != tc.code {
			t.Fatalf("%s: %d %q, want %d with %s", tc.method, rec.Code, rec.Body.String(), tc.status, tc.code)
		}
		if !strings.HasPrefix(rec.Header().Get("Content-Type"), "application/json") || rec.Header().Get(tc.header) == "" {
			t.Fatalf("%s: headers %v", tc.method, rec.Header())
		}
		if strings.Contains(rec.Body.String(), tc.pass) {
			t.Fatalf("%s: the body echoes the password", tc.method)
		}
	}
}

// TestPassthroughLogin: a pass-through login at the token endpoint asks
// the upstream whether it takes the key (repository ""): a refused key
// gets 401 UNAUTHORIZED saying so, without echoing the key; when the
// upstream cannot answer the login still gets a token (each pull of a
// private repository is checked, and answers 503 meanwhile); the answer
// is cached like the pull checks.
func TestPassthroughLogin(t *testing.T) {
	t.Parallel()
	const good, bad, unsure = "nvapi-good-0123456789", "nvapi-bad-0123456789", "nvapi-unsure-0123456789"
	calls := map[string]int{}
	p, err := access.New(access.Config{Mode: access.ModePassthrough}, func(ctx context.Context, k, repo string) (bool, error) {
		calls[k+" "+repo]++
		if k == unsure {
			return false, errors.New("dial tcp: connection refused")
		}
		return k == good, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if status, _ := fetchToken(t, p, "$oauthtoken", good); status != http.StatusOK {
			t.Fatalf("good key: status %d", status)
		}
	}
	req := httptest.NewRequest(http.MethodGet, "http://mirror/auth/token?service=ngc-mirror", nil)
	req.SetBasicAuth("$oauthtoken", bad)
	rec := httptest.NewRecorder()
	p.TokenHandler().ServeHTTP(rec, req)
	var env struct {
		Errors []struct{ Code, Message string } `json:"errors"`
	}
	if rec.Code != http.StatusUnauthorized || json.Unmarshal(rec.Body.Bytes(), &env) != nil || len(env.Errors) != 1 ||
		env.Errors[0].Code != "UNAUTHORIZED" || !strings.Contains(env.Errors[0].Message, "refused this API key") {
		t.Fatalf("bad key: %d %q", rec.Code, rec.Body.String())
	}
	if strings.Contains(rec.Body.String(), bad) {
		t.Fatal("the answer echoes the key")
	}
	status, tok := fetchToken(t, p, "$oauthtoken", unsure)
	if status != http.StatusOK {
		t.Fatalf("upstream unreachable at login: status %d, want a token", status)
	}
	id, err := p.Authenticate(withToken(tok))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Authorize(t.Context(), id, ngctest.PrivateRepo); !errors.Is(err, access.ErrUnavailable) {
		t.Fatalf("pull with a key the upstream could not check: %v, want ErrUnavailable", err)
	}
	if calls[good+" "] != 1 || calls[bad+" "] != 1 {
		t.Fatalf("login checks %v, want one per key (cached)", calls)
	}
}

// TestPublicNamespaces: a namespace is a repository's first path component
// or, for a further upstream's qualified names, its first components;
// never a mere string prefix.
func TestPublicNamespaces(t *testing.T) {
	t.Parallel()
	p, err := access.New(access.Config{PublicNamespaces: []string{"nvidia", "docker.io/library", "ghcr.io"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for repo, want := range map[string]bool{
		"nvidia/pytorch":           true,
		"nvidia/k8s/dcgm-exporter": true,
		"nvidia-x/pytorch":         false,
		"myorg/nvidia":             false,
		"docker.io/library/ubuntu": true,
		"docker.io/bitnami/redis":  false,
		"docker.io/library-x/y":    false,
		"ghcr.io/org/img":          true,
		"ghcr.iox/org/img":         false,
	} {
		if got := p.Public(repo); got != want {
			t.Errorf("Public(%q) = %v, want %v", repo, got, want)
		}
	}
}
