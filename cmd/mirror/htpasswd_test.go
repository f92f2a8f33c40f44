package main

import (
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"

	"github.com/ngc-mirror/ngc-mirror/internal/access"
)

// TestHtpasswdLine: the line "mirror htpasswd" prints is one the mirror's
// htpasswd mode loads and logs the user in with (and refuses the wrong
// password); bad input is refused.
func TestHtpasswdLine(t *testing.T) {
	t.Parallel()
	line, err := htpasswdLine("alice", strings.NewReader("s3cret pass\r\nignored\n"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(file, []byte(line+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := access.New(access.Config{Mode: access.ModeHtpasswd, HtpasswdFile: file, PublicNamespaces: []string{"nvidia"}}, nil)
	if err != nil {
		t.Fatalf("the htpasswd file %q is refused: %v", line, err)
	}
	for pw, ok := range map[string]bool{"s3cret pass": true, "s3cret pass\r": false, "wrong": false} {
		r := httptest.NewRequest("GET", "/v2/", nil)
		r.SetBasicAuth("alice", pw)
		id, err := p.Authenticate(r)
		if got := err == nil && id.User == "alice"; got != ok {
			t.Errorf("password %q: user %q, err %v; want accepted %v", pw, id.User, err, ok)
		}
	}
	for _, c := range []struct{ user, in string }{
		{"", "pw\n"}, {"a:b", "pw\n"}, {"a b", "pw\n"}, {"bob", ""}, {"bob", "\n"}, {"bob", strings.Repeat("x", 73)},
	} {
		if l, err := htpasswdLine(c.user, strings.NewReader(c.in), bcrypt.MinCost); err == nil {
			t.Errorf("user %q, stdin %q: %q, want an error", c.user, c.in, l)
		}
	}
}
