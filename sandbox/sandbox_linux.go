package sandbox

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"
)

// scratchEnvKeys name the scratch dir in the function's environment.
var scratchEnvKeys = []string{"TMPDIR"}

func envKeyEqual(a, b string) bool { return a == b }

// runner is the unprivileged user functions run as.
type runner struct {
	name     string
	uid, gid uint32
}

// host is the Linux containment: a process group always, a cgroup
// hierarchy and a runner user when the host allows them.
type host struct {
	cgroups cgroupDriver // nil: no writable cgroup
	runner  *runner      // nil: run as the agent itself
	uids    *uidPool     // nil: every execution runs as runner.uid
	pids    int64
	proc    procfs.FS
}

func newHost(cfg Config, instance string) (*host, Isolation, error) {
	proc, err := procfs.NewFS("/proc")
	if err != nil {
		return nil, Isolation{}, fmt.Errorf("procfs: %w", err)
	}
	if err := closeInheritedFDs(); err != nil {
		return nil, Isolation{}, err
	}
	h := &host{pids: cfg.PidsLimit, proc: proc}
	iso := Isolation{Cgroup: "none", UID: os.Geteuid()}
	if u, err := user.Current(); err == nil {
		iso.User = u.Username
	}
	root := os.Geteuid() == 0

	switch {
	case cfg.User == "":
		iso.Degraded = append(iso.Degraded, "no user configured: functions run as the agent's own user")
	case !root:
		iso.Degraded = append(iso.Degraded, fmt.Sprintf("agent is not root: cannot run functions as %q, they run as the agent's own user", cfg.User))
	default:
		r, err := lookupRunner(cfg.User)
		if err != nil {
			iso.Degraded = append(iso.Degraded, fmt.Sprintf("%v: functions run as the agent's own user", err))
			break
		}
		h.runner = r
		iso.User, iso.UID = r.name, int(r.uid)
	}

	drv, reason := openCgroups(cfg, instance, proc, cfg.Logger)
	if drv == nil {
		iso.Degraded = append(iso.Degraded, reason+": no memory, cpu or pids limits, and a kill reaches only the process group")
	} else {
		h.cgroups = drv
		iso.Cgroup = drv.version()
	}
	if cfg.UIDs.Count > 0 {
		// A uid goes back to the pool only when a cgroup proved its
		// processes gone; without a runner or cgroups there is no such
		// proof (or no setuid at all).
		switch {
		case h.runner == nil || h.cgroups == nil:
			iso.Degraded = append(iso.Degraded, "per-execution uids need root, the runner user and cgroups: executions share one uid")
		default:
			pool, err := newUIDPool(cfg.UIDs)
			if err != nil {
				return nil, Isolation{}, err
			}
			h.uids = pool
			iso.UIDRange = cfg.UIDs
		}
	}
	return h, iso, nil
}

// closeInheritedFDs marks every descriptor above stderr close-on-exec. Go
// does so for what it opens itself, not for what the agent inherited (a
// supervisor's socket, a leaked log file): without this, every function
// would get those too, whatever its user.
func closeInheritedFDs() error {
	if err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err == nil {
		return nil
	}
	// Kernels before 5.11: one by one.
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fmt.Errorf("inherited descriptors: %w", err)
	}
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < 3 {
			continue
		}
		// The directory's own descriptor is gone by now: EBADF is fine.
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); err != nil && !errors.Is(err, unix.EBADF) {
			return fmt.Errorf("inherited descriptor %d: %w", fd, err)
		}
	}
	return nil
}

func lookupRunner(name string) (*runner, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return nil, fmt.Errorf("user %q: %w", name, err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("user %q: uid %q: %w", name, u.Uid, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("user %q: gid %q: %w", name, u.Gid, err)
	}
	if uid == 0 {
		return nil, fmt.Errorf("user %q has uid 0", name)
	}
	return &runner{name: u.Username, uid: uint32(uid), gid: uint32(gid)}, nil
}

func (h *host) close() error {
	if h.cgroups == nil {
		return nil
	}
	return h.cgroups.close()
}

// acquireUID picks the uid an execution runs as: its own from the range,
// or the runner's.
func (h *host) acquireUID() (uint32, error) {
	switch {
	case h.runner == nil:
		return 0, nil
	case h.uids == nil:
		return h.runner.uid, nil
	}
	return h.uids.acquire()
}

// releaseUID returns a uid once no process of its execution is left.
func (h *host) releaseUID(uid uint32) {
	if h.uids != nil {
		h.uids.release(uid)
	}
}

func (h *host) ownScratch(dir string, uid uint32) error {
	if h.runner == nil {
		return nil
	}
	if err := os.Chown(dir, int(uid), int(h.runner.gid)); err != nil {
		return fmt.Errorf("chown to %s: %w", h.runner.name, err)
	}
	return nil
}

// box is one execution's containment.
type box struct {
	pid    int // also the process group id
	cgroup execCgroup
	proc   procfs.FS
	uid    uint32
	uids   *uidPool // gets uid back once the tree is confirmed gone
	empty  bool     // waitEmpty confirmed it
}

// start starts cmd in its own process group, as the runner, with
// no_new_privs, inside a new cgroup named name.
func (h *host) start(cmd *exec.Cmd, name string, limits Limits, uid uint32) (*box, error) {
	attr := &syscall.SysProcAttr{Setpgid: true}
	if h.runner != nil {
		attr.Credential = &syscall.Credential{
			Uid:    uid,
			Gid:    h.runner.gid,
			Groups: []uint32{}, // setgroups(0): no supplementary groups
		}
	}
	cmd.SysProcAttr = attr

	var cg execCgroup
	if h.cgroups != nil {
		l := resolvedLimits{memory: limits.MemoryBytes, cpuMillicores: limits.CPUMillicores, pids: h.pids}
		if limits.Pids != nil {
			l.pids = *limits.Pids
		}
		var err error
		if cg, err = h.cgroups.create(name, l); err != nil {
			return nil, err
		}
	}
	if err := startInside(cmd, cg); err != nil {
		if cg != nil {
			err = errors.Join(err, cg.remove())
		}
		return nil, err
	}
	return &box{pid: cmd.Process.Pid, cgroup: cg, proc: h.proc, uid: uid, uids: h.uids}, nil
}

// startInside starts cmd so that it is in cg (when there is one) before
// the function's first instruction.
func startInside(cmd *exec.Cmd, cg execCgroup) error {
	if cg == nil {
		return startOnDedicatedThread(cmd)
	}
	started, cleanup, err := cg.prepare(cmd)
	if err != nil {
		return err
	}
	defer cleanup()
	if err := startOnDedicatedThread(cmd); err != nil {
		return err
	}
	if started == nil {
		return nil
	}
	if err := started(cmd.Process.Pid); err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return err
	}
	return nil
}

// startOnDedicatedThread forks from a thread that exists for this start
// only: it gets no_new_privs (inherited by the child through exec, and
// impossible to clear), so it is thrown away afterwards rather than
// returned to the Go scheduler.
func startOnDedicatedThread(cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// No UnlockOSThread: when this goroutine returns, the runtime ends
		// the thread. (A locked thread is also never cloned by the runtime,
		// so its state cannot spread.)
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			errc <- fmt.Errorf("no_new_privs: %w", err)
			return
		}
		if err := cmd.Start(); err != nil {
			errc <- fmt.Errorf("start %s: %w", cmd.Path, err)
			return
		}
		errc <- nil
	}()
	return <-errc
}

// terminate asks the whole tree to stop (the timeout's first step).
// With a cgroup that is every process in it (the group is among them; a
// process signalled twice could run its handler twice).
func (b *box) terminate() error {
	if b.cgroup != nil {
		return b.cgroup.signalAll(unix.SIGTERM)
	}
	return ignoreESRCH(unix.Kill(-b.pid, unix.SIGTERM))
}

// kill kills the whole tree at once: with a cgroup every process in it,
// also ones that left the process group; otherwise the process group.
func (b *box) kill() error {
	err := ignoreESRCH(unix.Kill(-b.pid, unix.SIGKILL))
	if b.cgroup != nil {
		err = errors.Join(err, b.cgroup.kill())
	}
	return err
}

// waitEmpty confirms the tree is gone: the cgroup is empty, or without one,
// no live process is left in the process group.
func (b *box) waitEmpty(timeout time.Duration) (err error) {
	defer func() { b.empty = err == nil }()
	if b.cgroup != nil {
		return b.cgroup.waitEmpty(timeout)
	}
	var left []int
	err = poll(timeout, func() (bool, error) {
		// The usual case, cheap: nothing at all is left in the group.
		if errors.Is(unix.Kill(-b.pid, 0), unix.ESRCH) {
			return true, nil
		}
		// Zombies count for kill(2) until their new parent reaps them,
		// which an init that does not reap never does: look closer.
		var err error
		left, err = liveGroupMembers(b.proc, b.pid)
		return len(left) == 0, err
	})
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("process group %d: processes %v still alive after %v", b.pid, left, timeout)
	}
	return err
}

// liveGroupMembers lists the processes of group pgid that are not zombies
// (a zombie is dead; only its parent's wait removes it).
func liveGroupMembers(fs procfs.FS, pgid int) ([]int, error) {
	procs, err := fs.AllProcs()
	if err != nil {
		return nil, fmt.Errorf("listing processes: %w", err)
	}
	var left []int
	for _, p := range procs {
		st, err := p.Stat()
		if err != nil {
			continue // gone meanwhile
		}
		if st.PGRP == pgid && st.State != "Z" && st.State != "X" {
			left = append(left, p.PID)
		}
	}
	return left, nil
}

func (b *box) limited() bool { return b.cgroup != nil }

// measure fills what the cgroup counted; without one, the main process's
// own rusage (which includes the children it waited for).
func (b *box) measure(res *Result, state *os.ProcessState) {
	if state != nil {
		if ru, ok := state.SysUsage().(*syscall.Rusage); ok {
			res.PeakMemoryBytes = uint64(ru.Maxrss) * 1024
			res.CPUTime = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		}
	}
	if b.cgroup != nil {
		b.cgroup.measure(res)
	}
}

func (b *box) remove() error {
	// A uid whose processes might live on is never handed out again.
	if b.uids != nil && b.empty {
		b.uids.release(b.uid)
	}
	if b.cgroup == nil {
		return nil
	}
	return b.cgroup.remove()
}

// waitExited blocks until the process has exited, without reaping it: the
// zombie keeps its pid and process group id from being reused while the
// rest of the group is killed.
func waitExited(p *os.Process) error {
	for {
		var info unix.Siginfo
		err := unix.Waitid(unix.P_PID, p.Pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

func exitStatus(state *os.ProcessState) (code, signal int) {
	ws, ok := state.Sys().(syscall.WaitStatus)
	if ok && ws.Signaled() {
		return 128 + int(ws.Signal()), int(ws.Signal())
	}
	return state.ExitCode(), 0
}

func ignoreESRCH(err error) error {
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	return err
}

// processIdentity names this process: pid and start time, which together
// never repeat on a host, so a restarted agent can tell a crashed agent's
// leftovers from a live one's.
func processIdentity() (string, error) {
	fs, err := procfs.NewFS("/proc")
	if err != nil {
		return "", fmt.Errorf("procfs: %w", err)
	}
	return processIdentityOf(fs, os.Getpid())
}

func processIdentityOf(fs procfs.FS, pid int) (string, error) {
	p, err := fs.Proc(pid)
	if err != nil {
		return "", fmt.Errorf("process %d: %w", pid, err)
	}
	st, err := p.Stat()
	if err != nil {
		return "", fmt.Errorf("process %d: %w", pid, err)
	}
	return strconv.Itoa(pid) + "-" + strconv.FormatUint(st.Starttime, 10), nil
}

// processAlive says whether the process named identity still runs. A
// malformed identity counts as alive: what it names is not ours to remove.
func processAlive(identity string) bool {
	pidText, startText, ok := strings.Cut(identity, "-")
	pid, err := strconv.Atoi(pidText)
	if _, serr := strconv.ParseUint(startText, 10, 64); !ok || err != nil || serr != nil || pid <= 0 {
		return true
	}
	fs, err := procfs.NewFS("/proc")
	if err != nil {
		return true
	}
	name, err := processIdentityOf(fs, pid)
	if err != nil {
		return !errors.Is(err, os.ErrNotExist)
	}
	return name == identity
}
