package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/windows"
)

// scratchEnvKeys name the scratch dir in the function's environment.
var scratchEnvKeys = []string{"TMP", "TEMP"}

// envKeyEqual compares environment keys as Windows does: ignoring case.
func envKeyEqual(a, b string) bool { return strings.EqualFold(a, b) }

// killedExitCode is the exit code of a process ended by a cancel or a
// timeout: the same number a SIGKILL gives on Linux.
const killedExitCode = 137

// Job object structures and messages x/sys/windows does not define
// (winnt.h).
type (
	jobAssociateCompletionPort struct {
		CompletionKey  uintptr
		CompletionPort windows.Handle
	}
	jobCPURateControl struct {
		ControlFlags uint32
		CPURate      uint32
	}
	jobBasicAccounting struct {
		TotalUserTime             int64
		TotalKernelTime           int64
		ThisPeriodTotalUserTime   int64
		ThisPeriodTotalKernelTime int64
		TotalPageFaultCount       uint32
		TotalProcesses            uint32
		ActiveProcesses           uint32
		TotalTerminatedProcesses  uint32
	}
	// processMemoryCounters is psapi.h's PROCESS_MEMORY_COUNTERS.
	processMemoryCounters struct {
		CB                         uint32
		PageFaultCount             uint32
		PeakWorkingSetSize         uintptr
		WorkingSetSize             uintptr
		QuotaPeakPagedPoolUsage    uintptr
		QuotaPagedPoolUsage        uintptr
		QuotaPeakNonPagedPoolUsage uintptr
		QuotaNonPagedPoolUsage     uintptr
		PagefileUsage              uintptr
		PeakPagefileUsage          uintptr
	}
)

// procGetProcessMemoryInfo is GetProcessMemoryInfo as kernel32 exports it
// (Windows 7 on), which x/sys/windows does not wrap.
var procGetProcessMemoryInfo = windows.NewLazySystemDLL("kernel32.dll").NewProc("K32GetProcessMemoryInfo")

const (
	jobCPURateControlEnable  = 0x1
	jobCPURateControlHardCap = 0x4

	jobMsgProcessMemoryLimit = 9
	jobMsgJobMemoryLimit     = 10

	stillActive = 259
)

// host is the Windows containment: a job object per execution. Functions
// run as the agent's own account.
type host struct {
	cfg        Config
	log        *slog.Logger
	iso        Isolation
	scratchDir string // this instance's dir of per-execution TMP dirs
}

func newHost(cfg Config) (*host, error) {
	iso := Isolation{Cgroup: "none", UID: -1, Network: NetworkHost}
	if u, err := user.Current(); err == nil {
		iso.User = u.Username
	}
	if cfg.User != "" {
		iso.Degraded = append(iso.Degraded, fmt.Sprintf("running functions as %q is not supported on Windows: they run as the agent's own account", cfg.User))
	} else {
		iso.Degraded = append(iso.Degraded, "no user configured: functions run as the agent's own account")
	}
	if cfg.Network.Mode != NetworkHost {
		return nil, fmt.Errorf("network %s is not supported on Windows; set sandbox.network: host", cfg.Network.Mode)
	}
	iso.Degraded = append(iso.Degraded, "network is host: functions reach every address the node reaches")
	identity, err := processIdentity()
	if err != nil {
		return nil, err
	}
	removeStaleScratch(cfg.ScratchDir, cfg.Logger)
	dir := filepath.Join(cfg.ScratchDir, scratchPrefix+identity+"-"+strconv.FormatUint(sandboxCount.Add(1), 10))
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, fmt.Errorf("scratch dir: %w", err)
	}
	return &host{cfg: cfg, log: cfg.Logger, iso: iso, scratchDir: dir}, nil
}

func (h *host) isolation() Isolation { return h.iso }

func (h *host) close() error { return removeScratch(h.scratchDir) }

// box is one execution's job object, followed by goroutines of its own.
type box struct {
	log     *slog.Logger
	spec    Spec
	onDone  func()
	proc    *os.Process
	job     windows.Handle
	process windows.Handle
	port    windows.Handle // receives the job's limit messages
	limits  jobLimits
	scratch string
	output  *os.File // the read end of the output pipe
	exit    chan struct{}
	since   time.Time
	// mu guards since, written by resume, and over: set once the
	// execution is over, before its handles are closed.
	mu     sync.Mutex
	over   bool
	res    Result
	doneCh chan struct{}
}

// start creates the job, starts the process suspended, assigns it to the
// job and only then resumes it (unless held): no instruction of the
// function, and so no child of it, runs outside the job.
func (h *host) start(_ context.Context, spec Spec, onDone func()) (_ *box, err error) {
	// b is undone on every failure; the named result stays nil until the
	// end, so the cleanup never sees a nil box.
	b := &box{log: h.log.With("execution_id", spec.ID), spec: spec, onDone: onDone,
		limits: newJobLimits(spec.Limits, h.cfg.PidsLimit, runtime.NumCPU()), exit: make(chan struct{}), doneCh: make(chan struct{})}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("output pipe: %w", err)
	}
	b.output = r
	// Only the child holds the write end once it started.
	defer w.Close()
	defer func() {
		if err != nil {
			b.closeHandles()
			_ = r.Close()
			if b.scratch != "" {
				_ = removeScratch(b.scratch)
			}
		}
	}()
	b.scratch = filepath.Join(h.scratchDir, "x"+strconv.FormatUint(scratchCount.Add(1), 10))
	if err := os.Mkdir(b.scratch, 0o700); err != nil {
		return nil, fmt.Errorf("scratch dir: %w", err)
	}
	if b.job, err = windows.CreateJobObject(nil, nil); err != nil {
		return nil, fmt.Errorf("job object: %w", err)
	}
	if b.port, err = windows.CreateIoCompletionPort(windows.InvalidHandle, 0, 0, 1); err != nil {
		return nil, fmt.Errorf("job completion port: %w", err)
	}
	assoc := jobAssociateCompletionPort{CompletionKey: uintptr(b.job), CompletionPort: b.port}
	if err := setJobInfo(b.job, windows.JobObjectAssociateCompletionPortInformation, &assoc); err != nil {
		return nil, fmt.Errorf("job completion port: %w", err)
	}
	var ext windows.JOBOBJECT_EXTENDED_LIMIT_INFORMATION
	ext.BasicLimitInformation.LimitFlags = b.limits.flags
	ext.BasicLimitInformation.ActiveProcessLimit = b.limits.activeProcesses
	ext.JobMemoryLimit = uintptr(b.limits.jobMemory)
	if err := setJobInfo(b.job, windows.JobObjectExtendedLimitInformation, &ext); err != nil {
		return nil, fmt.Errorf("job limits: %w", err)
	}
	if b.limits.cpuRate > 0 {
		rate := jobCPURateControl{ControlFlags: jobCPURateControlEnable | jobCPURateControlHardCap, CPURate: b.limits.cpuRate}
		if err := setJobInfo(b.job, windows.JobObjectCpuRateControlInformation, &rate); err != nil {
			return nil, fmt.Errorf("job cpu limit: %w", err)
		}
	}
	devNull, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	defer devNull.Close()
	b.proc, err = os.StartProcess(spec.Path, append([]string{spec.Path}, spec.Args...), &os.ProcAttr{
		Dir:   spec.Dir,
		Env:   executionEnv(spec.Env, b.scratch),
		Files: []*os.File{devNull, w, w},
		Sys: &syscall.SysProcAttr{
			CreationFlags: windows.CREATE_SUSPENDED | windows.CREATE_NEW_PROCESS_GROUP,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.Path, err)
	}
	abandon := func(err error) (*box, error) {
		_ = b.proc.Kill()
		_, _ = b.proc.Wait()
		return nil, err
	}
	const access = windows.PROCESS_SET_QUOTA | windows.PROCESS_TERMINATE | windows.SYNCHRONIZE | windows.PROCESS_QUERY_LIMITED_INFORMATION
	if b.process, err = windows.OpenProcess(access, false, uint32(b.proc.Pid)); err != nil {
		return abandon(fmt.Errorf("open process %d: %w", b.proc.Pid, err))
	}
	if err := windows.AssignProcessToJobObject(b.job, b.process); err != nil {
		return abandon(fmt.Errorf("assign process %d to its job: %w", b.proc.Pid, err))
	}
	if !spec.Hold {
		if err := resumeProcess(b.proc.Pid); err != nil {
			return abandon(err)
		}
		b.since = time.Now()
	}
	go b.follow()
	return b, nil
}

func (b *box) pid() int              { return b.proc.Pid }
func (b *box) done() <-chan struct{} { return b.doneCh }
func (b *box) result() Result        { return b.res }
func (b *box) logger() *slog.Logger  { return b.log }

func (b *box) resume() error {
	if !b.spec.Hold {
		return nil
	}
	b.mu.Lock()
	b.since = time.Now()
	b.mu.Unlock()
	return resumeProcess(b.proc.Pid)
}

// usage reads the job's CPU time and the main process's commit charge
// (the job APIs give only the peak of the whole job), while the handles
// are still open.
func (b *box) usage() (Usage, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.over {
		return Usage{}, ErrExecutionOver
	}
	var acct jobBasicAccounting
	if err := queryJobInfo(b.job, windows.JobObjectBasicAccountingInformation, &acct); err != nil {
		return Usage{}, fmt.Errorf("job accounting: %w", err)
	}
	mem, err := processCommit(b.process)
	if err != nil {
		return Usage{}, err
	}
	// The job counts CPU time in 100 ns units.
	return Usage{UID: -1, MemoryBytes: mem, CPUTime: time.Duration(acct.TotalUserTime+acct.TotalKernelTime) * 100}, nil
}

// processCommit is the private memory a process has committed, which is
// what a job's memory limit counts.
func processCommit(h windows.Handle) (uint64, error) {
	if err := procGetProcessMemoryInfo.Find(); err != nil {
		return 0, fmt.Errorf("process memory: %w", err)
	}
	c := processMemoryCounters{CB: uint32(unsafe.Sizeof(processMemoryCounters{}))}
	ok, _, err := procGetProcessMemoryInfo.Call(uintptr(h), uintptr(unsafe.Pointer(&c)), uintptr(c.CB))
	if ok == 0 {
		return 0, fmt.Errorf("process memory: %w", err)
	}
	return uint64(c.PagefileUsage), nil
}

// follow copies the output and waits for the main process; once it has
// exited, it kills the rest of the job, drains the output, measures, says
// the execution is over and releases the job.
func (b *box) follow() {
	copied := make(chan error, 1)
	drain := make(chan struct{})
	go func() { copied <- copyOutput(b.spec.Output, b.output, drain) }()
	if _, err := windows.WaitForSingleObject(b.process, windows.INFINITE); err != nil {
		b.log.Error("waiting for the function", "err", err)
	}
	b.mu.Lock()
	since := b.since
	b.mu.Unlock()
	var wall time.Duration
	if !since.IsZero() {
		wall = time.Since(since)
	}
	if err := b.kill(); err != nil {
		b.log.Error("killing the rest of the job", "err", err)
	}
	goneErr := b.waitGone(emptyTimeout)
	if goneErr != nil {
		b.log.Error("confirming the job is empty", "err", goneErr)
		close(drain)
		if err := b.output.SetReadDeadline(time.Now().Add(DrainTimeout)); err != nil && !errors.Is(err, os.ErrNoDeadline) {
			b.log.Error("bounding the output drain", "err", err)
		}
	}
	res := Result{WallTime: wall, MemoryLimitBytes: int64(b.limits.jobMemory)}
	res.OutputErr = <-copied
	_ = b.output.Close()
	b.finish(&res)
	b.res = res
	b.mu.Lock()
	b.over = true // usage must not read the handles closed below
	b.mu.Unlock()
	b.onDone()
	close(b.doneCh)
	b.closeHandles()
	_ = removeScratch(b.scratch)
}

// copyOutput copies everything read to out; when out fails it keeps reading
// (and dropping) so the function never blocks on a full pipe. Once drain is
// closed, each read may wait at most DrainTimeout; past it the rest is
// abandoned.
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

func setJobInfo[T any](job windows.Handle, class uint32, info *T) error {
	_, err := windows.SetInformationJobObject(job, class, uintptr(unsafe.Pointer(info)), uint32(unsafe.Sizeof(*info)))
	return err
}

func queryJobInfo[T any](job windows.Handle, class int32, info *T) error {
	return windows.QueryInformationJobObject(job, class, uintptr(unsafe.Pointer(info)), uint32(unsafe.Sizeof(*info)), nil)
}

// resumeProcess resumes the threads of a process created suspended (its
// one main thread).
func resumeProcess(pid int) error {
	snap, err := windows.CreateToolhelp32Snapshot(windows.TH32CS_SNAPTHREAD, 0)
	if err != nil {
		return fmt.Errorf("resume process %d: %w", pid, err)
	}
	defer windows.CloseHandle(snap)
	entry := windows.ThreadEntry32{Size: uint32(unsafe.Sizeof(windows.ThreadEntry32{}))}
	resumed := 0
	for err = windows.Thread32First(snap, &entry); err == nil; err = windows.Thread32Next(snap, &entry) {
		if entry.OwnerProcessID != uint32(pid) {
			continue
		}
		th, err := windows.OpenThread(windows.THREAD_SUSPEND_RESUME, false, entry.ThreadID)
		if err != nil {
			return fmt.Errorf("resume process %d: thread %d: %w", pid, entry.ThreadID, err)
		}
		_, rerr := windows.ResumeThread(th)
		windows.CloseHandle(th)
		if rerr != nil {
			return fmt.Errorf("resume process %d: thread %d: %w", pid, entry.ThreadID, rerr)
		}
		resumed++
	}
	if resumed == 0 {
		return fmt.Errorf("resume process %d: no thread found", pid)
	}
	return nil
}

// terminate asks the process group to stop with CTRL_BREAK (console
// programs); where that cannot be delivered, it kills at once.
func (b *box) terminate() error {
	if err := windows.GenerateConsoleCtrlEvent(windows.CTRL_BREAK_EVENT, uint32(b.proc.Pid)); err != nil {
		return b.kill()
	}
	return nil
}

// kill terminates every process in the job; taskkill /F /T is the
// fallback when the job cannot be terminated.
func (b *box) kill() error {
	err := windows.TerminateJobObject(b.job, killedExitCode)
	if err == nil {
		return nil
	}
	if out, terr := exec.Command("taskkill", "/F", "/T", "/PID", strconv.Itoa(b.proc.Pid)).CombinedOutput(); terr != nil {
		return errors.Join(fmt.Errorf("terminate job: %w", err), fmt.Errorf("taskkill: %w: %s", terr, out))
	}
	return nil
}

func (b *box) waitGone(timeout time.Duration) error {
	return poll(timeout, func() (bool, error) {
		var acct jobBasicAccounting
		if err := queryJobInfo(b.job, windows.JobObjectBasicAccountingInformation, &acct); err != nil {
			return false, fmt.Errorf("job accounting: %w", err)
		}
		return acct.ActiveProcesses == 0, nil
	})
}

// finish reaps the process and reads the job's accounting; hitting the
// memory limit is known from the message the job posted to its completion
// port.
func (b *box) finish(res *Result) {
	state, err := b.proc.Wait()
	if err != nil {
		res.ExitCode = -1
	} else {
		res.ExitCode = state.ExitCode()
	}
	var acct jobBasicAccounting
	if err := queryJobInfo(b.job, windows.JobObjectBasicAccountingInformation, &acct); err == nil {
		res.CPUTime = time.Duration(acct.TotalUserTime+acct.TotalKernelTime) * 100
	}
	var ext windows.JOBOBJECT_EXTENDED_LIMIT_INFORMATION
	if err := queryJobInfo(b.job, windows.JobObjectExtendedLimitInformation, &ext); err == nil {
		res.PeakMemoryBytes = uint64(ext.PeakJobMemoryUsed)
	}
	for {
		var msg uint32
		var key uintptr
		var ov *windows.Overlapped
		if err := windows.GetQueuedCompletionStatus(b.port, &msg, &key, &ov, 0); err != nil {
			break // WAIT_TIMEOUT: no more messages
		}
		if msg == jobMsgJobMemoryLimit || msg == jobMsgProcessMemoryLimit {
			res.OOMKilled = true
		}
	}
}

func (b *box) closeHandles() {
	for _, h := range []windows.Handle{b.process, b.job, b.port} {
		if h != 0 {
			_ = windows.CloseHandle(h)
		}
	}
	b.process, b.job, b.port = 0, 0, 0
}

// processIdentity names this process: pid and creation time, which
// together never repeat on a host.
func processIdentity() (string, error) {
	created, err := processCreation(windows.CurrentProcess())
	if err != nil {
		return "", err
	}
	return strconv.Itoa(os.Getpid()) + "-" + strconv.FormatInt(created, 10), nil
}

func processCreation(h windows.Handle) (int64, error) {
	var created, exited, kernel, user windows.Filetime
	if err := windows.GetProcessTimes(h, &created, &exited, &kernel, &user); err != nil {
		return 0, fmt.Errorf("process times: %w", err)
	}
	return created.Nanoseconds(), nil
}

// processAlive says whether the process named identity still runs. A
// malformed identity counts as alive.
func processAlive(identity string) bool {
	pidText, createdText, ok := strings.Cut(identity, "-")
	pid, err := strconv.ParseUint(pidText, 10, 32)
	if _, cerr := strconv.ParseInt(createdText, 10, 64); !ok || err != nil || cerr != nil {
		return true
	}
	h, err := windows.OpenProcess(windows.PROCESS_QUERY_LIMITED_INFORMATION, false, uint32(pid))
	if err != nil {
		return !errors.Is(err, windows.ERROR_INVALID_PARAMETER) // no such process
	}
	defer windows.CloseHandle(h)
	var code uint32
	if err := windows.GetExitCodeProcess(h, &code); err == nil && code != stillActive {
		return false
	}
	created, err := processCreation(h)
	return err != nil || strconv.FormatInt(created, 10) == createdText
}

// Counters that keep names unique within the process.
var (
	sandboxCount atomic.Uint64
	scratchCount atomic.Uint64
)

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
		if i := strings.LastIndexByte(instance, '-'); i < 0 || processAlive(instance[:i]) {
			continue
		}
		if err := removeScratch(dir); err != nil {
			log.Warn("removing a crashed agent's scratch dir", "dir", dir, "err", err)
		}
	}
}

func removeScratch(dir string) error {
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("scratch dir: %w", err)
	}
	return nil
}
