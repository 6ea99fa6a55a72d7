package sandbox

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The layout of a slot's tmpfs, mounted at /tmp in the slot's own mount
// namespace: one filesystem, so one size bound, seen by functions as /tmp,
// /var/tmp and /dev/shm; and the slot's passwd file. Its root is covered by
// the bind of tmpfsTmp onto /tmp, so no function can reach the rest.
const (
	tmpfsTmp    = "t"
	tmpfsVarTmp = "v"
	tmpfsShm    = "s"
	tmpfsEtc    = "e"
)

// functionUserName is the name functions find for their uid (whoami, git,
// getpass): one name for every slot, since each sees only its own entry.
const functionUserName = "flux-fn"

// mountPlan is what a slot's mount namespace gets.
type mountPlan struct {
	tmpSize int64
	// passwd replaces /etc/passwd when not nil.
	passwd []byte
	// masks are paths that must read as empty.
	masks []string
}

// setupMounts turns the calling thread's fresh mount namespace into a
// slot's: mounts coming from the host still propagate in, but nothing made
// here goes out; a private tmpfs for the temporary dirs; a passwd with the
// function's user; a /proc that shows a function only its own processes;
// masks over the agent's files. The thread must have unshared CLONE_FS and
// CLONE_NEWNS.
// It returns a descriptor of the tmpfs (O_PATH), which tells from any
// thread how much of it is in use.
func setupMounts(plan mountPlan) (tmpFD int, err error) {
	tmpFD = -1
	defer func() {
		if err != nil && tmpFD >= 0 {
			_ = unix.Close(tmpFD)
			tmpFD = -1
		}
	}()
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		return -1, fmt.Errorf("mount namespace: making / a slave: %w", err)
	}
	opts := "mode=0755"
	if plan.tmpSize > 0 {
		// An inode per 4 KiB page: a function cannot pin memory in
		// empty files past what the size allows.
		inodes := max(1024, plan.tmpSize/4096)
		opts += ",size=" + strconv.FormatInt(plan.tmpSize, 10) + ",nr_inodes=" + strconv.FormatInt(inodes, 10)
	}
	if err := unix.Mount("tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		return -1, fmt.Errorf("private /tmp: %w", err)
	}
	if tmpFD, err = unix.Open("/tmp", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err != nil {
		return -1, fmt.Errorf("private /tmp: %w", err)
	}
	for _, d := range []string{tmpfsTmp, tmpfsVarTmp, tmpfsShm} {
		p := filepath.Join("/tmp", d)
		if err := os.Mkdir(p, 0o755); err != nil {
			return tmpFD, err
		}
		if err := os.Chmod(p, 0o777|os.ModeSticky); err != nil {
			return tmpFD, err
		}
	}
	if err := os.Mkdir(filepath.Join("/tmp", tmpfsEtc), 0o755); err != nil {
		return tmpFD, err
	}
	binds := []struct{ src, dst string }{
		{tmpfsVarTmp, "/var/tmp"},
		{tmpfsShm, "/dev/shm"},
	}
	if plan.passwd != nil {
		p := filepath.Join("/tmp", tmpfsEtc, "passwd")
		if err := os.WriteFile(p, plan.passwd, 0o644); err != nil {
			return tmpFD, err
		}
		binds = append(binds, struct{ src, dst string }{filepath.Join(tmpfsEtc, "passwd"), "/etc/passwd"})
	}
	// The tmp dir itself last: it covers the tmpfs's root.
	binds = append(binds, struct{ src, dst string }{tmpfsTmp, "/tmp"})
	for _, b := range binds {
		if _, err := os.Stat(b.dst); errors.Is(err, os.ErrNotExist) {
			continue // a host without /var/tmp or /dev/shm
		}
		if err := unix.Mount(filepath.Join("/tmp", b.src), b.dst, "", unix.MS_BIND, ""); err != nil {
			return tmpFD, fmt.Errorf("private %s: %w", b.dst, err)
		}
	}
	// hidepid=2 (invisible): processes of other uids are not even listed.
	if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "hidepid=2"); err != nil {
		return tmpFD, fmt.Errorf("private /proc: %w", err)
	}
	for _, m := range plan.masks {
		if err := mask(m); err != nil {
			return tmpFD, fmt.Errorf("masking %s: %w", m, err)
		}
	}
	return tmpFD, nil
}

// mask makes path read as empty: /dev/null over a file, an empty read-only
// tmpfs over a directory.
func mask(path string) error {
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return unix.Mount("tmpfs", path, "tmpfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "size=4k,mode=0555")
	}
	if err := unix.Mount(os.DevNull, path, "", unix.MS_BIND, ""); err != nil {
		return err
	}
	return unix.Mount("", path, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, "")
}

// tmpUsage is how much of a slot's tmpfs is in use.
func tmpUsage(fd int) (inodes, blocks uint64, err error) {
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return 0, 0, err
	}
	return st.Files - st.Ffree, st.Blocks - st.Bfree, nil
}

// scrubTmp removes everything a function left in its temporary dirs; it
// runs on the slot's thread, once no process of the execution is left.
func scrubTmp() error {
	var errs []error
	for _, dir := range []string{"/tmp", "/var/tmp", "/dev/shm"} {
		entries, err := os.ReadDir(dir)
		if err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
			continue
		}
		for _, e := range entries {
			errs = append(errs, os.RemoveAll(filepath.Join(dir, e.Name())))
		}
	}
	return errors.Join(errs...)
}

// passwdWith is the host's passwd with the function's user added: every
// entry kept but one holding the function's uid or name, so that the uid
// maps to exactly one name.
func passwdWith(host []byte, uid, gid uint32) []byte {
	var out bytes.Buffer
	sc := bufio.NewScanner(bytes.NewReader(host))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	uidText := strconv.FormatUint(uint64(uid), 10)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Split(line, ":")
		if len(fields) >= 3 && (fields[0] == functionUserName || fields[2] == uidText) {
			continue
		}
		out.WriteString(line)
		out.WriteByte('\n')
	}
	fmt.Fprintf(&out, "%s:x:%d:%d:Flux function:%s:/usr/sbin/nologin\n", functionUserName, uid, gid, privateTmp)
	return out.Bytes()
}
