package sandbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
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

	drv, reason := openCgroups(cfg, h.instance, proc, h.self, h.log)
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

// box is one execution's containment.
type box struct {
	h       *host
	slot    *slot
	cgroup  execCgroup // nil without cgroups
	limits  resolvedLimits
	scratch string // TMPDIR without namespaces
	proc    *child

	// gone is set by waitGone when it succeeded.
	gone bool

	mu            sync.Mutex
	blockedCount  int
	blockedSample []BlockedConnection
}

// start takes a slot, gives the execution its cgroup and limits, and forks
// the function from the slot's thread.
func (h *host) start(ctx context.Context, spec Spec, output *os.File) (_ *box, err error) {
	if fi, err := os.Stat(spec.Path); err != nil {
		return nil, fmt.Errorf("handler: %w", err)
	} else if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: handler %s is not a regular file", ErrInvalidSpec, spec.Path)
	}
	tracer := trace.SpanFromContext(ctx).TracerProvider().Tracer(tracerName)
	// b is undone on every failure; the named result stays nil until the
	// end, so the cleanup never sees a nil box.
	b := &box{h: h, limits: h.resolve(spec.Limits)}

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
			b.release(true)
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

	_, span = tracer.Start(ctx, SpanSpawn)
	b.proc, err = s.spawn(spawnRequest{
		path:     spec.Path,
		argv:     append([]string{spec.Path}, spec.Args...),
		dir:      spec.Dir,
		env:      executionEnv(spec.Env, tmp),
		stdin:    h.devNull,
		output:   output,
		cgroup:   b.cgroup,
		hold:     spec.Hold,
		noFile:   h.cfg.NoFile,
		ipcNS:    h.namespaces,
		setGroup: h.runner != nil,
		gid:      h.gid(),
	}, h.log)
	if err == nil {
		span.SetAttributes(attribute.Int("process.pid", b.proc.pid))
	}
	endSpan(span, err)
	if err != nil {
		return nil, err
	}
	if s.uid != 0 && h.filter != nil {
		h.mu.Lock()
		h.byUID[s.uid] = b
		h.mu.Unlock()
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

func (b *box) pid() int { return b.proc.pid }

func (b *box) resume() error {
	b.proc.resume()
	return nil
}

func (b *box) exited() <-chan struct{} { return b.proc.exited }

// terminate asks the whole tree to stop. With a cgroup that is every
// process in it (the group is among them; a process signalled twice could
// run its handler twice).
func (b *box) terminate() error {
	if b.cgroup != nil {
		return b.cgroup.signalAll(unix.SIGTERM)
	}
	return ignoreESRCH(unix.Kill(-b.proc.pid, unix.SIGTERM))
}

// kill kills the whole tree at once: with a cgroup every process in it,
// also ones that left the process group; otherwise the process group. A
// held process is killed the same way: it never runs an instruction.
func (b *box) kill() error {
	err := ignoreESRCH(unix.Kill(-b.proc.pid, unix.SIGKILL))
	if b.cgroup != nil {
		err = errors.Join(err, b.cgroup.kill())
	}
	return err
}

// waitGone confirms the tree is gone: the cgroup is empty, or without one,
// no live process is left in the process group.
func (b *box) waitGone(timeout time.Duration) (err error) {
	defer func() { b.gone = err == nil }()
	if b.cgroup != nil {
		return b.cgroup.waitEmpty(timeout)
	}
	var left []int
	err = poll(timeout, func() (bool, error) {
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

// provesGone: only a cgroup proves that no process escaped.
func (b *box) provesGone() bool { return b.cgroup != nil }

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
		b.h.log.Error("reaping the function's process", "pid", b.proc.pid, "err", err)
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
			b.h.log.Warn("reading the execution's refused connections", "err", err)
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
// live on) and removes the execution's scratch dir.
func (b *box) release(gone bool) {
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
			b.h.log.Error("removing the scratch dir", "err", err)
		}
	}
	b.h.pool.put(b.slot, b.cgroup, gone)
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
