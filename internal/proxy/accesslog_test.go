package proxy_test

import (
	"bytes"
	"encoding/base64"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/access"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

// lockedBuffer is a log sink safe for the handler's goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) lines(substr string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for _, l := range strings.Split(b.buf.String(), "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return out
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestAccessLog: with the access log on, every registry request gets one
// info line with method, route kind, repository, reference, status, bytes,
// duration, cache result and the client (user, else IP), and no
// credential, token or key; with it off, nothing at info level.
func TestAccessLog(t *testing.T) {
	t.Parallel()
	pol := policy(t, access.Config{
		Mode:             access.ModeHtpasswd,
		HtpasswdFile:     ngctest.WriteHtpasswd(t, "alice", "alice-pw"),
		PublicNamespaces: []string{"nvidia"},
		Rules:            []access.Rule{{Repositories: []string{"myorg/**"}, Users: []string{"alice"}}},
	}, nil)
	var logs lockedBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	e := newEnv(t, envOpts{key: ngctest.APIKey, access: pol, log: log, accessLog: true})
	priv := "/v2/" + ngctest.PrivateRepo + "/manifests/" + ngctest.PrivateTag
	layer := e.fx.Private.Layers[0]

	mustOK(t, e.doAs(t, "alice", "alice-pw", http.MethodGet, priv), 200)
	mustOK(t, e.doAs(t, "alice", "alice-pw", http.MethodGet, priv), 200)
	mustOK(t, e.doAs(t, "alice", "alice-pw", http.MethodGet, "/v2/"+ngctest.PrivateRepo+"/blobs/"+layer.Digest.String()), 200)
	if r := e.doAs(t, "", "", http.MethodGet, priv+"?ns=nvcr.io&x-token=query-secret"); r.status != 401 {
		t.Fatalf("anonymous: %d", r.status)
	}
	if r := e.doAs(t, "alice", "wrong", http.MethodGet, "/v2/_catalog"); r.status != 404 {
		t.Fatalf("catalog: %d", r.status)
	}

	lines := logs.lines("msg=request")
	if len(lines) != 5 {
		t.Fatalf("%d access log lines, want 5:\n%s", len(lines), logs.String())
	}
	for i, want := range [][]string{
		{"level=INFO", "method=GET", "route=manifest", "repository=" + ngctest.PrivateRepo, "reference=" + ngctest.PrivateTag, "status=200", "cache=miss", "client=alice", "duration="},
		{"route=manifest", "status=200", "cache=hit", "client=alice"},
		{"route=blob", "reference=" + layer.Digest.String(), "status=200", "bytes=" + itoa(len(layer.Body)), "cache=miss", "client=alice"},
		{"repository=" + ngctest.PrivateRepo, "status=401", "ns=nvcr.io", "client=127.0.0.1"},
		{"route=other", "path=/v2/_catalog", "status=404", "client=127.0.0.1"},
	} {
		for _, w := range want {
			if !strings.Contains(lines[i], w) {
				t.Errorf("line %d lacks %q: %s", i, w, lines[i])
			}
		}
	}
	all := logs.String()
	secrets := append([]string{ngctest.APIKey, "alice-pw", "wrong", base64.StdEncoding.EncodeToString([]byte("alice:alice-pw")), "query-secret"}, e.up.Tokens()...)
	for _, s := range secrets {
		if strings.Contains(all, s) {
			t.Errorf("the log holds %.8q…", s)
		}
	}

	// Off: nothing at info level (the same line is written at debug).
	var quiet lockedBuffer
	q := newEnv(t, envOpts{log: slog.New(slog.NewTextHandler(&quiet, &slog.HandlerOptions{Level: slog.LevelInfo}))})
	mustOK(t, q.do(t, http.MethodGet, "/v2/"+ngctest.PytorchRepo+"/manifests/"+ngctest.PytorchTag), 200)
	if l := quiet.lines("msg=request"); len(l) != 0 {
		t.Errorf("access log off, yet: %q", l)
	}
}
