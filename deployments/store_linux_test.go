package deployments

import (
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestModesIgnoreUmask deploys under a umask that would hide the code from
// the runner, and checks every path is still world-readable, owned by the
// agent's user, and without special bits.
func TestModesIgnoreUmask(t *testing.T) {
	old := unix.Umask(0o077)
	defer unix.Umask(old)
	tmp := t.TempDir()
	store, err := Open(filepath.Join(tmp, "apps"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	env := &testEnv{tmp: tmp, apps: filepath.Join(tmp, "apps"), store: store}
	env.deploy(t, "fn", "main.sh", goodArchive(t))

	err = filepath.WalkDir(env.apps, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(path)
		if err != nil {
			return err
		}
		mode := fi.Mode()
		switch {
		case mode&fs.ModeSymlink != 0:
		case mode.IsDir() && mode.Perm() != 0o755, mode.IsRegular() && mode.Perm()&0o044 != 0o044:
			t.Errorf("%s: mode %v is not readable by others", path, mode)
		case mode&(fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky) != 0:
			t.Errorf("%s: mode %v has special bits", path, mode)
		}
		if uid := fi.Sys().(*syscall.Stat_t).Uid; int(uid) != os.Getuid() {
			t.Errorf("%s: owned by uid %d, want the agent's %d", path, uid, os.Getuid())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
