package dirlock

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// TestMain runs the helper holder when re-executed by a test: it takes the
// lock of DIRLOCK_TEST_HOLD, says so on stdout and holds it until killed.
func TestMain(m *testing.M) {
	if dir := os.Getenv("DIRLOCK_TEST_HOLD"); dir != "" {
		if _, err := Acquire(dir); err != nil {
			os.Stdout.WriteString("error: " + err.Error() + "\n")
			os.Exit(1)
		}
		os.Stdout.WriteString("locked\n")
		select {}
	}
	os.Exit(m.Run())
}

// TestHeldByAnotherProcess: while another process holds a directory's
// lock, Acquire refuses with its PID; once that process is killed (no
// clean release), the lock is free again.
func TestHeldByAnotherProcess(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "DIRLOCK_TEST_HOLD="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p, err := testsupport.Start(t, cmd, os.Kill)
	if err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "locked\n" {
		t.Fatalf("holder: %q %v", line, err)
	}

	_, err = Acquire(dir)
	var held *HeldError
	if !errors.As(err, &held) {
		t.Fatalf("Acquire while another process holds the lock: %v, want a HeldError", err)
	}
	if held.PID != cmd.Process.Pid {
		t.Errorf("HeldError names PID %d, the holder is %d", held.PID, cmd.Process.Pid)
	}

	p.Kill()
	l, err := Acquire(dir)
	if err != nil {
		t.Fatalf("Acquire after the holder was killed: %v", err)
	}
	// Within one process too, a second Acquire is refused until Release.
	if _, err := Acquire(dir); !errors.As(err, &held) || held.PID != os.Getpid() {
		t.Fatalf("second Acquire in the holding process: %v", err)
	}
	if err := l.Release(); err != nil {
		t.Fatal(err)
	}
	l, err = Acquire(dir)
	if err != nil {
		t.Fatalf("Acquire after Release: %v", err)
	}
	_ = l.Release()
}

// TestReadOnlyDirectory: an existing lock file in a directory this process
// may not write is still locked; without one, Acquire says ErrUnlockable.
func TestReadOnlyDirectory(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root writes a mode 0500 directory anyway; the read-only disk is covered by the e2e TestReadOnlyDataDir")
	}
	dir := t.TempDir()
	l, err := Acquire(dir)
	if err != nil {
		t.Fatal(err)
	}
	_ = l.Release()
	if err := os.Chmod(dir, 0o500); err != nil {
		t.Fatal(err)
	}
	defer os.Chmod(dir, 0o700)
	if err := os.Chmod(dir+"/"+Name, 0o400); err != nil {
		t.Fatal(err)
	}
	l, err = Acquire(dir)
	if err != nil {
		t.Fatalf("Acquire with a read-only lock file: %v", err)
	}
	_ = l.Release()

	empty := t.TempDir()
	if err := os.Chmod(empty, 0o500); err != nil {
		t.Fatal(err)
	}
	defer os.Chmod(empty, 0o700)
	if _, err := Acquire(empty); !errors.Is(err, ErrUnlockable) {
		t.Fatalf("Acquire in a read-only directory without a lock file: %v, want ErrUnlockable", err)
	}
}
