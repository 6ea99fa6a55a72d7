package sandbox

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"
)

// cgroupDriver gives slots and executions their cgroups in one cgroup
// version's layout, under this agent instance's own parent cgroup.
type cgroupDriver interface {
	version() string
	// attach gives new slots what they need of the hierarchy before their
	// first execution: on v1 cgroups of their own with the slot's thread
	// inside (all slots of a batch moved one right after the other, so the
	// moves share the kernel's grace periods); on v2 nothing.
	attach(slots []*slot) error
	// detach removes what attach made, once the slot's thread has ended.
	detach(s *slot) error
	// acquire returns the cgroup an execution about to start in s runs
	// in, with its limits written; a limit the kernel refuses is an error.
	acquire(s *slot, limits resolvedLimits) (execCgroup, error)
	// close removes the instance's parent cgroup.
	close() error
}

// execCgroup is one execution's cgroup.
type execCgroup interface {
	// fd is the cgroup to be born into (CLONE_INTO_CGROUP), or -1 when the
	// forking thread is inside it already.
	fd() int
	// join moves a held process in, for when clone3 is refused.
	join(pid int) error
	signalAll(sig syscall.Signal) error
	// empty says, without waiting, that no process is left (a read error
	// counts as not empty).
	empty() bool
	// kill kills every process in the cgroup; none can fork meanwhile.
	kill() error
	waitEmpty(timeout time.Duration) error
	// usage reads the memory charged now and the CPU the execution used so
	// far (Usage.UID is the box's to fill in); only while the execution
	// is not over: a v1 slot's cgroups are the next execution's then.
	usage() (Usage, error)
	measure(res *Result)
	// release gets the cgroup ready for the slot's next execution (v1) or
	// removes it (v2). gone says the execution's processes were proven
	// gone; an error keeps the slot from being reused.
	release(gone bool) error
}

// cgroupLayout is where the cgroup hierarchies are mounted and where this
// agent sits in them, as read from mountinfo and /proc/self/cgroup.
type cgroupLayout struct {
	// v1 maps a controller to its hierarchy's mount point.
	v1 map[string]string
	// v2Mount is the cgroup2 mount point; v2Own is the agent's cgroup
	// relative to it ("" when the agent's cgroup is outside the mount).
	v2Mount, v2Own string
	// favorDynMods is set when the cgroup2 mount has the favordynmods
	// option. It switches the kernel's one cgroup_threadgroup_rwsem, which
	// every hierarchy's migrations take, v1's too, to its fast mode.
	favorDynMods bool
}

// mode is the version the sandbox uses: v1 as soon as the memory controller
// is on a v1 hierarchy (hybrid hosts), else v2 when mounted, else none.
func (l cgroupLayout) mode() string {
	switch {
	case l.v1["memory"] != "":
		return "v1"
	case l.v2Mount != "":
		return "v2"
	}
	return "none"
}

// detectLayout reads the layout from a process's mountinfo and cgroup
// membership.
func detectLayout(mounts []*procfs.MountInfo, own []procfs.Cgroup) cgroupLayout {
	l := cgroupLayout{v1: map[string]string{}}
	for _, m := range mounts {
		switch m.FSType {
		case "cgroup":
			for opt := range m.SuperOptions {
				if slices.Contains(v1Controllers, opt) || opt == "cpuacct" {
					if _, seen := l.v1[opt]; !seen {
						l.v1[opt] = m.MountPoint
					}
				}
			}
		case "cgroup2":
			if l.v2Mount != "" {
				continue
			}
			l.v2Mount = m.MountPoint
			_, l.favorDynMods = m.SuperOptions["favordynmods"]
			for _, c := range own {
				if c.HierarchyID == 0 && len(c.Controllers) == 0 {
					l.v2Own = pathInMount(c.Path, m.Root)
				}
			}
		}
	}
	return l
}

// pathInMount turns a cgroup path into one relative to a mount whose root
// is root; "" when the path is not visible through that mount.
func pathInMount(p, root string) string {
	if root == "/" {
		return p
	}
	if p == root {
		return "/"
	}
	if rest, ok := strings.CutPrefix(p, root+"/"); ok {
		return "/" + rest
	}
	return ""
}

// openCgroups finds a cgroup hierarchy this agent can write and removes
// what crashed agents left in it, or says why there is none. cheapMoves
// says whether moving a process between cgroups is cheap on this host (see
// Isolation.CheapCgroupMoves).
func openCgroups(cfg Config, instance string, proc procfs.FS, self int, log *slog.Logger) (drv cgroupDriver, cheapMoves bool, reason string) {
	if cfg.noCgroups {
		return nil, false, "cgroups disabled"
	}
	// Not root is not checked here: a delegated v2 subtree is writable
	// without it, and elsewhere the mkdir says "permission denied".
	mounts, err := proc.GetProcMounts(self)
	if err != nil {
		return nil, false, fmt.Sprintf("reading mounts: %v", err)
	}
	me, err := proc.Proc(self)
	if err != nil {
		return nil, false, fmt.Sprintf("reading own cgroup: %v", err)
	}
	own, err := me.Cgroups()
	if err != nil {
		return nil, false, fmt.Sprintf("reading own cgroup: %v", err)
	}
	layout := detectLayout(mounts, own)
	cheapMoves = layout.favorDynMods || favorDynModsBooted(proc)
	switch layout.mode() {
	case "v1":
		drv, err = openCgroupV1(layout, cfg.CgroupRoot, instance, self, log)
	case "v2":
		drv, err = openCgroupV2(layout, cfg.CgroupRoot, instance, log)
	default:
		return nil, false, "no cgroup hierarchy is mounted"
	}
	if err != nil {
		return nil, false, fmt.Sprintf("cgroup %s: %v", layout.mode(), err)
	}
	return drv, cheapMoves, ""
}

// favorDynModsBooted says whether the kernel was booted with
// cgroup_favordynmods=true (Linux 6.7+), which makes every hierarchy
// mounted since favour dynamic modifications.
func favorDynModsBooted(proc procfs.FS) bool {
	args, err := proc.CmdLine()
	if err != nil {
		return false
	}
	for _, arg := range args {
		if v, ok := strings.CutPrefix(arg, "cgroup_favordynmods="); ok {
			on, err := strconv.ParseBool(v)
			return err == nil && on
		}
	}
	return false
}

// removeStaleInstances removes the instance cgroups under parent whose
// agents are gone, killing what still runs in them with killTree.
func removeStaleInstances(parent string, killTree func(dir string) error, log *slog.Logger) {
	entries, err := os.ReadDir(parent)
	if err != nil {
		return
	}
	for _, e := range entries {
		if !e.IsDir() || instanceAlive(e.Name()) {
			continue
		}
		dir := filepath.Join(parent, e.Name())
		err := errors.Join(killTree(dir), removeTree(dir))
		if err != nil {
			log.Warn("removing a crashed agent's cgroup", "cgroup", dir, "err", err)
		} else {
			log.Info("removed a crashed agent's cgroup", "cgroup", dir)
		}
	}
}

// removeTree removes a cgroup and its descendants, deepest first.
func removeTree(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		if e.IsDir() {
			errs = append(errs, removeTree(filepath.Join(dir, e.Name())))
		}
	}
	return errors.Join(append(errs, rmdirCgroup(dir, emptyTimeout))...)
}

// rmdirCgroup removes an empty cgroup; it retries while the kernel still
// counts exiting tasks (EBUSY).
func rmdirCgroup(dir string, timeout time.Duration) error {
	return poll(timeout, func() (bool, error) {
		err := unix.Rmdir(dir)
		switch {
		case err == nil, errors.Is(err, unix.ENOENT):
			return true, nil
		case errors.Is(err, unix.EBUSY):
			return false, nil
		}
		return false, &os.PathError{Op: "rmdir", Path: dir, Err: err}
	})
}

// writeCgroupFile writes one value to an existing cgroup file.
func writeCgroupFile(dir, name, value string) error {
	p := filepath.Join(dir, name)
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		if pe := (*os.PathError)(nil); errors.As(err, &pe) {
			err = pe.Err
		}
		return fmt.Errorf("write %q to %s: %w", value, p, err)
	}
	return nil
}

func readCgroupFile(dir, name string) ([]byte, error) {
	return os.ReadFile(filepath.Join(dir, name))
}

// readProcs lists the processes in a cgroup.
func readProcs(dir string) ([]int, error) {
	b, err := readCgroupFile(dir, "cgroup.procs")
	if err != nil {
		return nil, err
	}
	return parseProcs(bytes.NewReader(b))
}

// parseProcs parses cgroup.procs or tasks: one id a line.
func parseProcs(r io.Reader) ([]int, error) {
	var pids []int
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		pid, err := strconv.Atoi(line)
		if err != nil {
			return nil, fmt.Errorf("pid %q: %w", line, err)
		}
		pids = append(pids, pid)
	}
	return pids, sc.Err()
}

// parseFlatKeyed parses the "key value" lines of memory.events, cpu.stat,
// cgroup.events, memory.oom_control and the like.
func parseFlatKeyed(r io.Reader) (map[string]uint64, error) {
	out := map[string]uint64{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		if len(fields) != 2 {
			return nil, fmt.Errorf("line %q: want \"key value\"", sc.Text())
		}
		v, err := strconv.ParseUint(fields[1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("line %q: %w", sc.Text(), err)
		}
		out[fields[0]] = v
	}
	return out, sc.Err()
}

// parseUint parses a file holding one number, such as memory.peak.
func parseUint(r io.Reader) (uint64, error) {
	b, err := io.ReadAll(r)
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("value %q: %w", s, err)
	}
	return v, nil
}

func readFlatKeyed(dir, name string) (map[string]uint64, error) {
	b, err := readCgroupFile(dir, name)
	if err != nil {
		return nil, err
	}
	m, err := parseFlatKeyed(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, name), err)
	}
	return m, nil
}

func readUint(dir, name string) (uint64, error) {
	b, err := readCgroupFile(dir, name)
	if err != nil {
		return 0, err
	}
	v, err := parseUint(bytes.NewReader(b))
	if err != nil {
		return 0, fmt.Errorf("%s: %w", filepath.Join(dir, name), err)
	}
	return v, nil
}

// signalProcs sends sig to every process listed in dir's cgroup.procs but
// except (the agent itself, listed on v1 because a thread of it sits in the
// slot's cgroups; 0 for none).
func signalProcs(dir string, sig syscall.Signal, except int) error {
	pids, err := readProcsExcept(dir, except)
	if err != nil {
		return err
	}
	var errs []error
	for _, pid := range pids {
		errs = append(errs, ignoreESRCH(unix.Kill(pid, sig)))
	}
	return errors.Join(errs...)
}

// readProcsExcept lists the processes in a cgroup but except.
func readProcsExcept(dir string, except int) ([]int, error) {
	pids, err := readProcs(dir)
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(pids, func(pid int) bool { return pid == except }), nil
}

// joinCgroupPath joins a mount point and a cgroup path, refusing a path
// that climbs out of the mount.
func joinCgroupPath(mount, cgroupPath string) (string, error) {
	if slices.Contains(strings.Split(cgroupPath, "/"), "..") {
		return "", fmt.Errorf("cgroup path %q climbs out of %s", cgroupPath, mount)
	}
	return filepath.Join(mount, cgroupPath), nil
}

// freezer freezes and thaws one cgroup (with its descendants) in its
// version's way.
type freezer struct {
	freeze, thaw func() error
	frozen       func() (bool, error)
}

// freezeTimeout bounds waiting for a cgroup to freeze; a task in
// uninterruptible sleep can hold it back, and is killed all the same.
const freezeTimeout = time.Second

// freezeKillThaw kills every process in dirs (but except) while they are
// frozen, so none can fork meanwhile, then thaws them so the kills take
// effect. dirs is called once frozen, to see every descendant. A cgroup
// that vanished meanwhile (its processes gone) is no error.
func freezeKillThaw(f freezer, dirs func() []string, except int) error {
	if err := f.freeze(); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	frozenErr := poll(freezeTimeout, f.frozen)
	var errs []error
	for _, d := range dirs() {
		if err := signalProcs(d, unix.SIGKILL, except); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := f.thaw(); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return errors.Join(err, frozenErr)
	}
	return nil // killed, even if not everything froze in time
}

// cgroupTree lists dir and every cgroup below it.
func cgroupTree(dir string) []string {
	dirs := []string{dir}
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() && p != dir {
			dirs = append(dirs, p)
		}
		return nil
	})
	return dirs
}

// cgroupFiles keeps cgroup files open for reads and writes at offset 0,
// which cost one system call each instead of an open, a read or write and
// a close: a slot's cgroups are read and written at every execution.
// cgroup.procs is never kept: v1 lists its pids once per open file.
type cgroupFiles struct {
	mu  sync.Mutex
	fds map[string]int
	buf [512]byte
}

// fd opens path for reading, or for writing (a file may be kept open
// twice: some are read and written).
func (c *cgroupFiles) fd(path string, write bool) (int, error) {
	key, flags := "r:"+path, unix.O_RDONLY
	if write {
		key, flags = "w:"+path, unix.O_WRONLY
	}
	if fd, ok := c.fds[key]; ok {
		return fd, nil
	}
	fd, err := unix.Open(path, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: path, Err: err}
	}
	if c.fds == nil {
		c.fds = map[string]int{}
	}
	c.fds[key] = fd
	return fd, nil
}

// read returns the file's content (at most 512 bytes, which every file
// the sandbox reads this way fits in); the slice is valid until the next
// call.
func (c *cgroupFiles) read(dir, name string) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	path := filepath.Join(dir, name)
	fd, err := c.fd(path, false)
	if err != nil {
		return nil, err
	}
	n, err := unix.Pread(fd, c.buf[:], 0)
	if err != nil {
		return nil, &os.PathError{Op: "read", Path: path, Err: err}
	}
	return bytes.Clone(c.buf[:n]), nil
}

func (c *cgroupFiles) write(dir, name, value string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	path := filepath.Join(dir, name)
	fd, err := c.fd(path, true)
	if err != nil {
		return err
	}
	if _, err := unix.Pwrite(fd, []byte(value), 0); err != nil {
		return fmt.Errorf("write %q to %s: %w", value, path, err)
	}
	return nil
}

func (c *cgroupFiles) readUint(dir, name string) (uint64, error) {
	b, err := c.read(dir, name)
	if err != nil {
		return 0, err
	}
	v, err := parseUint(bytes.NewReader(b))
	if err != nil {
		return 0, fmt.Errorf("%s: %w", filepath.Join(dir, name), err)
	}
	return v, nil
}

func (c *cgroupFiles) readFlatKeyed(dir, name string) (map[string]uint64, error) {
	b, err := c.read(dir, name)
	if err != nil {
		return nil, err
	}
	m, err := parseFlatKeyed(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, name), err)
	}
	return m, nil
}

func (c *cgroupFiles) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, fd := range c.fds {
		_ = unix.Close(fd)
	}
	c.fds = nil
}
