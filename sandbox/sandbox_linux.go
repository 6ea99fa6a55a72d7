package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/procfs"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sys/unix"
)

// scratchEnvKeys name the execution's temporary dir in its environment.
var scratchEnvKeys = []string{"TMPDIR"}

func envKeyEqual(a, b string) bool { return a == b }

// privateTmp is TMPDIR (and HOME, unless set) of an execution with its own
// mount namespace: its private tmpfs.
const privateTmp = "/tmp"

// runner is the unprivileged user whose group functions run with.
type runner struct {
	name     string
	uid, gid uint32
}

// host is the Linux containment: slots of prepared isolation, a cgroup
// hierarchy and a network policy when the host allows them.
type host struct {
	cfg      Config
	log      *slog.Logger
	instance string // names this Sandbox's cgroups
	iso      Isolation
	proc     procfs.FS
	self     int // the agent's pid, which v1 cgroup.procs lists beside functions

	cgroups    cgroupDriver // nil: no writable cgroup
	runner     *runner      // nil: run as the agent itself
	namespaces bool         // each slot gets its own mount namespace
	pool       *slotPool
	filter     *networkFilter // nil unless the network mode is filtered
	devNull    *os.File
	scratchDir string // this instance's dir of TMPDIRs when there are no namespaces

	// byUID finds the execution a blocked connection came from.
	mu    sync.Mutex
	byUID map[uint32]*box
}

func newHost(cfg Config) (_ *host, err error) {
	proc, err := procfs.NewFS("/proc")
	if err != nil {
		return nil, fmt.Errorf("procfs: %w", err)
	}
	if err := closeInheritedFDs(); err != nil {
		return nil, err
	}
	identity, err := processIdentityOf(proc, os.Getpid())
	if err != nil {
		return nil, err
	}
	// h is undone on every failure; the named result stays nil until the
	// end, so the cleanup never sees a nil host.
	h := &host{
		cfg:      cfg,
		log:      cfg.Logger,
		instance: identity + "-" + strconv.FormatUint(sandboxCount.Add(1), 10),
		proc:     proc,
		self:     os.Getpid(),
		byUID:    map[uint32]*box{},
	}
	defer func() {
		if err != nil {
			_ = h.close()
		}
	}()
	if h.devNull, err = os.Open(os.DevNull); err != nil {
		return nil, err
	}
	h.iso = Isolation{Cgroup: "none", UID: os.Geteuid(), Network: NetworkHost}
	if u, err := user.Current(); err == nil {
		h.iso.User = u.Username
	}
	root := os.Geteuid() == 0
	degrade := func(format string, args ...any) {
		h.iso.Degraded = append(h.iso.Degraded, fmt.Sprintf(format, args...))
	}

	switch {
	case cfg.User == "":
		degrade("no user configured: functions run as the agent's own user")
	case !root:
		degrade("agent is not root: cannot run functions as %q, they run as the agent's own user", cfg.User)
	default:
		r, err := lookupRunner(cfg.User)
		if err != nil {
			degrade("%v: functions run as the agent's own user", err)
			break
		}
		h.runner = r
		h.iso.User, h.iso.UID = r.name, int(r.uid)
	}
	uids, err := h.uidRange()
	if err != nil {
		return nil, err
	}
	h.iso.UIDRange = uids

	if root {
		h.namespaces = true
		h.iso.Namespaces = true
	} else {
		degrade("agent is not root: functions share the node's /tmp, /dev/shm and /proc view")
	}
	removeStaleScratch(cfg.ScratchDir, h.log)
	if !h.namespaces {
		h.scratchDir = filepath.Join(cfg.ScratchDir, scratchPrefix+h.instance)
		if err := os.Mkdir(h.scratchDir, 0o755); err != nil {
			return nil, fmt.Errorf("scratch dir: %w", err)
		}
	}

	drv, cheapMoves, reason := openCgroups(cfg, h.instance, proc, h.self, h.log)
	h.iso.CheapCgroupMoves = cheapMoves
	if drv == nil {
		degrade("%s: no memory, cpu or pids limits, and a kill reaches only the process group", reason)
	} else {
		h.cgroups = drv
		h.iso.Cgroup = drv.version()
	}

	if err := h.openNetwork(); err != nil {
		return nil, err
	}
	h.pool = newSlotPool(h, uids)
	if err := h.pool.start(); err != nil {
		return nil, err
	}
	if h.iso.Scoped = h.pool.scoped(); h.namespaces && !h.iso.Scoped {
		degrade("no Landlock scopes (Linux 6.12+): functions can connect to the node's abstract Unix sockets")
	}
	return h, nil
}

// uidRange is the range executions take their uids from: none without a
// runner (or with SharedUID), the configured one, or the runner's range in
// /etc/subuid.
func (h *host) uidRange() (UIDRange, error) {
	switch {
	case h.runner == nil:
		return UIDRange{}, nil
	case h.cfg.SharedUID:
		h.iso.Degraded = append(h.iso.Degraded, "uid_range is shared: concurrent functions run as one uid and can see and signal each other")
		return UIDRange{}, nil
	case h.cfg.UIDs.Count > 0:
		if h.cfg.UIDs.Contains(h.runner.uid) || h.cfg.UIDs.Contains(0) {
			return UIDRange{}, fmt.Errorf("uid range %s holds root or the runner's own uid", h.cfg.UIDs)
		}
		return h.cfg.UIDs, nil
	}
	f, err := os.Open("/etc/subuid")
	if err != nil {
		return UIDRange{}, fmt.Errorf("uid range: %w; reserve one for %s (as the .deb does: usermod --add-subuids %s --add-subgids %s %s) or set sandbox.uid_range",
			err, h.runner.name, DefaultUIDRange, DefaultUIDRange, h.runner.name)
	}
	defer f.Close()
	r, err := parseSubordinateRange(f, h.runner.name, h.runner.uid)
	if err != nil {
		return UIDRange{}, fmt.Errorf("uid range: /etc/subuid: %w; reserve one (as the .deb does: usermod --add-subuids %s --add-subgids %s %s) or set sandbox.uid_range",
			err, DefaultUIDRange, DefaultUIDRange, h.runner.name)
	}
	return r, nil
}

// DefaultUIDRange is the range the .deb reserves for the runner's
// executions in /etc/subuid and /etc/subgid: 65536 uids from 0x70000000,
// a block systemd's uid table leaves unused (above the container ranges,
// below 2^31, which some programs misread as negative) and far above the
// ranges useradd hands out.
var DefaultUIDRange = UIDRange{First: 1879048192, Count: 65536}

// openNetwork installs the network policy, or says why it cannot be.
func (h *host) openNetwork() error {
	mode := h.cfg.Network.Mode
	switch mode {
	case NetworkHost:
		h.iso.Network = NetworkHost
		h.iso.Degraded = append(h.iso.Degraded, "network is host: functions reach every address the node reaches, the agent's ports and Redis included")
		return nil
	case NetworkNone:
		if !h.namespaces {
			return errors.New("network none needs root (a network namespace per slot); run as root or set sandbox.network: host")
		}
		h.iso.Network = NetworkNone
		return nil
	}
	if h.iso.UIDRange.Count == 0 {
		return errors.New("network filtered matches the functions' uids, which needs root, a runner user and a uid range (not shared); fix those or set sandbox.network: host")
	}
	f, err := openNetworkFilter(context.Background(), networkFilterOptions{
		Table:     networkTableName(h.cfg.Name),
		UIDs:      h.iso.UIDRange,
		Policy:    h.cfg.Network,
		Logger:    h.log,
		OnBlocked: h.blocked,
	})
	if err != nil {
		return fmt.Errorf("network filtered: %w (or set sandbox.network: host, which leaves the node open to functions)", err)
	}
	h.filter = f
	h.iso.Network = NetworkFiltered
	return nil
}

// blocked records a refused connection with the execution whose uid made
// it.
func (h *host) blocked(c BlockedConnection) {
	h.mu.Lock()
	b := h.byUID[c.UID]
	h.mu.Unlock()
	if b != nil {
		b.noteBlocked(c)
	}
}

func (h *host) isolation() Isolation { return h.iso }

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
	if uid == 0 || gid == 0 {
		return nil, fmt.Errorf("user %q has uid or gid 0", name)
	}
	return &runner{name: u.Username, uid: uint32(uid), gid: uint32(gid)}, nil
}

func (h *host) close() error {
	var errs []error
	if h.pool != nil {
		errs = append(errs, h.pool.close())
	}
	if h.cgroups != nil {
		errs = append(errs, h.cgroups.close())
	}
	if h.filter != nil {
		errs = append(errs, h.filter.Close())
	}
	if h.scratchDir != "" {
		errs = append(errs, removeScratch(h.scratchDir))
	}
	if h.devNull != nil {
		errs = append(errs, h.devNull.Close())
	}
	return errors.Join(errs...)
}

// box is one execution's containment, followed by its slot's thread.
type box struct {
	h      *host
	slot   *slot
	spec   Spec
	log    *slog.Logger
	onDone func()
	// span is the caller's span at the start, parent of the cleanup's.
	span trace.SpanContext
	tp   trace.TracerProvider

	cgroup  execCgroup // nil without cgroups
	limits  resolvedLimits
	scratch string // TMPDIR without namespaces
	proc    *child
	outFD   int // the read end of the output pipe

	// resumeReq asks the slot's thread to let a held process go.
	resumeReq atomic.Bool
	// since is when the function started to run (0 while held); the slot's
	// thread writes it.
	since time.Time

	// killMu orders kills from other goroutines (a cancel, a timer) with
	// the end of the execution: once over, its cgroup may be another
	// execution's, and a late kill must not reach it.
	killMu sync.Mutex
	over   bool

	res    Result
	doneCh chan struct{}

	mu            sync.Mutex
	blockedCount  int
	blockedSample []BlockedConnection
}

// start takes a slot, gives the execution its cgroup and limits, and has
// the slot's thread fork the function and follow it to its end.
func (h *host) start(ctx context.Context, spec Spec, onDone func()) (_ *box, err error) {
	if fi, err := os.Stat(spec.Path); err != nil {
		return nil, fmt.Errorf("handler: %w", err)
	} else if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: handler %s is not a regular file", ErrInvalidSpec, spec.Path)
	}
	parent := trace.SpanFromContext(ctx)
	tracer := parent.TracerProvider().Tracer(tracerName)
	// b is undone on every failure; the named result stays nil until the
	// end, so the cleanup never sees a nil box.
	b := &box{h: h, spec: spec, onDone: onDone, limits: h.resolve(spec.Limits), outFD: -1,
		span: parent.SpanContext(), tp: parent.TracerProvider(), doneCh: make(chan struct{})}
	b.log = h.log.With("execution_id", spec.ID)

	_, span := tracer.Start(ctx, SpanSlot)
	s, cold, err := h.pool.take()
	span.SetAttributes(attribute.Bool("flux.sandbox.slot.cold", cold))
	endSpan(span, err)
	if err != nil {
		return nil, err
	}
	b.slot = s
	defer func() {
		if err != nil {
			b.release(true, false)
		}
	}()

	if h.cgroups != nil {
		_, span := tracer.Start(ctx, SpanLimits)
		b.cgroup, err = h.cgroups.acquire(s, b.limits)
		endSpan(span, err)
		if err != nil {
			return nil, fmt.Errorf("cgroup: %w", err)
		}
	}
	tmp := privateTmp
	if !h.namespaces {
		b.scratch = filepath.Join(h.scratchDir, "x"+strconv.FormatUint(scratchCount.Add(1), 10))
		if err := os.Mkdir(b.scratch, 0o700); err != nil {
			return nil, fmt.Errorf("scratch dir: %w", err)
		}
		tmp = b.scratch
	}
	// One pipe for stdout and stderr keeps the order written. Its read end
	// is the slot thread's, polled without the runtime's poller.
	var pipe [2]int
	if err := unix.Pipe2(pipe[:], unix.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("output pipe: %w", err)
	}
	if err := unix.SetNonblock(pipe[0], true); err != nil {
		unix.Close(pipe[0])
		unix.Close(pipe[1])
		return nil, fmt.Errorf("output pipe: %w", err)
	}
	b.outFD = pipe[0]

	_, span = tracer.Start(ctx, SpanSpawn)
	err = s.run(b, spawnRequest{
		path:     spec.Path,
		argv:     append([]string{spec.Path}, spec.Args...),
		dir:      spec.Dir,
		env:      executionEnv(spec.Env, tmp),
		stdin:    int(h.devNull.Fd()),
		output:   pipe[1],
		cgroup:   b.cgroup,
		hold:     spec.Hold,
		noFile:   h.cfg.NoFile,
		ipcNS:    h.namespaces,
		setGroup: h.runner != nil,
		gid:      h.gid(),
	})
	if err == nil {
		span.SetAttributes(attribute.Int("process.pid", b.proc.pid))
	}
	endSpan(span, err)
	if err != nil {
		unix.Close(b.outFD)
		return nil, err
	}
	return b, nil
}

func endSpan(span trace.Span, err error) {
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

// gid is the group functions run with: the runner's.
func (h *host) gid() uint32 {
	if h.runner == nil {
		return 0
	}
	return h.runner.gid
}

func (h *host) resolve(l Limits) resolvedLimits {
	r := resolvedLimits{memory: l.MemoryBytes, cpuMillicores: l.CPUMillicores, pids: h.cfg.PidsLimit}
	if l.Pids != nil {
		r.pids = *l.Pids
	}
	return r
}

func (b *box) pid() int              { return b.proc.pid }
func (b *box) done() <-chan struct{} { return b.doneCh }
func (b *box) result() Result        { return b.res }
func (b *box) logger() *slog.Logger  { return b.log }

// usage reads what the execution used so far, under killMu and only while
// it is not over: then its slot, and on v1 the slot's cgroups, are still
// this execution's, and so is its pid (the box reaps it only after).
func (b *box) usage() (Usage, error) {
	b.killMu.Lock()
	defer b.killMu.Unlock()
	if b.over {
		return Usage{}, ErrExecutionOver
	}
	var u Usage
	var err error
	if b.cgroup != nil {
		u, err = b.cgroup.usage()
	} else {
		u, err = processUsage(b.h.proc, b.proc.pid)
	}
	if err != nil {
		return Usage{}, err
	}
	u.UID = b.slot.runsAs()
	return u, nil
}

// userHZ is the unit of the CPU times in /proc/<pid>/stat (USER_HZ, 100
// on every Linux ABI).
const userHZ = 100

// processUsage reads, where there is no cgroup, what the process pid uses:
// its resident set, and its CPU time with that of the children it reaped.
func processUsage(fs procfs.FS, pid int) (Usage, error) {
	p, err := fs.Proc(pid)
	if err != nil {
		return Usage{}, fmt.Errorf("process %d: %w", pid, err)
	}
	st, err := p.Stat()
	if err != nil {
		return Usage{}, fmt.Errorf("process %d: %w", pid, err)
	}
	status, err := p.NewStatus()
	if err != nil {
		return Usage{}, fmt.Errorf("process %d: %w", pid, err)
	}
	ticks := int64(st.UTime) + int64(st.STime) + int64(st.CUTime) + int64(st.CSTime)
	return Usage{MemoryBytes: status.VmRSS, CPUTime: time.Duration(ticks) * time.Second / userHZ}, nil
}

// resume asks the slot's thread, the process's tracer and the only thread
// that may let it go, to do so.
func (b *box) resume() error {
	if !b.spec.Hold {
		return nil
	}
	b.resumeReq.Store(true)
	return b.slot.wake()
}

// terminate asks the whole tree to stop. With a cgroup that is every
// process in it (the group is among them; a process signalled twice could
// run its handler twice).
func (b *box) terminate() error {
	b.killMu.Lock()
	defer b.killMu.Unlock()
	if b.over {
		return nil
	}
	if b.cgroup != nil {
		return b.cgroup.signalAll(unix.SIGTERM)
	}
	return ignoreESRCH(unix.Kill(-b.proc.pid, unix.SIGTERM))
}

// kill kills the whole tree at once, from any goroutine; once the
// execution is over it does nothing.
func (b *box) kill() error {
	b.killMu.Lock()
	defer b.killMu.Unlock()
	if b.over {
		return nil
	}
	return b.killTree()
}

// killTree kills every process of the execution: with a cgroup every
// process in it, also ones that left the process group; otherwise the
// process group. A held process dies without running an instruction.
func (b *box) killTree() error {
	err := ignoreESRCH(unix.Kill(-b.proc.pid, unix.SIGKILL))
	if b.cgroup != nil {
		err = errors.Join(err, b.cgroup.kill())
	}
	return err
}

// follow is the slot thread's work for one execution once it is forked:
// it lets a held process go when asked, copies the output to Spec.Output,
// and once the main process has exited, kills what is left, drains the
// output, reaps and measures, says the execution is over and gives the
// slot back. One poll(2) over the output pipe, the process's pidfd and the
// slot's eventfd wakes it: an execution costs no goroutine, and none of
// the runtime's poller. Timeouts and cancels kill from other goroutines.
func (b *box) follow() {
	c := b.proc
	fds := []unix.PollFd{
		{Fd: int32(b.outFD), Events: unix.POLLIN},
		{Fd: int32(c.pidfd), Events: unix.POLLIN},
		{Fd: int32(b.slot.evfd), Events: unix.POLLIN},
	}
	held := b.spec.Hold
	if !held {
		b.since = time.Now()
	}
	out := outputCopy{w: b.spec.Output}
	for {
		if _, err := unix.Poll(fds, -1); err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			b.log.Error("waiting on the function", "err", err)
			break // kill what is left and end the execution below
		}
		if fds[2].Revents != 0 {
			b.slot.drainWake()
			if held && b.resumeReq.Load() {
				held = false
				b.since = time.Now()
				if err := unix.PtraceDetach(c.pid); err != nil && !errors.Is(err, unix.ESRCH) {
					b.log.Error("letting a held function run", "err", err)
				}
			}
		}
		if fds[0].Revents != 0 && !out.read(b.outFD, b.slot.buf[:]) {
			fds[0].Fd = -1 // EOF: every writer is gone; poll skips it
		}
		if fds[1].Revents != 0 {
			break
		}
	}
	var wall time.Duration
	if !b.since.IsZero() {
		wall = time.Since(b.since)
	}
	ctx := trace.ContextWithSpanContext(context.Background(), b.span)
	_, span := b.tp.Tracer(tracerName).Start(ctx, SpanCleanup)

	// The main process is over, so the execution is: whatever it left
	// behind goes too, even a child that still holds the output open. On
	// cgroup v1 the kill freezes the slot's cgroup, which holds this very
	// thread: another goroutine kills, this one waits outside the freezer.
	b.killMu.Lock()
	if err := ignoreESRCH(unix.Kill(-b.proc.pid, unix.SIGKILL)); err != nil {
		b.log.Error("killing the rest of the process group", "err", err)
	}
	if b.cgroup != nil && !b.cgroup.empty() {
		killed := make(chan error, 1)
		go func() { killed <- b.cgroup.kill() }()
		if err := <-killed; err != nil {
			b.log.Error("killing the rest of the tree", "err", err)
		}
	}
	goneErr := b.waitGone(emptyTimeout)
	b.over = true
	b.killMu.Unlock()
	if goneErr != nil {
		b.log.Error("confirming the tree is gone", "err", goneErr)
	}
	// A cgroup that proved every process gone means every writer is gone:
	// read to EOF, however slow Spec.Output is. Without that proof a
	// process that left the group may still hold the pipe: then each
	// further read may wait at most DrainTimeout.
	idle := -1
	if b.cgroup == nil || goneErr != nil {
		idle = int(DrainTimeout / time.Millisecond)
	}
	for fds[0].Fd >= 0 {
		n, err := unix.Poll(fds[:1], idle)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || n == 0 {
			out.err = errors.Join(out.err, ErrOutputAbandoned)
			break
		}
		if !out.read(b.outFD, b.slot.buf[:]) {
			break
		}
	}
	unix.Close(b.outFD)

	res := Result{WallTime: wall, OutputErr: out.err, MemoryLimitBytes: b.memoryLimit()}
	b.finish(&res)
	b.res = res
	span.SetAttributes(attribute.Int("process.exit.code", res.ExitCode))
	span.End()
	b.onDone()
	close(b.doneCh)
	b.release(goneErr == nil, true)
}

// outputCopy copies what the pipe gives to w; when w fails it keeps
// reading (and dropping) so the function never blocks on a full pipe.
type outputCopy struct {
	w   io.Writer
	err error
}

// read reads what the pipe holds now; false at EOF.
func (o *outputCopy) read(fd int, buf []byte) bool {
	for {
		n, err := unix.Read(fd, buf)
		if n > 0 && o.err == nil {
			if _, werr := o.w.Write(buf[:n]); werr != nil {
				o.err = werr
			}
		}
		switch {
		case errors.Is(err, unix.EAGAIN):
			return true
		case errors.Is(err, unix.EINTR):
		case err != nil || n == 0:
			return false
		}
	}
}

// waitGone confirms the tree is gone: the cgroup is empty, or without one,
// no live process is left in the process group.
func (b *box) waitGone(timeout time.Duration) error {
	if b.cgroup != nil {
		return b.cgroup.waitEmpty(timeout)
	}
	var left []int
	err := poll(timeout, func() (bool, error) {
		// The usual case, cheap: nothing at all is left in the group.
		if errors.Is(unix.Kill(-b.proc.pid, 0), unix.ESRCH) {
			return true, nil
		}
		// Zombies count for kill(2) until their new parent reaps them,
		// which an init that does not reap never does: look closer.
		var err error
		left, err = liveGroupMembers(b.h.proc, b.proc.pid)
		return len(left) == 0, err
	})
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("process group %d: processes %v still alive after %v", b.proc.pid, left, timeout)
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

// memoryLimit is the limit in force: none without a cgroup to hold it.
func (b *box) memoryLimit() int64 {
	if b.cgroup == nil {
		return 0
	}
	return derefOr(b.limits.memory, 0)
}

// finish reaps the main process, then fills in what the cgroup counted;
// without one, the main process's own rusage (which includes the children
// it waited for).
func (b *box) finish(res *Result) {
	ws, ru, err := b.proc.reap()
	switch {
	case err != nil:
		b.log.Error("reaping the function's process", "pid", b.proc.pid, "err", err)
		res.ExitCode = -1
	case ws.Signaled():
		res.ExitCode, res.Signal = 128+int(ws.Signal()), int(ws.Signal())
	default:
		res.ExitCode = ws.ExitStatus()
	}
	if err == nil {
		res.PeakMemoryBytes = uint64(ru.Maxrss) * 1024
		res.CPUTime = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	if b.cgroup != nil {
		b.cgroup.measure(res)
	}
	if b.h.filter != nil && b.slot.uid != 0 {
		// Every refusal of the execution is reported by now (the kernel
		// queues a report before the refused call returns); settle reads
		// the rest and what the rate limit suppressed.
		suppressed, err := b.h.filter.settle(context.Background(), b.slot.uid)
		if err != nil {
			b.log.Warn("reading the execution's refused connections", "err", err)
		}
		b.mu.Lock()
		b.blockedCount += int(suppressed)
		b.mu.Unlock()
	}
	b.mu.Lock()
	res.Blocked = b.blockedCount
	res.BlockedSample = append([]BlockedConnection(nil), b.blockedSample...)
	b.mu.Unlock()
}

func (b *box) noteBlocked(c BlockedConnection) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.blockedCount++
	if len(b.blockedSample) < MaxBlockedSample {
		b.blockedSample = append(b.blockedSample, c)
	}
}

// release gives the slot back (or retires it, when its processes might
// live on) and removes the execution's scratch dir. onThread says the
// slot's own thread calls it.
func (b *box) release(gone, onThread bool) {
	if b.slot == nil {
		return
	}
	if b.slot.uid != 0 {
		b.h.mu.Lock()
		if b.h.byUID[b.slot.uid] == b {
			delete(b.h.byUID, b.slot.uid)
		}
		b.h.mu.Unlock()
	}
	if b.scratch != "" {
		if err := removeScratch(b.scratch); err != nil {
			b.log.Error("removing the scratch dir", "err", err)
		}
	}
	b.h.pool.put(b.slot, b.cgroup, gone, onThread)
	b.slot = nil
}

func ignoreESRCH(err error) error {
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	return err
}

// processIdentityOf names a process: pid and start time, which together
// never repeat on a host, so a restarted agent can tell a crashed agent's
// leftovers from a live one's.
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

// instanceAlive says whether the Sandbox that named itself instance may
// still run: its process does. A name that is not an instance name counts
// as alive: it is not ours to remove.
func instanceAlive(instance string) bool {
	i := strings.LastIndexByte(instance, '-')
	if i < 0 {
		return true
	}
	if _, err := strconv.ParseUint(instance[i+1:], 10, 64); err != nil {
		return true
	}
	return processAlive(instance[:i])
}

const scratchPrefix = "flux-sandbox-"

// removeStaleScratch removes the scratch dirs of agents that are no longer
// running.
func removeStaleScratch(parent string, log *slog.Logger) {
	matches, err := filepath.Glob(filepath.Join(parent, scratchPrefix+"*"))
	if err != nil {
		return
	}
	for _, dir := range matches {
		instance := strings.TrimPrefix(filepath.Base(dir), scratchPrefix)
		if instanceAlive(instance) {
			continue
		}
		if err := removeScratch(dir); err != nil {
			log.Warn("removing a crashed agent's scratch dir", "dir", dir, "err", err)
		} else {
			log.Info("removed a crashed agent's scratch dir", "dir", dir)
		}
	}
}

func removeScratch(dir string) error {
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("scratch dir: %w", err)
	}
	return nil
}
