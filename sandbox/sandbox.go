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

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
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
	// Network is the network policy in force.
	Network NetworkMode
	// Degraded lists, in words, each isolation that is missing and why.
	Degraded []string
}

// The per-OS contract. sandbox_linux.go and sandbox_windows.go each define
// host (the node-wide containment) and box (one execution's), which must
// satisfy these; everything else in this file is shared by both.
type (
	platformHost interface {
		// start starts spec's process with output as its stdout and stderr,
		// inside its containment, held before the function's first
		// instruction until resume when spec.Hold is set.
		start(ctx context.Context, spec Spec, output *os.File) (*box, error)
		isolation() Isolation
		close() error
	}
	platformBox interface {
		pid() int
		// resume lets a held process run its first instruction; it is a
		// no-op for one that was not held.
		resume() error
		// exited is closed once the main process has exited; it is not
		// reaped yet, so its pid and process group id cannot be reused.
		exited() <-chan struct{}
		// terminate asks the whole tree to stop (a timeout's first step).
		terminate() error
		// kill kills the whole tree at once.
		kill() error
		// waitGone waits until no process of the tree is left.
		waitGone(timeout time.Duration) error
		// provesGone says whether a kernel object (cgroup, job) proved
		// waitGone's answer, so no escaped process can still hold the
		// output pipe.
		provesGone() bool
		// memoryLimit is the memory limit in force, 0 for none.
		memoryLimit() int64
		// finish reaps the process and fills in what was measured.
		finish(res *Result)
		// release gives back what the execution held (its slot, cgroup,
		// uid); it may take its time and runs after Done is closed. gone
		// says whether waitGone succeeded: what might still be in use by a
		// live process is never reused.
		release(gone bool)
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
	log  *slog.Logger
	box  *box
	// output is the read end of the pipe the whole tree writes to.
	output *os.File
	// span is the context of the caller's span at Start, for the spans of
	// the work after the process exits.
	span trace.SpanContext
	tp   trace.TracerProvider

	cancelOnce sync.Once
	cancelReq  chan struct{}
	resumeOnce sync.Once
	resumed    chan struct{} // closed once the function runs
	resumeErr  error
	done       chan struct{}

	// runningSince is when the function started to run (Unix ns, 0 while
	// held); Resume writes it from any goroutine.
	runningSince atomic.Int64

	// Written by the supervising goroutine, read by the waiting goroutine
	// after the supervisor returned.
	timedOut, cancelled bool
	result              Result
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
	p, err := s.start(ctx, spec)
	if err != nil {
		s.wg.Done()
		return nil, err
	}
	s.mu.Lock()
	s.running[p] = struct{}{}
	if s.closed { // Close ran while this one started: it goes too.
		p.Cancel()
	}
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		p.wait()
		s.mu.Lock()
		delete(s.running, p)
		s.mu.Unlock()
	}()
	return p, nil
}

func (s *Sandbox) start(ctx context.Context, spec Spec) (*Process, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("output pipe: %w", err)
	}
	b, err := s.host.start(ctx, spec, w)
	// Only the child holds the write end now, so EOF means every holder
	// is gone.
	_ = w.Close()
	if err != nil {
		_ = r.Close()
		return nil, err
	}
	span := trace.SpanFromContext(ctx)
	p := &Process{
		spec:      spec,
		log:       s.log.With("execution_id", spec.ID, "pid", b.pid()),
		box:       b,
		output:    r,
		span:      span.SpanContext(),
		tp:        span.TracerProvider(),
		cancelReq: make(chan struct{}),
		resumed:   make(chan struct{}),
		done:      make(chan struct{}),
	}
	if !spec.Hold {
		p.runningSince.Store(time.Now().UnixNano())
		p.resumeOnce.Do(func() { close(p.resumed) })
	}
	return p, nil
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
func (p *Process) Done() <-chan struct{} { return p.done }

// Result is how the execution ended; valid after Done is closed.
func (p *Process) Result() Result {
	<-p.done
	return p.result
}

// Resume lets a process started with Spec.Hold run the function. It is
// idempotent and a no-op for a process that was not held; after Cancel it
// does nothing.
func (p *Process) Resume() error {
	p.resumeOnce.Do(func() {
		select {
		case <-p.cancelReq:
			p.resumeErr = ErrClosed
			return
		default:
		}
		p.runningSince.Store(time.Now().UnixNano())
		p.resumeErr = p.box.resume()
		close(p.resumed)
	})
	return p.resumeErr
}

// Cancel kills the whole tree at once. It is idempotent and safe after
// Done; Result().Cancelled is set when the kill ended the execution.
func (p *Process) Cancel() {
	p.cancelOnce.Do(func() { close(p.cancelReq) })
}

// wait is the one goroutine that waits on the process; it closes done.
func (p *Process) wait() {
	copied := make(chan error, 1)
	drain := make(chan struct{})
	go func() { copied <- copyOutput(p.spec.Output, p.output, drain) }()

	p.supervise()
	ctx, span := p.cleanupSpan()
	// The main process is over, so the execution is: whatever it left
	// behind goes too, even a child that still holds the output open.
	if err := p.box.kill(); err != nil {
		p.log.Error("killing the rest of the tree", "err", err)
	}
	goneErr := p.box.waitGone(emptyTimeout)
	if goneErr != nil {
		p.log.Error("confirming the tree is gone", "err", goneErr)
	}
	res := Result{
		TimedOut:         p.timedOut,
		Cancelled:        p.cancelled,
		MemoryLimitBytes: p.box.memoryLimit(),
	}
	if since := p.runningSince.Load(); since != 0 {
		res.WallTime = time.Since(time.Unix(0, since))
	}

	// A kernel object that proved every process gone means every writer is
	// gone: read to EOF, however slow Spec.Output is. Without that proof a
	// process that left the group may still hold the pipe: then each
	// further read may wait at most DrainTimeout.
	if !p.box.provesGone() || goneErr != nil {
		close(drain)
		if err := p.output.SetReadDeadline(time.Now().Add(DrainTimeout)); err != nil && !errors.Is(err, os.ErrNoDeadline) {
			p.log.Error("bounding the output drain", "err", err)
		}
	}
	res.OutputErr = <-copied
	_ = p.output.Close()
	p.box.finish(&res)
	p.result = res
	span.SetAttributes(attribute.Int("process.exit.code", res.ExitCode))
	span.End()
	close(p.done)
	p.box.release(goneErr == nil)
	_ = ctx
}

// cleanupSpan starts the span of the work after the main process exited,
// as a child of the caller's span at Start.
func (p *Process) cleanupSpan() (context.Context, trace.Span) {
	ctx := trace.ContextWithSpanContext(context.Background(), p.span)
	return p.tp.Tracer(tracerName).Start(ctx, SpanCleanup)
}

// supervise enforces the timeout and acts on Cancel until the main process
// exits.
func (p *Process) supervise() {
	exited := p.box.exited()
	// A held process has no timeout yet: it has not run.
	select {
	case <-p.resumed:
	case <-exited:
		return
	case <-p.cancelReq:
		p.cancelled = true
		if err := p.box.kill(); err != nil {
			p.log.Error("cancel: killing the held process", "err", err)
		}
		<-exited
		return
	}
	var deadline, grace <-chan time.Time
	if p.spec.Timeout > 0 {
		t := time.NewTimer(p.spec.Timeout)
		defer t.Stop()
		deadline = t.C
	}
	for {
		select {
		case <-exited:
			return
		case <-p.cancelReq:
			p.cancelled = true
			if err := p.box.kill(); err != nil {
				p.log.Error("cancel: killing the tree", "err", err)
			}
			<-exited
			return
		case <-deadline:
			p.timedOut = true
			deadline = nil
			if err := p.box.terminate(); err != nil {
				p.log.Error("timeout: terminating the tree", "err", err)
			}
			t := time.NewTimer(p.spec.KillGrace)
			defer t.Stop()
			grace = t.C
		case <-grace:
			if err := p.box.kill(); err != nil {
				p.log.Error("timeout: killing the tree after the grace", "err", err)
			}
			<-exited
			return
		}
	}
}

// copyOutput copies everything read to out; when out fails it keeps reading
// (and dropping) so the function never blocks on a full pipe. Once drain is
// closed, each read may wait at most DrainTimeout (an idle bound, so a slow
// out does not cut the output short); past it the rest is abandoned.
func copyOutput(out io.Writer, r *os.File, drain <-chan struct{}) error {
	buf := make([]byte, 32<<10)
	var outErr error
	for {
		select {
		case <-drain:
			if err := r.SetReadDeadline(time.Now().Add(DrainTimeout)); err != nil && !errors.Is(err, os.ErrNoDeadline) {
				return errors.Join(outErr, err)
			}
		default:
		}
		n, err := r.Read(buf)
		if n > 0 && outErr == nil {
			if _, werr := out.Write(buf[:n]); werr != nil {
				outErr = werr
			}
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return errors.Join(outErr, ErrOutputAbandoned)
		}
		if err != nil {
			return outErr
		}
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
