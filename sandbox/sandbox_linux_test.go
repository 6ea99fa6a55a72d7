package sandbox

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/procfs"
)

// outputBuffer is a Spec.Output that tests can wait on.
type outputBuffer struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	changed chan struct{}
}

func newOutputBuffer() *outputBuffer { return &outputBuffer{changed: make(chan struct{})} }

func (b *outputBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	close(b.changed)
	b.changed = make(chan struct{})
	return b.buf.Write(p)
}

func (b *outputBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// waitFor waits until the output contains s.
func (b *outputBuffer) waitFor(t *testing.T, s string, timeout time.Duration) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		b.mu.Lock()
		has, changed := strings.Contains(b.buf.String(), s), b.changed
		b.mu.Unlock()
		if has {
			return
		}
		select {
		case <-changed:
		case <-deadline.C:
			t.Fatalf("output %q never contained %q", b.String(), s)
		}
	}
}

func newSandbox(t *testing.T, cfg Config) *Sandbox {
	t.Helper()
	s, err := New(testConfig(t, cfg))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// writeScript writes an executable shell script and returns its path.
func writeScript(t *testing.T, dir, body string) string {
	t.Helper()
	path := filepath.Join(dir, "run.sh")
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func start(t *testing.T, s *Sandbox, spec Spec) *Process {
	t.Helper()
	if spec.ID == "" {
		spec.ID = t.Name()
	}
	if spec.Dir == "" {
		spec.Dir = filepath.Dir(spec.Path)
	}
	p, err := s.Start(context.Background(), spec)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	return p
}

func waitDone(t *testing.T, p *Process, timeout time.Duration) Result {
	t.Helper()
	select {
	case <-p.Done():
		return p.Result()
	case <-time.After(timeout):
		p.Cancel()
		<-p.Done()
		t.Fatalf("execution not done within %v", timeout)
		return Result{}
	}
}

// run runs a script to completion and returns its output and result.
func run(t *testing.T, s *Sandbox, body string, spec Spec) (string, Result) {
	t.Helper()
	spec.Path = writeScript(t, t.TempDir(), body)
	out := newOutputBuffer()
	spec.Output = out
	res := waitDone(t, start(t, s, spec), 30*time.Second)
	return out.String(), res
}

// processGone says whether pid is dead (gone, or a zombie nobody reaps).
func processGone(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	return len(fields) > 0 && (fields[0] == "Z" || fields[0] == "X")
}

// testConfig fills in what every test sandbox needs: a scratch dir of the
// test's own, a uid range no other sandbox of the run uses, and the host
// network unless the test is about the network policy.
func testConfig(t testing.TB, cfg Config) Config {
	if cfg.ScratchDir == "" {
		cfg.ScratchDir = t.TempDir()
	}
	if cfg.User != "" && cfg.UIDs.Count == 0 && !cfg.SharedUID {
		cfg.UIDs = nextTestUIDs(64)
	}
	if cfg.Network.Mode == "" {
		cfg.Network.Mode = NetworkHost
	}
	return cfg
}

// testUIDBlocks hands out uid blocks for test sandboxes; the e2e tests, which
// may run at the same time, use another part of the uid space.
var testUIDBlocks atomic.Uint32

func nextTestUIDs(n uint32) UIDRange {
	return UIDRange{First: 2_950_000 + testUIDBlocks.Add(n) - n, Count: n}
}

func TestOutputKeepsTheOrderWritten(t *testing.T) {
	forEachContainment(t, testOutputKeepsTheOrderWritten)
}

func testOutputKeepsTheOrderWritten(t *testing.T, cfg Config) {
	s := newSandbox(t, cfg)
	out, res := run(t, s, `i=0
while [ $i -lt 2000 ]; do echo "out $i"; echo "err $i" >&2; i=$((i+1)); done`, Spec{})
	if res.ExitCode != 0 {
		t.Fatalf("exit code %d", res.ExitCode)
	}
	var want strings.Builder
	for i := range 2000 {
		fmt.Fprintf(&want, "out %d\nerr %d\n", i, i)
	}
	if diff := cmp.Diff(want.String(), out); diff != "" {
		t.Errorf("output (-want +got):\n%s", diff)
	}
}

func TestEnvironmentIsExactlyTheSpecs(t *testing.T) {
	forEachContainment(t, testEnvironmentIsExactlyTheSpecs)
}

func testEnvironmentIsExactlyTheSpecs(t *testing.T, cfg Config) {
	t.Setenv("FLUX_AGENT_SECRET", "agent-only")
	s := newSandbox(t, cfg)
	spec := testChild(t, "env")
	spec.Env = append(spec.Env, "A=1", "PATH=/usr/bin:/bin", "TMPDIR=/overridden", "-odd=key")
	out := newOutputBuffer()
	spec.Output = out
	res := waitDone(t, start(t, s, spec), 30*time.Second)
	var tmpdir string
	var got []string
	for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		switch {
		case strings.HasPrefix(l, "TMPDIR="):
			tmpdir = strings.TrimPrefix(l, "TMPDIR=")
			got = append(got, "TMPDIR=<scratch>")
		case strings.HasPrefix(l, "HOME="):
			if l != "HOME="+tmpdir && tmpdir != "" {
				t.Errorf("HOME %q is not the scratch dir %q", l, tmpdir)
			}
			got = append(got, "HOME=<scratch>")
		default:
			got = append(got, l)
		}
	}
	want := []string{"-odd=key", "A=1", testChildEnv + "=env", "HOME=<scratch>", "PATH=/usr/bin:/bin", "TMPDIR=<scratch>", "scratch writable"}
	if diff := cmp.Diff(want, got); diff != "" || res.ExitCode != 0 {
		t.Errorf("exit %d, environment (-want +got):\n%s", res.ExitCode, diff)
	}
	if s.Isolation().Namespaces {
		if tmpdir != privateTmp {
			t.Errorf("TMPDIR %q, want the private %s", tmpdir, privateTmp)
		}
	} else if _, err := os.Stat(tmpdir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("scratch dir %q left behind: %v", tmpdir, err)
	}
}

func TestStdinIsEmpty(t *testing.T) { forEachContainment(t, testStdinIsEmpty) }

func testStdinIsEmpty(t *testing.T, cfg Config) {
	s := newSandbox(t, cfg)
	out, res := run(t, s, `cat; echo "read $?"`, Spec{})
	if out != "read 0\n" || res.ExitCode != 0 {
		t.Errorf("got %q, exit %d", out, res.ExitCode)
	}
}

func TestExitCodes(t *testing.T) { forEachContainment(t, testExitCodes) }

func testExitCodes(t *testing.T, cfg Config) {
	s := newSandbox(t, cfg)
	for _, tc := range []struct {
		script         string
		code, signal   int
		wantErrMessage string
	}{
		{"exit 0", 0, 0, ""},
		{"exit 3", 3, 0, "exit code 3"},
		{"kill -TERM $$", 143, 15, "killed by signal 15 (exit code 143)"},
		{"kill -KILL $$", 137, 9, "killed by signal 9 (exit code 137)"},
	} {
		t.Run(tc.script, func(t *testing.T) {
			_, res := run(t, s, tc.script, Spec{})
			if res.ExitCode != tc.code || res.Signal != tc.signal {
				t.Errorf("exit %d signal %d, want %d %d", res.ExitCode, res.Signal, tc.code, tc.signal)
			}
			var msg string
			if err := res.Err(); err != nil {
				msg = err.Error()
			}
			if msg != tc.wantErrMessage {
				t.Errorf("Err() = %q, want %q", msg, tc.wantErrMessage)
			}
			if res.TimedOut || res.Cancelled || res.OOMKilled {
				t.Errorf("flags set: %+v", res)
			}
		})
	}
}

func TestBackgroundChildDoesNotDelayCompletion(t *testing.T) {
	forEachContainment(t, testBackgroundChildDoesNotDelayCompletion)
}

func testBackgroundChildDoesNotDelayCompletion(t *testing.T, cfg Config) {
	s := newSandbox(t, cfg)
	out, res := run(t, s, `sleep 60 &
echo "child $!"`, Spec{})
	if res.ExitCode != 0 {
		t.Fatalf("exit %d", res.ExitCode)
	}
	if res.WallTime > 5*time.Second {
		t.Errorf("completion took %v: the background child held it", res.WallTime)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(out, "child ")))
	if err != nil {
		t.Fatalf("output %q: %v", out, err)
	}
	if !processGone(pid) {
		t.Errorf("background child %d still alive after Done", pid)
	}
}

func TestCancelKillsTheTreeWithinASecond(t *testing.T) {
	forEachContainment(t, testCancelKillsTheTreeWithinASecond)
}

func testCancelKillsTheTreeWithinASecond(t *testing.T, cfg Config) {
	s := newSandbox(t, cfg)
	out := newOutputBuffer()
	p := start(t, s, Spec{Path: writeScript(t, t.TempDir(), `sleep 60 &
echo "child $!"
sleep 60`), Output: out})
	out.waitFor(t, "\n", 10*time.Second)
	asked := time.Now()
	p.Cancel()
	res := waitDone(t, p, time.Second)
	if took := time.Since(asked); took > time.Second {
		t.Errorf("cancel took %v", took)
	}
	if !res.Cancelled || res.TimedOut || res.ExitCode != 137 {
		t.Errorf("result %+v, want cancelled with exit 137", res)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(out.String(), "child ")))
	if pid == 0 || !processGone(pid) {
		t.Errorf("child %q alive after cancel", out.String())
	}
	p.Cancel() // idempotent and safe after Done
	if got := p.Result(); !reflect.DeepEqual(got, res) {
		t.Errorf("result changed after a second Cancel: %+v", got)
	}
}

func TestTimeoutTerminatesGracefully(t *testing.T) {
	forEachContainment(t, testTimeoutTerminatesGracefully)
}

func testTimeoutTerminatesGracefully(t *testing.T, cfg Config) {
	s := newSandbox(t, cfg)
	out, res := run(t, s, `trap 'echo bye; exit 7' TERM
echo ready
sleep 60 &
wait`, Spec{Timeout: 100 * time.Millisecond, KillGrace: 30 * time.Second})
	if !res.TimedOut || res.Cancelled || res.ExitCode != 7 {
		t.Errorf("result %+v, want timed out with exit 7", res)
	}
	if out != "ready\nbye\n" {
		t.Errorf("output %q", out)
	}
	if res.WallTime > 10*time.Second {
		t.Errorf("took %v: SIGTERM was not delivered", res.WallTime)
	}
}

func TestTimeoutKillsAfterTheGrace(t *testing.T) {
	forEachContainment(t, testTimeoutKillsAfterTheGrace)
}

func testTimeoutKillsAfterTheGrace(t *testing.T, cfg Config) {
	s := newSandbox(t, cfg)
	const timeout, grace = 100 * time.Millisecond, 300 * time.Millisecond
	out, res := run(t, s, `trap '' TERM
echo ready
while :; do sleep 1; done`, Spec{Timeout: timeout, KillGrace: grace})
	if !res.TimedOut || res.ExitCode != 137 || res.Signal != 9 {
		t.Errorf("result %+v, want timed out and killed", res)
	}
	if res.WallTime < timeout+grace {
		t.Errorf("killed after %v, before timeout+grace %v", res.WallTime, timeout+grace)
	}
	if out != "ready\n" {
		t.Errorf("output %q", out)
	}
}

func TestInvalidSpecIsRefused(t *testing.T) {
	s := newSandbox(t, Config{})
	neg, zero := int64(-1), int64(0)
	five := int64(5)
	for name, spec := range map[string]Spec{
		"no id":         {Path: "/bin/true"},
		"relative path": {ID: "x", Path: "bin/true"},
		"empty path":    {ID: "x"},
		"bad env":       {ID: "x", Path: "/bin/true", Env: []string{"NOEQUALS"}},
		"empty env key": {ID: "x", Path: "/bin/true", Env: []string{"=v"}},
		"nul in env":    {ID: "x", Path: "/bin/true", Env: []string{"A=b\x00c"}},
		"negative mem":  {ID: "x", Path: "/bin/true", Limits: Limits{MemoryBytes: &neg}},
		"zero pids":     {ID: "x", Path: "/bin/true", Limits: Limits{Pids: &zero}},
		"tiny cpu":      {ID: "x", Path: "/bin/true", Limits: Limits{CPUMillicores: &five}},
		"negative wait": {ID: "x", Path: "/bin/true", Timeout: -time.Second},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := s.Start(context.Background(), spec); !errors.Is(err, ErrInvalidSpec) {
				t.Errorf("Start = %v, want ErrInvalidSpec", err)
			}
		})
	}
	if dir := s.host.scratchDir; dir != "" {
		entries, err := os.ReadDir(dir)
		if err != nil || len(entries) != 0 {
			t.Errorf("refused specs left scratch dirs: %v %v", entries, err)
		}
	}
}

func TestMissingExecutableIsAnError(t *testing.T) {
	s := newSandbox(t, Config{})
	_, err := s.Start(context.Background(), Spec{ID: "x", Path: "/nonexistent/handler"})
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Start = %v, want ErrNotExist", err)
	}
}

func TestCloseCancelsRunningExecutions(t *testing.T) {
	s, err := New(testConfig(t, Config{}))
	if err != nil {
		t.Fatal(err)
	}
	p := start(t, s, Spec{Path: writeScript(t, t.TempDir(), "sleep 60")})
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case <-p.Done():
	default:
		t.Fatal("Close returned before the execution was done")
	}
	if !p.Result().Cancelled {
		t.Errorf("result %+v, want cancelled", p.Result())
	}
	if _, err := s.Start(context.Background(), Spec{ID: "y", Path: "/bin/true"}); !errors.Is(err, ErrClosed) {
		t.Errorf("Start after Close = %v, want ErrClosed", err)
	}
}

func TestOutputWriterErrorDoesNotBlockTheFunction(t *testing.T) {
	s := newSandbox(t, Config{})
	failing := errors.New("sink broken")
	p := start(t, s, Spec{
		Path:   writeScript(t, t.TempDir(), `head -c 1000000 /dev/zero; echo done`),
		Output: failingWriter{failing},
	})
	res := waitDone(t, p, 30*time.Second)
	if !errors.Is(res.OutputErr, failing) || res.ExitCode != 0 {
		t.Errorf("result %+v", res)
	}
}

type failingWriter struct{ err error }

func (w failingWriter) Write([]byte) (int, error) { return 0, w.err }

func TestStaleScratchOfADeadAgentIsRemoved(t *testing.T) {
	parent := t.TempDir()
	stale := filepath.Join(parent, scratchPrefix+"999999999-1-1")
	if err := os.MkdirAll(filepath.Join(stale, "x1-old"), 0o755); err != nil {
		t.Fatal(err)
	}
	foreign := filepath.Join(parent, scratchPrefix+"not-ours")
	if err := os.Mkdir(foreign, 0o755); err != nil {
		t.Fatal(err)
	}
	newSandbox(t, Config{ScratchDir: parent})
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale scratch dir kept: %v", err)
	}
	if _, err := os.Stat(foreign); err != nil {
		t.Errorf("a dir that is not an instance's was removed: %v", err)
	}
}

func TestExecutionEnv(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  []string
		want []string
	}{
		{"empty", nil, []string{"TMPDIR=/s", "HOME=/s"}},
		{"keeps HOME", []string{"HOME=/home/fn", "A=1"}, []string{"HOME=/home/fn", "A=1", "TMPDIR=/s"}},
		{"replaces TMPDIR", []string{"TMPDIR=/tmp", "B=2"}, []string{"B=2", "TMPDIR=/s", "HOME=/s"}},
		{"tmpdir in another case is another key", []string{"tmpdir=x"}, []string{"tmpdir=x", "TMPDIR=/s", "HOME=/s"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, executionEnv(tc.env, "/s")); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestInstanceAlive(t *testing.T) {
	fs, err := procfs.NewFS("/proc")
	if err != nil {
		t.Fatal(err)
	}
	self, err := processIdentityOf(fs, os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]bool{
		self + "-3":         true,  // this process
		self + "1-3":        false, // same pid, another start time
		"999999999-1-1":     false, // no such process
		"not-an-instance":   true,  // not ours
		"agent":             true,
		self:                true, // no count: not an instance name
		"12-x-3":            true,
		self + "-notnumber": true,
	} {
		if got := instanceAlive(name); got != want {
			t.Errorf("instanceAlive(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestTwoSandboxesInOneProcessDoNotInterfere(t *testing.T) {
	forEachContainment(t, func(t *testing.T, cfg Config) {
		scratch := t.TempDir()
		cfg.ScratchDir = scratch
		a := newSandbox(t, cfg)
		b, err := New(testConfig(t, cfg))
		if err != nil {
			t.Fatal(err)
		}
		out := newOutputBuffer()
		p := start(t, a, Spec{Path: writeScript(t, t.TempDir(), "echo ready; sleep 60"), Output: out})
		out.waitFor(t, "ready", 10*time.Second)
		q := start(t, b, Spec{Path: writeScript(t, t.TempDir(), "exit 0")})
		waitDone(t, q, 10*time.Second)
		if err := b.Close(); err != nil {
			t.Errorf("closing the second sandbox: %v", err)
		}
		select {
		case <-p.Done():
			t.Fatalf("closing one sandbox ended the other's execution: %+v", p.Result())
		default:
		}
		p.Cancel()
		if res := waitDone(t, p, 5*time.Second); !res.Cancelled {
			t.Errorf("result %+v", res)
		}
	})
}

// A slow Spec.Output (Redis lagging) still gets every byte: the drain after
// the end is bounded by idleness, not by a fixed deadline.
func TestSlowOutputWriterGetsEverything(t *testing.T) {
	forEachContainment(t, func(t *testing.T, cfg Config) {
		s := newSandbox(t, cfg)
		w := &slowWriter{pause: 100 * time.Millisecond}
		p := start(t, s, Spec{
			Path:   writeScript(t, t.TempDir(), `head -c 300000 /dev/zero`),
			Output: w,
		})
		res := waitDone(t, p, 60*time.Second)
		if res.OutputErr != nil || res.ExitCode != 0 || w.n != 300000 {
			t.Errorf("got %d of 300000 bytes; result %+v", w.n, res)
		}
	})
}

// slowWriter takes pause for every write; only the sandbox's copy
// goroutine writes to it.
type slowWriter struct {
	pause time.Duration
	n     int
}

func (w *slowWriter) Write(p []byte) (int, error) {
	time.Sleep(w.pause) // a slow sink, not synchronisation
	w.n += len(p)
	return len(p), nil
}

// A held process has run no instruction of the function: cancelled, it
// never runs; resumed, it runs, and its timeout counts from then.
func TestHeldProcessRunsOnlyWhenResumed(t *testing.T) {
	forEachContainment(t, func(t *testing.T, cfg Config) {
		s := newSandbox(t, cfg)
		dir := sharedDir(t)
		mark := filepath.Join(dir, "ran")
		script := writeScript(t, dir, "touch "+mark+"; echo ran")

		held, err := s.Start(context.Background(), Spec{ID: "held-cancel", Path: script, Dir: dir, Hold: true})
		if err != nil {
			t.Fatal(err)
		}
		// Long enough for a running script to have touched the mark.
		time.Sleep(200 * time.Millisecond) // not synchronisation: the absence of an event over a while
		if _, err := os.Stat(mark); err == nil {
			t.Fatal("a held process ran")
		}
		held.Cancel()
		res := waitDone(t, held, 5*time.Second)
		if !res.Cancelled || res.WallTime != 0 {
			t.Errorf("cancelled held process: %+v", res)
		}
		if _, err := os.Stat(mark); err == nil {
			t.Fatal("a held process ran after its cancel")
		}
		if err := held.Resume(); err == nil {
			t.Error("Resume after Cancel succeeded")
		}

		out := newOutputBuffer()
		p, err := s.Start(context.Background(), Spec{ID: "held-resume", Path: writeScript(t, t.TempDir(), "sleep 0.3; echo late"), Dir: dir,
			Hold: true, Output: out, Timeout: 200 * time.Millisecond, KillGrace: time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond) // held past its timeout: the clock has not started
		if err := p.Resume(); err != nil {
			t.Fatal(err)
		}
		res = waitDone(t, p, 10*time.Second)
		if !res.TimedOut || res.WallTime < 200*time.Millisecond || res.WallTime > 5*time.Second {
			t.Errorf("resumed process: %+v, want timed out 200ms after the resume", res)
		}
	})
}

// Each execution's tmp is private and empty: what one leaves is gone for
// the next execution of its slot, and bounded by tmp_size.
func TestPrivateTmpIsEmptiedAndBounded(t *testing.T) {
	requireRoot(t)
	s := newSandbox(t, Config{TmpSize: 4 << 20})
	if !s.Isolation().Namespaces {
		t.Skip("no mount namespaces")
	}
	for i := range 6 { // sequential: slots are reused
		out, res := run(t, s, `ls -A /tmp /var/tmp /dev/shm | grep -v ':$' | grep . && echo DIRTY
echo x > /tmp/left-$$; echo y > /var/tmp/left-$$; echo z > /dev/shm/left-$$
head -c 8388608 /dev/zero > $TMPDIR/big 2>/dev/null || echo "full"`, Spec{})
		if strings.Contains(out, "DIRTY") || !strings.Contains(out, "full") || res.ExitCode != 0 {
			t.Fatalf("run %d: %q %+v", i, out, res)
		}
	}
	for _, dir := range []string{"/tmp", "/var/tmp", "/dev/shm"} {
		matches, _ := filepath.Glob(filepath.Join(dir, "left-*"))
		if len(matches) > 0 {
			t.Errorf("the node's %s holds %v", dir, matches)
		}
	}
}

// A function reaches no abstract Unix socket made outside its slot (the
// node's daemons share the network namespace in filtered mode), while its
// own work.
func TestAbstractSocketsOutsideTheSlotAreRefused(t *testing.T) {
	requireRoot(t)
	s := newSandbox(t, Config{})
	if !s.Isolation().Scoped {
		t.Skip("no Landlock scopes on this kernel")
	}
	name := fmt.Sprintf("flux-test-%d", os.Getpid())
	l, err := net.Listen("unix", "@"+name)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("node daemon\n"))
			c.Close()
		}
	}()
	spec := testChild(t, "abstract", "@"+name)
	out := newOutputBuffer()
	spec.Output = out
	res := waitDone(t, start(t, s, spec), 30*time.Second)
	if got := out.String(); !strings.Contains(got, "node: refused") || !strings.Contains(got, "own: ok") || res.ExitCode != 0 {
		t.Errorf("exit %d, output:\n%s", res.ExitCode, got)
	}
}
