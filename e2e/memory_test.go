package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// Memory is measured on the agent as shipped (the race detector's shadow
// memory would dwarf the figures), read from /proc/<pid>/status: VmHWM is
// the peak RSS since the last reset (writing 5 to /proc/<pid>/clear_refs).
//
// FLUX_E2E_RELEASE_BINARY names another build to measure instead (an older
// agent, for a before/after in one run).
const releaseBinaryEnv = "FLUX_E2E_RELEASE_BINARY"

// The release build, made once per run.
var (
	releaseBinaryOnce sync.Once
	releaseBinary     string
	releaseBinaryErr  error
)

// releaseAgent starts the agent built without the race detector.
func releaseAgent(t testing.TB, rs *redisServer, opts agentOptions) *agent {
	t.Helper()
	binary := os.Getenv(releaseBinaryEnv)
	if binary == "" {
		releaseBinaryOnce.Do(func() {
			releaseBinary = filepath.Join(filepath.Dir(agentBinary), "flux-agent-release")
			out, err := exec.Command("go", "build", "-o", releaseBinary, "..").CombinedOutput()
			if err != nil {
				releaseBinaryErr = fmt.Errorf("%v: %s", err, out)
			}
		})
		if releaseBinaryErr != nil {
			t.Fatal(releaseBinaryErr)
		}
		binary = releaseBinary
	}
	saved := agentBinary
	agentBinary = binary
	defer func() { agentBinary = saved }()
	opts.YAML += "log:\n  level: info\n"
	if v := os.Getenv("FLUX_E2E_GOMEMLIMIT"); v != "" { // to measure the knob
		opts.Env = append(opts.Env, "GOMEMLIMIT="+v)
	}
	return startAgent(t, rs, opts)
}

// procStatus reads the kB figures of /proc/<pid>/status (VmRSS, VmHWM…)
// in bytes.
func procStatus(t testing.TB, pid int) map[string]int64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	figures := map[string]int64{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		key, value, ok := strings.Cut(sc.Text(), ":")
		if !ok || !strings.HasSuffix(value, " kB") {
			continue
		}
		if kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(value, " kB")), 10, 64); err == nil {
			figures[key] = kb << 10
		}
	}
	return figures
}

// resetPeak starts a new VmHWM measurement.
func resetPeak(t testing.TB, pid int) {
	t.Helper()
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
		t.Skipf("cannot reset the peak RSS (clear_refs): %v", err)
	}
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// An agent at rest holds little: what it allocates (anonymous memory:
// heap, stacks) stays small. The rest of its RSS is its own executable's
// code and read-only data paged in (RssFile, some 21 MiB), shared and
// reclaimable, which this test logs but cannot bound.
func TestMemoryIdle(t *testing.T) {
	rs := startRedis(t)
	a := releaseAgent(t, rs, agentOptions{})
	c := a.client(t)
	install(t, c, fn{Name: "noop", Script: "exit 0\n"})
	for range 20 {
		execSync(t, c, "noop")
	}
	st := procStatus(t, a.cmd.Process.Pid)
	t.Logf("idle: VmRSS %s (anon %s, file %s), VmHWM %s", mib(st["VmRSS"]), mib(st["RssAnon"]), mib(st["RssFile"]), mib(st["VmHWM"]))
	if st["RssAnon"] > 20<<20 {
		t.Errorf("idle anonymous RSS %s, want at most 20 MiB", mib(st["RssAnon"]))
	}
}

// A 20 MiB async output flows through the agent in bounded buffers: the
// peak stays small, and the memory goes back once the execution is over.
func TestMemoryAsyncOutput(t *testing.T) {
	rs := startRedis(t)
	a := releaseAgent(t, rs, agentOptions{AgentID: "mem-agent", YAML: "output_limit: 32MiB\n"})
	c := a.client(t)
	const size = 20 << 20
	install(t, c, fn{Name: "chatty", Script: fmt.Sprintf(
		"yes 0123456789012345678901234567890123456789012345678901234567890 | head -c %d\n", size)})
	pid := a.cmd.Process.Pid
	before := procStatus(t, pid)
	resetPeak(t, pid)
	id := execAsync(t, c, "chatty")
	waitUntil(60*time.Second, func() bool {
		rec, err := rs.Client.Get(context.Background(), "flux:agent:mem-agent:exec:{"+id+"}").Result()
		return err == nil && !strings.Contains(rec, `"status":"running"`)
	})
	end := time.Now()
	peak := procStatus(t, pid)["VmHWM"]
	n, err := rs.Client.StrLen(context.Background(), "flux:agent:mem-agent:exec:{"+id+"}:output").Result()
	if err != nil || n != size {
		t.Fatalf("output in Redis: %d bytes, %v", n, err)
	}
	var after map[string]int64
	back := waitUntil(10*time.Second, func() bool {
		after = procStatus(t, pid)
		return after["VmRSS"] <= 40<<20
	})
	t.Logf("20 MiB async output: RSS before %s, peak %s, %s after the end %s", mib(before["VmRSS"]), mib(peak),
		time.Since(end).Round(100*time.Millisecond), mib(after["VmRSS"]))
	if peak > 64<<20 {
		t.Errorf("peak RSS %s, want at most 64 MiB", mib(peak))
	}
	if !back {
		t.Errorf("RSS %s 10s after the end, want at most 40 MiB", mib(after["VmRSS"]))
	}
}

// Callers polling a record whose output JSON inflates sixfold (16 MB of
// control bytes) wait for the agent's reply budget instead of each
// building copies of it: the agent's peak stays bounded.
func TestMemoryParallelGetExecution(t *testing.T) {
	rs := startRedis(t)
	a := releaseAgent(t, rs, agentOptions{})
	c := a.client(t)
	install(t, c, fn{Name: "ctl", Script: "head -c 16000000 /dev/zero | tr '\\0' '\\1'\n"})
	resp, id := execSync(t, c, "ctl")
	if resp.GetError() != "" {
		t.Fatalf("execution: %q", resp.GetError())
	}
	pid := a.cmd.Process.Pid
	before := procStatus(t, pid)["VmRSS"]
	resetPeak(t, pid)

	const callers = 24
	var wg sync.WaitGroup
	var mu sync.Mutex
	codesSeen := map[codes.Code]int{}
	start := time.Now()
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second) // Flux's deadline
			defer cancel()
			r, err := c.GetExecution(ctx, &fluxpb.GetExecutionRequest{ExecutionId: id})
			code := status.Code(err)
			if err == nil && (len(r.GetData()) > 48<<20 || !bytes.Contains(r.GetData(), []byte("output cut to fit the reply"))) {
				t.Errorf("reply of %d bytes without the cut marker", len(r.GetData()))
			}
			mu.Lock()
			codesSeen[code]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	peak := procStatus(t, pid)["VmHWM"]
	t.Logf("%d parallel GetExecution of a 16 MB control-byte record: RSS before %s, peak %s; %s; answers %v",
		callers, mib(before), mib(peak), time.Since(start).Round(time.Millisecond), codesSeen)
	if peak > 256<<20 {
		t.Errorf("peak RSS %s, want at most 256 MiB", mib(peak))
	}
	if codesSeen[codes.OK] == 0 {
		t.Errorf("no caller got the record")
	}
	for code := range codesSeen {
		if code != codes.OK && code != codes.DeadlineExceeded {
			t.Errorf("answer %s: only OK or a deadline that passed while waiting", code)
		}
	}
}
