package sandbox

import (
	"errors"
	"fmt"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// spawnRequest is what one fork and exec from a slot's thread needs.
type spawnRequest struct {
	path   string
	argv   []string
	dir    string
	env    []string
	stdin  int        // fd 0 of the function
	output int        // the write end of the output pipe: fds 1 and 2
	cgroup execCgroup // nil: none
	hold   bool
	noFile uint64
	// ipcNS gives the process an IPC namespace of its own (SysV IPC and
	// POSIX message queues it leaves behind go with it).
	ipcNS bool
	// setGroup runs the process with gid (and no supplementary groups)
	// besides the slot's uid.
	setGroup bool
	gid      uint32
}

// child is a function's main process, started by a slot's thread.
type child struct {
	pid int
	// pidfd turns readable once the process has exited; the slot's thread
	// polls it.
	pidfd int
}

// forkExec starts req's process from the calling thread, which must be a
// slot's (locked) thread: the process inherits the thread's mount and
// network namespaces, no_new_privs and, on cgroup v1, its cgroups. It
// comes back stopped right after its exec, before the first instruction
// of the function (a ptrace stop), gets its resource limits there, and is
// let go unless req.hold.
func (s *slot) forkExec(req spawnRequest) (*child, error) {
	pidfd := -1
	attr := &syscall.SysProcAttr{
		Setpgid: true,
		// The slot's thread lives as long as the agent: if the agent dies,
		// its functions die with it, and the next start settles them.
		Pdeathsig: syscall.SIGKILL,
		Ptrace:    true,
		PidFD:     &pidfd,
	}
	if s.cred != nil {
		attr.Credential = &syscall.Credential{Uid: s.cred.uid, Gid: s.cred.gid, Groups: []uint32{}}
	}
	if req.ipcNS {
		attr.Unshareflags = unix.CLONE_NEWIPC
	}
	join := false
	if req.cgroup != nil {
		if fd := req.cgroup.fd(); fd >= 0 && !clone3Refused.Load() {
			attr.UseCgroupFD, attr.CgroupFD = true, fd
		} else if fd >= 0 {
			join = true
		}
	}
	procAttr := &syscall.ProcAttr{
		Dir:   req.dir,
		Env:   req.env,
		Files: []uintptr{uintptr(req.stdin), uintptr(req.output), uintptr(req.output)},
		Sys:   attr,
	}
	pid, err := syscall.ForkExec(req.path, req.argv, procAttr)
	if err != nil && attr.UseCgroupFD && clone3WasRefused(err) {
		// Container seccomp profiles answer clone3 with ENOSYS, some 5.4
		// kernels with E2BIG: place the held process by hand instead.
		clone3Refused.Store(true)
		attr.UseCgroupFD, attr.CgroupFD = false, 0
		join = true
		pid, err = syscall.ForkExec(req.path, req.argv, procAttr)
	}
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", req.path, err)
	}
	c := &child{pid: pid, pidfd: pidfd}
	if err := s.gate(c, req, join); err != nil {
		_ = unix.Kill(pid, unix.SIGKILL)
		var ws unix.WaitStatus
		_, _ = unix.Wait4(pid, &ws, 0, nil)
		if pidfd >= 0 {
			_ = unix.Close(pidfd)
		}
		return nil, err
	}
	return c, nil
}

// gate finishes a process stopped at its exec: it waits for the stop,
// places it (when clone3 could not), sets its limits and lets it run
// unless it is held.
func (s *slot) gate(c *child, req spawnRequest, join bool) error {
	if c.pidfd < 0 {
		return errors.New("no pidfd for the process (kernel before 5.3)")
	}
	// The stop comes a moment after the exec the fork already waited
	// for: a raw wait keeps the thread's P rather than handing it off and
	// taking it back, which costs more than the wait.
	var ws unix.WaitStatus
	for {
		_, _, errno := unix.RawSyscall6(unix.SYS_WAIT4, uintptr(c.pid), uintptr(unsafe.Pointer(&ws)), 0, 0, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return fmt.Errorf("waiting for the exec stop: %w", errno)
		}
		break
	}
	if !ws.Stopped() {
		return fmt.Errorf("the process ended at its exec (%v)", ws)
	}
	if join {
		if err := req.cgroup.join(c.pid); err != nil {
			return err
		}
	}
	if err := s.setLimits(c.pid, req.noFile); err != nil {
		return err
	}
	if !req.hold {
		if err := unix.PtraceDetach(c.pid); err != nil {
			return fmt.Errorf("starting the function: %w", err)
		}
	}
	return nil
}

// clone3WasRefused says a start failed because clone3 (needed to be born
// into a cgroup) is not available, not because of the function.
func clone3WasRefused(err error) bool {
	return errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.E2BIG) || errors.Is(err, unix.EPERM)
}

// setLimits sets the stopped process's resource limits: its own number of
// open files, no core dumps (a dump could carry the function's secrets
// past its end). Lowering a limit needs no privilege when the caller's real
// uid and gid are the target's (else CAP_SYS_RESOURCE, which some hosts do
// not grant root): the slot's thread takes them on for the call. No other
// process can hold that uid meanwhile: the slot's previous execution is
// proven gone and its current one is stopped.
func (s *slot) setLimits(pid int, noFile uint64) error {
	limits := []struct {
		resource int
		value    unix.Rlimit
	}{
		{unix.RLIMIT_NOFILE, unix.Rlimit{Cur: noFile, Max: noFile}},
		{unix.RLIMIT_CORE, unix.Rlimit{}},
	}
	set := func() error {
		for _, l := range limits {
			if err := unix.Prlimit(pid, l.resource, &l.value, nil); err != nil {
				return err
			}
		}
		return nil
	}
	err := set()
	if !errors.Is(err, unix.EPERM) || s.cred == nil {
		if err != nil {
			return fmt.Errorf("resource limits: %w", err)
		}
		return nil
	}
	// Real ids only: the effective uid stays 0, so the thread keeps the
	// privilege to come back.
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, uintptr(s.cred.gid), ^uintptr(0), ^uintptr(0)); e != 0 {
		return fmt.Errorf("resource limits: taking the function's gid: %w", e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(s.cred.uid), ^uintptr(0), ^uintptr(0)); e != 0 {
		s.restoreIDs()
		return fmt.Errorf("resource limits: taking the function's uid: %w", e)
	}
	err = set()
	s.restoreIDs()
	if err != nil {
		return fmt.Errorf("resource limits: %w", err)
	}
	return nil
}

// restoreIDs gives the slot's thread its real ids back. A thread that
// cannot is not fit to start anything again.
func (s *slot) restoreIDs() {
	_, _, e1 := unix.RawSyscall(unix.SYS_SETRESUID, 0, ^uintptr(0), ^uintptr(0))
	_, _, e2 := unix.RawSyscall(unix.SYS_SETRESGID, 0, ^uintptr(0), ^uintptr(0))
	if e1 != 0 || e2 != 0 {
		panic(fmt.Sprintf("sandbox: slot thread cannot restore its ids: %v %v", e1, e2))
	}
}

// reap collects the exited process's status and resource use.
func (c *child) reap() (unix.WaitStatus, unix.Rusage, error) {
	var ws unix.WaitStatus
	var ru unix.Rusage
	for {
		_, err := unix.Wait4(c.pid, &ws, 0, &ru)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		_ = unix.Close(c.pidfd)
		return ws, ru, err
	}
}
