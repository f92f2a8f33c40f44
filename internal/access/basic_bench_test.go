package access

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/crypto/bcrypt"
)

// BenchmarkBasicAuthenticate compares a Basic-auth request checked with
// bcrypt (htpasswd -B's default cost, 5, and Go's default, 10) against one
// answered from the remembered logins, as every blob GET of a client after
// its first is.
func BenchmarkBasicAuthenticate(b *testing.B) {
	for _, cost := range []int{5, bcrypt.DefaultCost} {
		h, err := bcrypt.GenerateFromPassword([]byte("pw"), cost)
		if err != nil {
			b.Fatal(err)
		}
		file := filepath.Join(b.TempDir(), "htpasswd")
		if err := os.WriteFile(file, []byte("alice:"+string(h)+"\n"), 0o600); err != nil {
			b.Fatal(err)
		}
		p, err := New(Config{Mode: ModeHtpasswd, HtpasswdFile: file}, nil)
		if err != nil {
			b.Fatal(err)
		}
		req, _ := http.NewRequest(http.MethodGet, "http://mirror/v2/", nil)
		req.SetBasicAuth("alice", "pw")
		for _, remembered := range []bool{false, true} {
			name := map[bool]string{false: "bcrypt", true: "remembered"}[remembered]
			b.Run(fmt.Sprintf("%s/cost=%d", name, cost), func(b *testing.B) {
				for b.Loop() {
					if !remembered {
						p.mu.Lock()
						clear(p.logins)
						p.mu.Unlock()
					}
					if _, err := p.Authenticate(req); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
