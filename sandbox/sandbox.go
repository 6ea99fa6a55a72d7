// Package sandbox starts one function process and contains it: on Linux an
// unprivileged uid of its own, a cgroup it is born into with memory, CPU
// and pids limits, a private /tmp, /var/tmp, /dev/shm and /proc, a network
// policy the kernel enforces, and a kill that takes the whole tree at once;
// on Windows a job object.
//
// Starting must cost close to a bare fork/exec, so what can be prepared
// ahead is: on Linux each execution runs in a slot (a uid, a mount
// namespace, and on cgroup v1 a set of cgroups holding an OS thread of the
// agent that forks the function), made in the background and reused.
package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults, written once here and shown in the agent's example config.
const (
	// DefaultPidsLimit bounds the processes of one execution (fork bombs).
	DefaultPidsLimit = 1024
	// NoPidsLimit as Config.PidsLimit turns the pids limit off.
	NoPidsLimit = -1
	// DefaultKillGrace is how long a timed-out execution has between SIGTERM
	// and the kill.
	DefaultKillGrace = 2 * time.Second
	// DefaultNoFile is the RLIMIT_NOFILE (soft and hard) of functions.
	DefaultNoFile = 1024
	// DefaultTmpSize bounds each execution's private /tmp, /var/tmp and
	// /dev/shm together (one tmpfs, also charged to its memory limit).
	DefaultTmpSize = 64 << 20
	// NoTmpSizeLimit as Config.TmpSize leaves the private tmpfs bounded
	// only by the execution's memory limit.
	NoTmpSizeLimit = -1
	// DrainTimeout bounds reading the rest of the output after the tree was
	// killed when nothing proves every writer gone (no cgroup): a process
	// that left the process group may still hold the pipe.
	DrainTimeout = 250 * time.Millisecond
	// emptyTimeout bounds waiting for a killed tree to be gone.
	emptyTimeout = 5 * time.Second
	// MinCPUMillicores is the smallest CPU limit: the smallest CFS quota
	// the kernel takes is 1 ms per 100 ms period. Start refuses less.
	MinCPUMillicores = 10
)

// Errors callers can test with errors.Is.
var (
	// ErrInvalidSpec is returned by Start for a spec it refuses; nothing was
	// started or created.
	ErrInvalidSpec = errors.New("invalid execution spec")
	// ErrClosed is returned by Start after Close.
	ErrClosed = errors.New("sandbox closed")
	// ErrOutOfMemory is the error an OOM-killed execution reports (see
	// Result.Err): the kernel's own counter said so.
	ErrOutOfMemory = errors.New("out of memory")
	// ErrOutputAbandoned says the end of an execution's output was not
	// read: a process that escaped the process group (no cgroup to hold it)
	// kept the pipe open after the execution ended.
	ErrOutputAbandoned = errors.New("output abandoned: a process outside the sandbox kept it open")
	// ErrExecutionOver is returned by Process.Usage once the execution is
	// over: what it used is in its Result then, and what held it (its pid,
	// on Linux its slot's cgroups) may be another execution's already.
	ErrExecutionOver = errors.New("execution is over")
)

// Limits bound one execution. A nil field is "no limit", which is not the
// same as a limit of 0.
type Limits struct {
	MemoryBytes   *int64
	CPUMillicores *int64
	// Pids overrides Config.PidsLimit for this execution.
	Pids *int64
}

// Spec is everything needed to start one execution.
type Spec struct {
	// ID names the execution in the agent's logs and traces. It never
	// appears in a name other users can list (cgroups, directories).
	ID string
	// Path is the absolute path of the executable.
	Path string
	// Args follow Path in argv.
	Args []string
	// Dir is the working directory.
	Dir string
	// Env is the complete environment; nothing is inherited from the agent.
	// The sandbox sets TMPDIR to the execution's private temporary dir and,
	// when Env has no HOME, HOME to the same dir. It never appears in any
	// process's argv.
	Env []string
	// Limits are applied before the first instruction of the function runs.
	Limits Limits
	// Timeout, when non-zero, ends the execution: SIGTERM to the whole tree,
	// then a kill after KillGrace (DefaultKillGrace when zero). It counts
	// from the moment the function runs (Resume, when held).
	Timeout   time.Duration
	KillGrace time.Duration
	// Output receives stdout and stderr as one stream, in the order written.
	// It is written from a single goroutine, and never after Done is closed.
	// Nil discards the output.
	Output io.Writer
	// Hold leaves the process created, contained and stopped before the
	// first instruction of the function until Resume; Cancel ends it
	// without a single instruction of the function having run. It lets a
	// caller overlap the start with work that decides whether the
	// execution may run at all.
	Hold bool
}

// Result is how an execution ended.
type Result struct {
	// ExitCode is the process's exit status, or 128+N when signal N killed it.
	ExitCode int
	// Signal is the signal that killed the process, 0 if it exited.
	Signal int
	// OOMKilled is read from the kernel's own counters, never guessed.
	OOMKilled bool
	TimedOut  bool
	Cancelled bool
	// MemoryLimitBytes is the limit that was in force (0: none), so an OOM can
	// be reported against it.
	MemoryLimitBytes int64
	// PeakMemoryBytes and CPUTime are 0 when they could not be measured.
	PeakMemoryBytes uint64
	CPUTime         time.Duration
	// WallTime runs from the function's first instruction to its exit.
	WallTime time.Duration
	// OutputErr is the first error of Spec.Output, or ErrOutputAbandoned
	// when a process outside the sandbox's reach kept the output open; the
	// output after it was read and dropped so the function never blocked on
	// a full pipe.
	OutputErr error
	// Blocked counts the network connections the policy refused;
	// BlockedSample holds the first few (at most MaxBlockedSample).
	Blocked       int
	BlockedSample []BlockedConnection
}

// Usage is what a running execution has used so far, for an operator's
// view of what runs now; Result holds the final figures.
type Usage struct {
	// UID is the uid the execution's processes run as; -1 where there is
	// none (Windows).
	UID int
	// MemoryBytes is the memory charged to the execution now: on Linux its
	// cgroup's (the pages and kernel memory its processes caused), without
	// a cgroup the main process's resident set; on Windows the main
	// process's commit charge, what the job's memory limit counts.
	MemoryBytes uint64
	// CPUTime is the CPU the execution used since it started: on Linux its
	// cgroup's (0 on cgroup v1 without cpuacct), without a cgroup the main
	// process's and that of the children it reaped; on Windows the job's.
	CPUTime time.Duration
}

// MaxBlockedSample bounds Result.BlockedSample.
const MaxBlockedSample = 8

// Err says why the execution did not succeed, nil when it exited with 0.
// An OOM kill wraps ErrOutOfMemory, e.g. "out of memory: exceeded the 64 MiB
// limit". Timeout and cancel are left to the caller, which knows its words.
func (r Result) Err() error {
	switch {
	case r.OOMKilled && r.MemoryLimitBytes > 0:
		return fmt.Errorf("%w: exceeded the %s limit", ErrOutOfMemory, formatBytes(r.MemoryLimitBytes))
	case r.OOMKilled:
		return ErrOutOfMemory
	case r.Signal != 0:
		return fmt.Errorf("killed by signal %d (exit code %d)", r.Signal, r.ExitCode)
	case r.ExitCode != 0:
		return fmt.Errorf("exit code %d", r.ExitCode)
	}
	return nil
}

func formatBytes(n int64) string {
	const mib = 1 << 20
	if n%mib == 0 {
		return strconv.FormatInt(n/mib, 10) + " MiB"
	}
	return strconv.FormatInt(n, 10) + " bytes"
}

// Config says how the sandbox contains executions. The zero value detects
// everything and runs functions as the agent itself.
type Config struct {
	// Name is the agent's stable name (its id): it names what the sandbox
	// installs host-wide (the network policy's nftables table), so that a
	// restarted agent replaces its predecessor's and two agents never meet.
	Name string
	// CgroupRoot is the cgroup path (as in /proc/self/cgroup, e.g.
	// "/flux-agent" or "/system.slice/flux-agent.service") under which the
	// sandbox makes its cgroups. "" detects it: on v2 the agent's own cgroup
	// (the agent first moves itself into a leaf "agent" there, as systemd's
	// Delegate=yes requires); on v1 "/flux-agent" in each hierarchy.
	CgroupRoot string
	// User is the runner user (production: "flux-runner"): its group is the
	// group functions run with, and its /etc/subuid range is where their
	// uids come from. "" runs them as the agent itself.
	User string
	// UIDs gives each running execution a uid of its own from this range.
	// A zero Count means User's range in /etc/subuid; New fails, naming
	// the fix, when there is none.
	UIDs UIDRange
	// SharedUID runs every execution as User's own uid instead (concurrent
	// functions can then see and signal each other).
	SharedUID bool
	// PidsLimit bounds the processes of one execution; 0 means
	// DefaultPidsLimit, NoPidsLimit none.
	PidsLimit int64
	// NoFile is the RLIMIT_NOFILE of functions; 0 means DefaultNoFile.
	NoFile uint64
	// TmpSize bounds an execution's private temporary space; 0 means
	// DefaultTmpSize, NoTmpSizeLimit only its memory limit.
	TmpSize int64
	// Network is what functions may reach; the zero value is
	// NetworkFiltered with nothing added.
	Network NetworkPolicy
	// MaskPaths are files and directories of the agent that functions must
	// not read even where their mode allows it (the agent's config, its TLS
	// files): each execution sees them empty.
	MaskPaths []string
	// ScratchDir is the parent of per-execution TMPDIRs where no private
	// mount namespace can be made (not root); "" means os.TempDir().
	ScratchDir string
	// Logger receives the start-up lines about the isolation in force and
	// errors of cleanups nobody waits for. Nil discards.
	Logger *slog.Logger

	// noCgroups makes tests exercise the containment a host without
	// writable cgroups gets.
	noCgroups bool
}

// Isolation is what containment is in force, so the agent can show it in
// its logs, metrics and status.
type Isolation struct {
	// Cgroup is "v2", "v1" or "none" (Windows: "none").
	Cgroup string
	// User is the user functions run as (the runner); UID its uid (-1 on
	// Windows). With a UIDRange each execution has a uid of its own from it.
	User     string
	UID      int
	UIDRange UIDRange
	// Namespaces is set when each execution has its private /tmp,
	// /var/tmp, /dev/shm, /proc view, passwd entry and IPC namespace.
	Namespaces bool
	// Scoped is set when each slot's functions can reach no abstract Unix
	// socket and signal no process outside their slot (Landlock scopes,
	// Linux 6.12+).
	Scoped bool
	// CheapCgroupMoves is set when the host makes moving a process into a
	// cgroup cheap (the favordynmods cgroup2 mount option or the
	// cgroup_favordynmods=true boot parameter): without it each move waits
	// for an RCU grace period (milliseconds, and forks host-wide wait
	// meanwhile). Starts do not move processes (slots are made ahead), so
	// it only shortens the making of new slots in a burst; it costs some
	// speed of every fork and exit on the host.
	CheapCgroupMoves bool
	// Network is the network policy in force.
	Network NetworkMode
	// Degraded lists, in words, each isolation that is missing and why.
	Degraded []string
}

// The per-OS contract. sandbox_linux.go and sandbox_windows.go each define
// host (the node-wide containment) and box (one execution's), which must
// satisfy these; the Process and its timers, in this file, are shared.
type (
	platformHost interface {
		// start starts spec's process inside its containment, held before
		// the function's first instruction until resume when spec.Hold is
		// set, and follows it: its output goes to spec.Output until the
		// execution is over, and onDone runs once it is, before done closes.
		start(ctx context.Context, spec Spec, onDone func()) (*box, error)
		isolation() Isolation
		close() error
	}
	platformBox interface {
		pid() int
		// resume lets a held process run its first instruction; it is a
		// no-op for one that was not held.
		resume() error
		// terminate asks the whole tree to stop (a timeout's first step).
		terminate() error
		// kill kills the whole tree at once; a held process dies without
		// running an instruction.
		kill() error
		// done is closed once the execution is over: the main process
		// exited, what it left is killed and proven gone (or the output
		// abandoned), the output is drained into Spec.Output, and result
		// holds how it ended (but TimedOut and Cancelled, which the
		// Process decides).
		done() <-chan struct{}
		result() Result
		// usage reads what the execution has used so far; once it is
		// over, ErrExecutionOver, never figures of whatever holds its
		// containment next.
		usage() (Usage, error)
		logger() *slog.Logger
	}
)

var (
	_ platformHost = (*host)(nil)
	_ platformBox  = (*box)(nil)
)

// Sandbox starts executions. It is safe for concurrent use.
type Sandbox struct {
	log  *slog.Logger
	host *host

	mu      sync.Mutex
	closed  bool
	running map[*Process]struct{}
	wg      sync.WaitGroup
}

// New detects what isolation the host allows, prepares it, and removes what
// a crashed agent left behind. Isolation the host cannot give is not an
// error but logged once and listed in Isolation; a setting that cannot be
// honoured (a network policy the kernel cannot enforce, no uid range for
// the runner) is an error that names the fix.
func New(cfg Config) (*Sandbox, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	switch {
	case cfg.PidsLimit < NoPidsLimit:
		return nil, fmt.Errorf("sandbox: pids limit %d: must be positive, 0 (the default) or NoPidsLimit", cfg.PidsLimit)
	case cfg.TmpSize < NoTmpSizeLimit:
		return nil, fmt.Errorf("sandbox: tmp size %d: must be positive, 0 (the default) or NoTmpSizeLimit", cfg.TmpSize)
	}
	if cfg.PidsLimit == 0 {
		cfg.PidsLimit = DefaultPidsLimit
	}
	if cfg.NoFile == 0 {
		cfg.NoFile = DefaultNoFile
	}
	if cfg.TmpSize == 0 {
		cfg.TmpSize = DefaultTmpSize
	}
	if cfg.Network.Mode == "" {
		cfg.Network.Mode = NetworkFiltered
	}
	if cfg.ScratchDir == "" {
		cfg.ScratchDir = os.TempDir()
	}
	h, err := newHost(cfg)
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	iso := h.isolation()
	if len(iso.Degraded) > 0 {
		cfg.Logger.Warn("sandbox runs functions without part of its isolation",
			"cgroup", iso.Cgroup, "user", iso.User, "network", iso.Network, "missing", strings.Join(iso.Degraded, "; "))
	} else {
		cfg.Logger.Info("sandbox isolation", "cgroup", iso.Cgroup, "user", iso.User,
			"uid_range", iso.UIDRange.String(), "network", iso.Network, "namespaces", iso.Namespaces)
	}
	return &Sandbox{log: cfg.Logger, host: h, running: make(map[*Process]struct{})}, nil
}

// Isolation reports what containment is in force.
func (s *Sandbox) Isolation() Isolation {
	iso := s.host.isolation()
	iso.Degraded = append([]string(nil), iso.Degraded...)
	return iso
}

// Close cancels every execution still running, waits until each is Done,
// and removes what the sandbox made. Start fails after it.
func (s *Sandbox) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for p := range s.running {
		p.Cancel()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return s.host.close()
}

// Process is one execution.
type Process struct {
	spec Spec
	box  *box

	cancelOnce sync.Once
	resumeOnce sync.Once
	resumeErr  error
	// cancelled and timedOut say who ended the execution, if anyone did.
	cancelled, timedOut atomic.Bool

	mu     sync.Mutex
	timer  *time.Timer // the timeout, then the kill grace
	ended  bool
	result Result

	// over is set (under the Sandbox's mu) once the box said the
	// execution is over: Start must not count it as running then.
	over bool
}

// Start starts one execution: it is contained before its first instruction.
// ctx covers the start only, not the execution's lifetime (use
// Spec.Timeout and Cancel for that); its span, if any, is the parent of the
// sandbox's own spans.
func (s *Sandbox) Start(ctx context.Context, spec Spec) (*Process, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := validateSpec(spec); err != nil {
		return nil, err
	}
	if spec.KillGrace <= 0 {
		spec.KillGrace = DefaultKillGrace
	}
	if spec.Output == nil {
		spec.Output = io.Discard
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, ErrClosed
	}
	s.wg.Add(1)
	s.mu.Unlock()
	p := &Process{spec: spec}
	// The box calls onDone on its own goroutine or thread when the
	// execution is over: no goroutine of the Process waits for it.
	onDone := func() {
		p.stopClock()
		s.mu.Lock()
		p.over = true
		delete(s.running, p)
		s.mu.Unlock()
		s.wg.Done()
	}
	b, err := s.host.start(ctx, spec, onDone)
	if err != nil {
		s.wg.Done()
		return nil, err
	}
	p.box = b
	s.mu.Lock()
	if !p.over {
		s.running[p] = struct{}{}
	}
	closed := s.closed
	s.mu.Unlock()
	if closed { // Close ran while this one started: it goes too.
		p.Cancel()
	}
	if !spec.Hold {
		p.resumeOnce.Do(p.startClock)
	}
	return p, nil
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func validateSpec(spec Spec) error {
	switch {
	case spec.ID == "":
		return fmt.Errorf("%w: empty id", ErrInvalidSpec)
	case spec.Path == "" || !filepath.IsAbs(spec.Path):
		return fmt.Errorf("%w: path %q is not absolute", ErrInvalidSpec, spec.Path)
	case spec.Timeout < 0:
		return fmt.Errorf("%w: negative timeout", ErrInvalidSpec)
	case spec.Limits.MemoryBytes != nil && *spec.Limits.MemoryBytes <= 0:
		return fmt.Errorf("%w: memory limit %d must be positive", ErrInvalidSpec, *spec.Limits.MemoryBytes)
	case spec.Limits.CPUMillicores != nil && *spec.Limits.CPUMillicores < MinCPUMillicores:
		return fmt.Errorf("%w: cpu limit %dm is below the minimum of %dm", ErrInvalidSpec, *spec.Limits.CPUMillicores, MinCPUMillicores)
	case spec.Limits.Pids != nil && *spec.Limits.Pids <= 0:
		return fmt.Errorf("%w: pids limit %d must be positive", ErrInvalidSpec, *spec.Limits.Pids)
	}
	for _, kv := range spec.Env {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" || strings.ContainsRune(kv, 0) {
			return fmt.Errorf("%w: environment entry %q is not KEY=value", ErrInvalidSpec, kv)
		}
	}
	for _, a := range spec.Args {
		if strings.ContainsRune(a, 0) {
			return fmt.Errorf("%w: an argument holds a NUL byte", ErrInvalidSpec)
		}
	}
	return nil
}

// executionEnv is exactly env plus tmp as TMPDIR (and HOME when env has
// none); an entry of env with those keys is replaced.
func executionEnv(env []string, tmp string) []string {
	out := make([]string, 0, len(env)+len(scratchEnvKeys)+1)
	hasHome := false
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if isScratchKey(k) {
			continue
		}
		if k == "HOME" {
			hasHome = true
		}
		out = append(out, kv)
	}
	for _, k := range scratchEnvKeys {
		out = append(out, k+"="+tmp)
	}
	if !hasHome {
		out = append(out, "HOME="+tmp)
	}
	return out
}

func isScratchKey(k string) bool {
	for _, s := range scratchEnvKeys {
		if envKeyEqual(k, s) {
			return true
		}
	}
	return false
}

// Pid is the process id of the execution's main process.
func (p *Process) Pid() int { return p.box.pid() }

// Done is closed once the execution is over: the main process exited, the
// rest of its tree is confirmed gone, and the output is drained into
// Spec.Output.
func (p *Process) Done() <-chan struct{} { return p.box.done() }

// Result is how the execution ended; valid after Done is closed.
func (p *Process) Result() Result {
	<-p.box.done()
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.ended {
		p.ended = true
		p.result = p.box.result()
		p.result.TimedOut = p.timedOut.Load()
		p.result.Cancelled = p.cancelled.Load()
	}
	return p.result
}

// Usage reads what the execution has used so far. Once the execution is
// over it fails with ErrExecutionOver: the final figures are in Result.
func (p *Process) Usage() (Usage, error) {
	u, err := p.box.usage()
	if err != nil {
		return Usage{}, fmt.Errorf("execution %s: usage: %w", p.spec.ID, err)
	}
	return u, nil
}

// Resume lets a process started with Spec.Hold run the function. It is
// idempotent and a no-op for a process that was not held; after Cancel it
// does nothing and returns ErrClosed.
func (p *Process) Resume() error {
	p.resumeOnce.Do(func() {
		if p.cancelled.Load() {
			p.resumeErr = ErrClosed
			return
		}
		p.startClock()
		p.resumeErr = p.box.resume()
	})
	return p.resumeErr
}

// Cancel kills the whole tree at once. It is idempotent and safe after
// Done; Result().Cancelled is set when the kill ended the execution.
func (p *Process) Cancel() {
	p.cancelOnce.Do(func() {
		if isClosed(p.box.done()) {
			return
		}
		p.cancelled.Store(true)
		if err := p.box.kill(); err != nil {
			p.box.logger().Error("cancel: killing the tree", "err", err)
		}
	})
}

// startClock starts the timeout, when there is one: SIGTERM to the tree
// when it passes, the kill KillGrace later. Runtime timers: no goroutine
// waits meanwhile.
func (p *Process) startClock() {
	if p.spec.Timeout <= 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ended || isClosed(p.box.done()) {
		return
	}
	p.timer = time.AfterFunc(p.spec.Timeout, p.onTimeout)
}

func (p *Process) onTimeout() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.timer == nil {
		return // stopped
	}
	p.timedOut.Store(true)
	if err := p.box.terminate(); err != nil {
		p.box.logger().Error("timeout: terminating the tree", "err", err)
	}
	p.timer = time.AfterFunc(p.spec.KillGrace, func() {
		p.mu.Lock()
		stopped := p.timer == nil
		p.mu.Unlock()
		if stopped {
			return
		}
		if err := p.box.kill(); err != nil {
			p.box.logger().Error("timeout: killing the tree after the grace", "err", err)
		}
	})
}

// stopClock stops whatever timer runs; the box calls it (through onDone)
// once the execution is over.
func (p *Process) stopClock() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.timer != nil {
		p.timer.Stop()
		p.timer = nil
	}
}

func derefOr(p *int64, def int64) int64 {
	if p == nil {
		return def
	}
	return *p
}

// poll calls done until it reports true or fails, backing off from 100 µs
// to 20 ms, and fails after timeout.
func poll(timeout time.Duration, done func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for pause := 100 * time.Microsecond; ; pause = min(2*pause, 20*time.Millisecond) {
		ok, err := done()
		if ok || err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not done after %v: %w", timeout, os.ErrDeadlineExceeded)
		}
		time.Sleep(pause)
	}
}
