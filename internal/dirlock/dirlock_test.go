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
// As root (CI) the directories are tmpfs mounts remounted read-only (root
// writes a mode 0500 directory anyway); otherwise mode 0500.
func TestReadOnlyDirectory(t *testing.T) {
	dir := t.TempDir()
	mountTmpfs(t, dir)
	l, err := Acquire(dir)
	if err != nil {
		t.Fatal(err)
	}
	_ = l.Release()
	makeReadOnly(t, dir, Name)
	l, err = Acquire(dir)
	if err != nil {
		t.Fatalf("Acquire with a read-only lock file: %v", err)
	}
	_ = l.Release()

	empty := t.TempDir()
	mountTmpfs(t, empty)
	makeReadOnly(t, empty)
	if _, err := Acquire(empty); !errors.Is(err, ErrUnlockable) {
		t.Fatalf("Acquire in a read-only directory without a lock file: %v, want ErrUnlockable", err)
	}
}

// mountTmpfs mounts a small tmpfs on dir when running as root (unmounted
// at the end of the test), so that makeReadOnly can remount it read-only.
func mountTmpfs(t *testing.T, dir string) {
	t.Helper()
	if os.Geteuid() != 0 {
		return
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs on %s: %v %s", dir, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", dir).Run() })
}

// makeReadOnly makes dir, and the files named in it, unwritable for this
// process: as root a read-only remount of its tmpfs, else modes 0500/0400.
func makeReadOnly(t *testing.T, dir string, files ...string) {
	t.Helper()
	if os.Geteuid() == 0 {
		if out, err := exec.Command("mount", "-o", "remount,ro", dir).CombinedOutput(); err != nil {
			t.Fatalf("remount %s read-only: %v %s", dir, err, out)
		}
		return
	}
	for _, f := range files {
		if err := os.Chmod(dir+"/"+f, 0o400); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(dir, 0o500); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Chmod(dir, 0o700) })
}
