package ngctest

import (
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/crypto/bcrypt"
)

// WriteHtpasswd writes an htpasswd file (bcrypt, low cost: for tests) with
// the given user, password pairs into dir and returns its path.
func WriteHtpasswd(dir string, pairs ...string) (string, error) {
	var b strings.Builder
	for i := 0; i+1 < len(pairs); i += 2 {
		h, err := bcrypt.GenerateFromPassword([]byte(pairs[i+1]), bcrypt.MinCost)
		if err != nil {
			return "", err
		}
		b.WriteString(pairs[i] + ":" + string(h) + "\n")
	}
	p := filepath.Join(dir, "htpasswd")
	return p, os.WriteFile(p, []byte(b.String()), 0o600)
}
