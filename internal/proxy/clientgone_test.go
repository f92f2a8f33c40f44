package proxy_test

import (
	"bufio"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

// deafListener hands out connections that do not see their client leave on
// the read side (deafConn), with a small send buffer, so that a body being
// sent is still mostly unsent when the client goes.
type deafListener struct{ net.Listener }

func (l deafListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tc := c.(*net.TCPConn)
	_ = tc.SetWriteBuffer(16 << 10)
	return &deafConn{TCPConn: tc, closed: make(chan struct{})}, nil
}

// deafConn holds back a read's error (the client's close or reset), but
// not a deadline's, until the server closes the connection or ends its
// reads with a past deadline. net/http's background read then never
// cancels the request's context, and the server learns that the client
// left only from a failing write: one side of the race between the two
// that a real client leaving can take either way.
type deafConn struct {
	*net.TCPConn // its ReadFrom (sendfile) stays what net/http uses
	closed       chan struct{}
	once         sync.Once
}

func (c *deafConn) Read(p []byte) (int, error) {
	n, err := c.TCPConn.Read(p)
	var ne net.Error
	if err != nil && n == 0 && !(errors.As(err, &ne) && ne.Timeout()) {
		<-c.closed // a deadline (net/http ending its background read) is not held
	}
	return n, err
}

func (c *deafConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.TCPConn.Close()
}

// SetReadDeadline releases a held read when t is past: net/http ending the
// background read after the handler.
func (c *deafConn) SetReadDeadline(t time.Time) error {
	if !t.IsZero() && t.Before(time.Now()) {
		c.once.Do(func() { close(c.closed) })
	}
	return c.TCPConn.SetReadDeadline(t)
}

// TestClientLeavingMidBlobIsNotAWarning: a client that resets its
// connection in the middle of a cached blob (sent with sendfile) is logged
// at debug level, not as a warning, even when the server sees it as a
// failed write before its context ends. An upstream that cuts a blob off
// mid-body is still a warning.
func TestClientLeavingMidBlobIsNotAWarning(t *testing.T) {
	t.Parallel()
	var logs lockedBuffer
	e := newEnv(t, envOpts{layerSize: 1 << 20, verifyBefore: -1, log: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	path := "/v2/nvidia/cuda/blobs/" + e.fx.CUDA.Layers[0].Digest.String()
	mustServe(t, e, path, e.fx.CUDA.Layers[0].Body) // cached now

	srv := httptest.NewUnstartedServer(e.mirror.Config.Handler)
	srv.Listener = deafListener{srv.Listener}
	srv.Start()
	defer srv.Close()
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { _ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4<<10) })
	}}
	c, err := d.DialContext(t.Context(), "tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("GET " + path + " HTTP/1.1\r\nHost: mirror\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET: %v %v", resp, err)
	}
	_ = c.(*net.TCPConn).SetLinger(0) // a reset, with most of the blob unsent
	_ = c.Close()

	// Close waits for the handler, which ends once its write fails.
	srv.Close()
	if w := logs.lines("level=WARN"); len(w) != 0 {
		t.Fatalf("a client leaving was logged as a warning: %q", w)
	}
	if len(logs.lines("level=DEBUG msg=\"client went away mid-blob\"")) != 1 {
		t.Fatalf("no debug line for the client leaving:\n%s", logs.String())
	}

	// The upstream cuts a transfer of another blob off once the client
	// has its headers, and then fails.
	layer := e.fx.CUDA.Layers[1]
	cut := make(chan struct{})
	var first sync.Once
	e.up.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !e.up.IsCDN(r) {
			return false
		}
		isFirst := false
		first.Do(func() { isFirst = true })
		if !isFirst {
			return ngctest.FailWith(http.StatusInternalServerError)(w, r)
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(layer.Body)))
		_, _ = w.Write(layer.Body[:1000])
		http.NewResponseController(w).Flush()
		<-cut
		panic(http.ErrAbortHandler)
	})
	resp, err = http.Get(e.url("/v2/nvidia/cuda/blobs/" + layer.Digest.String()))
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET: %v %v", resp, err)
	}
	close(cut)
	if _, err := io.Copy(io.Discard, resp.Body); err == nil {
		t.Fatal("a blob cut off upstream was served whole")
	}
	resp.Body.Close()
	e.mirror.Close() // waits for the handler
	if len(logs.lines("level=WARN msg=\"aborting blob response\"")) != 1 {
		t.Fatalf("an upstream failure mid-blob is not a warning:\n%s", logs.String())
	}
}
