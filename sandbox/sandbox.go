// Package sandbox starts one function process and contains it: its own
// process group (Linux) or job object (Windows), on Linux a cgroup it is born
// into with memory, CPU and pids limits, an unprivileged user, and a kill
// that takes the whole tree at once.
package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
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
	// DrainTimeout bounds reading the rest of the output after the tree was
	// killed. With a cgroup the pipe reaches EOF at once; without one, a
	// process that left the process group may still hold it open.
	DrainTimeout = 250 * time.Millisecond
	// emptyTimeout bounds waiting for a killed cgroup to become empty.
	emptyTimeout = 5 * time.Second
)

// Errors callers can test with errors.Is.
// ErrOutputAbandoned says the end of an execution's output was not read:
// a process that escaped the process group (no cgroup to hold it) kept the
// pipe open after the execution ended.
var ErrOutputAbandoned = errors.New("output abandoned: a process outside the sandbox kept it open")

var (
	// ErrInvalidSpec is returned by Start for a spec it refuses; nothing was
	// started or created.
	ErrInvalidSpec = errors.New("invalid execution spec")
	// ErrClosed is returned by Start after Close.
	ErrClosed = errors.New("sandbox closed")
	// ErrOutOfMemory is the error an OOM-killed execution reports (see
	// Result.Err): the kernel's own counter said so.
	ErrOutOfMemory = errors.New("out of memory")
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
	// ID names the execution (and its cgroup); unique among running ones.
	ID string
	// Path is the absolute path of the executable.
	Path string
	// Args follow Path in argv.
	Args []string
	// Dir is the working directory.
	Dir string
	// Env is the complete environment; nothing is inherited from the agent.
	// The sandbox adds TMPDIR (the private scratch dir) and, when Env has no
	// HOME, HOME set to the same dir.
	Env []string
	// Limits are applied before the first instruction of the function runs.
	Limits Limits
	// Timeout, when non-zero, ends the execution: SIGTERM to the whole tree,
	// then a kill after KillGrace (DefaultKillGrace when zero).
	Timeout   time.Duration
	KillGrace time.Duration
	// Output receives stdout and stderr as one stream, in the order written.
	// It is written from a single goroutine, and never after Done is closed.
	// Nil discards the output.
	Output io.Writer
}

// Result is how an execution ended.
type Result struct {
	// ExitCode is the process's exit status, or 128+N when signal N killed it.
	ExitCode int
	// Signal is the signal that killed the process, 0 if it exited.
	Signal int
	// OOMKilled is read from the cgroup's own counters, never guessed.
	OOMKilled bool
	TimedOut  bool
	Cancelled bool
	// MemoryLimitBytes is the limit that was in force (0: none), so an OOM can
	// be reported against it.
	MemoryLimitBytes int64
	// PeakMemoryBytes and CPUTime are 0 when they could not be measured.
	PeakMemoryBytes uint64
	CPUTime         time.Duration
	StartedAt       time.Time
	WallTime        time.Duration
	// OutputErr is the first error of Spec.Output, or ErrOutputAbandoned
	// when a process outside the sandbox's reach kept the output open; the
	// output after it was
	// read and dropped so the function never blocked on a full pipe.
	OutputErr error
}

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
	// CgroupRoot is the cgroup path (as in /proc/self/cgroup, e.g.
	// "/flux-agent" or "/system.slice/flux-agent.service") under which the
	// sandbox makes one cgroup per execution. "" detects it: on v2 the
	// agent's own cgroup (the agent first moves itself into a leaf "agent"
	// there, as systemd's Delegate=yes requires); on v1 "/flux-agent" in
	// each controller's hierarchy.
	CgroupRoot string
	// User runs functions as this user (production: "flux-runner"); "" runs
	// them as the agent itself.
	User string
	// UIDs, when its Count is set, gives each running execution a uid of
	// its own from this range (with User's group); otherwise all run as
	// User. Linux, as root, only.
	UIDs UIDRange
	// PidsLimit bounds the processes of one execution; 0 means
	// DefaultPidsLimit, NoPidsLimit none.
	PidsLimit int64
	// ScratchDir is the parent of the per-execution private TMPDIR; "" means
	// os.TempDir().
	ScratchDir string
	// Logger receives the one start-up line about missing isolation and
	// errors of cleanups nobody waits for. Nil discards.
	Logger *slog.Logger

	// noCgroups makes tests exercise the containment a host without
	// writable cgroups gets.
	noCgroups bool
}

// Isolation is what containment is in force, so the agent can show it in
// its logs and metrics.
type Isolation struct {
	// Cgroup is "v2", "v1" or "none" (Windows: "none").
	Cgroup string
	// UIDRange is set when each execution runs as a uid of its own.
	UIDRange UIDRange
	// JobObject is true on Windows, where each execution has a job object.
	JobObject bool
	// User is the user functions run as; UID its uid (-1 on Windows).
	User string
	UID  int
	// Degraded lists, in words, each isolation that is missing and why.
	Degraded []string
}

// Sandbox starts executions. It is safe for concurrent use.
type Sandbox struct {
	cfg        Config
	log        *slog.Logger
	host       *host
	isolation  Isolation
	scratchDir string // this agent's own dir of scratch dirs

	mu      sync.Mutex
	closed  bool
	running map[*Process]struct{}
	wg      sync.WaitGroup
	seq     atomic.Uint64
}

// New detects what isolation the host allows, looks the user up once, and
// removes the cgroups and scratch dirs a crashed agent left behind. Missing
// isolation is not an error: it is logged once and listed in Isolation.
func New(cfg Config) (*Sandbox, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.PidsLimit < NoPidsLimit {
		return nil, fmt.Errorf("pids limit %d: must be positive, 0 (the default) or NoPidsLimit", cfg.PidsLimit)
	}
	if cfg.PidsLimit == 0 {
		cfg.PidsLimit = DefaultPidsLimit
	}
	if cfg.ScratchDir == "" {
		cfg.ScratchDir = os.TempDir()
	}
	instance, err := newInstanceName()
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	removeStaleScratch(cfg.ScratchDir, cfg.Logger)
	scratchDir := filepath.Join(cfg.ScratchDir, scratchPrefix+instance)
	if err := os.Mkdir(scratchDir, 0o755); err != nil {
		return nil, fmt.Errorf("sandbox: scratch dir: %w", err)
	}
	h, iso, err := newHost(cfg, instance)
	if err != nil {
		_ = os.Remove(scratchDir)
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	if len(iso.Degraded) > 0 {
		cfg.Logger.Warn("sandbox runs functions without part of its isolation",
			"cgroup", iso.Cgroup, "user", iso.User, "missing", strings.Join(iso.Degraded, "; "))
	} else {
		cfg.Logger.Info("sandbox isolation", "cgroup", iso.Cgroup, "user", iso.User, "uid", iso.UID)
	}
	return &Sandbox{
		cfg:        cfg,
		log:        cfg.Logger,
		host:       h,
		isolation:  iso,
		scratchDir: scratchDir,
		running:    make(map[*Process]struct{}),
	}, nil
}

// Isolation reports what containment is in force.
func (s *Sandbox) Isolation() Isolation {
	iso := s.isolation
	iso.Degraded = append([]string(nil), iso.Degraded...)
	return iso
}

// Close cancels every execution still running, waits until each is Done,
// and removes the sandbox's own cgroup and scratch dir. Start fails after it.
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
	return errors.Join(s.host.close(), removeScratch(s.scratchDir))
}

// Process is one running execution.
type Process struct {
	spec      Spec
	log       *slog.Logger
	cmd       *exec.Cmd
	box       *box
	output    *os.File
	scratch   string
	startedAt time.Time

	cancelOnce sync.Once
	cancelReq  chan struct{}
	done       chan struct{}

	// Written by the supervising goroutine, read by the waiting goroutine
	// after the supervisor returned.
	timedOut, cancelled bool
	result              Result
}

// Start starts one execution. The process is in its cgroup before its first
// instruction. ctx covers the start only, not the execution's lifetime:
// use Spec.Timeout and Cancel for that.
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
	name := dirName(spec.ID, s.seq.Add(1))
	scratch := filepath.Join(s.scratchDir, name)
	p, err := s.start(spec, name, scratch)
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

func (s *Sandbox) start(spec Spec, name, scratch string) (p *Process, err error) {
	if err := os.Mkdir(scratch, 0o700); err != nil {
		return nil, fmt.Errorf("scratch dir: %w", err)
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, removeScratch(scratch))
		}
	}()
	if fi, err := os.Stat(spec.Path); err != nil {
		return nil, fmt.Errorf("handler: %w", err)
	} else if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: handler %s is not a regular file", ErrInvalidSpec, spec.Path)
	}
	uid, err := s.host.acquireUID()
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			s.host.releaseUID(uid)
		}
	}()
	if err := s.host.ownScratch(scratch, uid); err != nil {
		return nil, fmt.Errorf("scratch dir: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("output pipe: %w", err)
	}
	cmd := &exec.Cmd{
		Path:   spec.Path,
		Args:   append([]string{spec.Path}, spec.Args...),
		Dir:    spec.Dir,
		Env:    executionEnv(spec.Env, scratch),
		Stdout: w, // one pipe for both keeps the order written
		Stderr: w,
	}
	b, err := s.host.start(cmd, name, spec.Limits, uid)
	// Only the child holds the write end now, so EOF means every holder
	// is gone.
	_ = w.Close()
	if err != nil {
		_ = r.Close()
		return nil, err
	}
	return &Process{
		spec:      spec,
		log:       s.log.With("execution_id", spec.ID, "pid", cmd.Process.Pid),
		cmd:       cmd,
		box:       b,
		output:    r,
		scratch:   scratch,
		startedAt: time.Now(),
		cancelReq: make(chan struct{}),
		done:      make(chan struct{}),
	}, nil
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
	return nil
}

// MinCPUMillicores is the smallest CPU limit: the smallest CFS quota the
// kernel takes is 1 ms per 100 ms period. Start refuses less.
const MinCPUMillicores = 10

// executionEnv is exactly env plus the scratch dir as TMPDIR (and HOME when
// env has none); an entry of env with those keys is replaced.
func executionEnv(env []string, scratch string) []string {
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
		out = append(out, k+"="+scratch)
	}
	if !hasHome {
		out = append(out, "HOME="+scratch)
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

// dirName is a cgroup and directory name for an execution: its id made
// safe, and a sequence number that keeps names unique.
func dirName(id string, seq uint64) string {
	const maxLen = 64
	var b strings.Builder
	for _, r := range id {
		if b.Len() >= maxLen {
			break
		}
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
	}
	return "x" + strconv.FormatUint(seq, 10) + "-" + b.String()
}

// Pid is the process id of the execution's main process.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Done is closed once the execution is over: the main process exited, the
// rest of its tree is confirmed gone, the output is drained into
// Spec.Output, and its cgroup and scratch dir are removed.
func (p *Process) Done() <-chan struct{} { return p.done }

// Result is how the execution ended; valid after Done is closed.
func (p *Process) Result() Result {
	<-p.done
	return p.result
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

	exited := make(chan struct{})
	supervised := make(chan struct{})
	go func() {
		defer close(supervised)
		p.supervise(exited)
	}()

	if err := waitExited(p.cmd.Process); err != nil {
		p.log.Error("waiting for the process", "err", err)
	}
	close(exited)
	<-supervised
	// The main process is over, so the execution is: whatever it left
	// behind goes too, even a child that still holds the output open.
	if err := p.box.kill(); err != nil {
		p.log.Error("killing the rest of the tree", "err", err)
	}
	waitErr := p.cmd.Wait()
	emptyErr := p.box.waitEmpty(emptyTimeout)
	if emptyErr != nil {
		p.log.Error("confirming the tree is gone", "err", emptyErr)
	}
	wall := time.Since(p.startedAt)

	// A cgroup confirmed empty means every writer is gone: read to EOF,
	// however slow Spec.Output is. Without that proof a process that left
	// the group may still hold the pipe: then each further read may wait
	// at most DrainTimeout.
	if !p.box.limited() || emptyErr != nil {
		close(drain)
		if err := p.output.SetReadDeadline(time.Now().Add(DrainTimeout)); err != nil && !errors.Is(err, os.ErrNoDeadline) {
			p.log.Error("bounding the output drain", "err", err)
		}
	}
	outErr := <-copied
	_ = p.output.Close()

	res := Result{
		TimedOut:         p.timedOut,
		Cancelled:        p.cancelled,
		StartedAt:        p.startedAt,
		WallTime:         wall,
		OutputErr:        outErr,
		MemoryLimitBytes: derefOr(p.spec.Limits.MemoryBytes, 0),
	}
	if state := p.cmd.ProcessState; state != nil {
		res.ExitCode, res.Signal = exitStatus(state)
	} else {
		p.log.Error("process state unknown", "err", waitErr)
		res.ExitCode = -1
	}
	p.box.measure(&res, p.cmd.ProcessState)
	if !p.box.limited() {
		res.MemoryLimitBytes = 0
	}
	if err := p.box.remove(); err != nil {
		p.log.Error("removing the execution's cgroup", "err", err)
	}
	if err := removeScratch(p.scratch); err != nil {
		p.log.Error("removing the scratch dir", "err", err)
	}
	p.result = res
	close(p.done)
}

// supervise enforces the timeout and acts on Cancel until the main process
// exits.
func (p *Process) supervise(exited <-chan struct{}) {
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
			return
		case <-deadline:
			p.timedOut = true
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

// sandboxCount numbers the Sandboxes of this process, so that several (in
// tests) never share an instance name.
var sandboxCount atomic.Uint64

// newInstanceName names one Sandbox, for its cgroups and scratch dirs:
// the process's identity and a count.
func newInstanceName() (string, error) {
	id, err := processIdentity()
	if err != nil {
		return "", err
	}
	return id + "-" + strconv.FormatUint(sandboxCount.Add(1), 10), nil
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

// poll calls done until it reports true or fails, backing off from 1 ms to
// 20 ms, and fails after timeout.
func poll(timeout time.Duration, done func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for pause := time.Millisecond; ; pause = min(2*pause, 20*time.Millisecond) {
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
