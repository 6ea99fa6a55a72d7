package sandbox

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/procfs"
)

// forEachContainment runs a behaviour test without cgroups (what a non-root
// agent gets) and, when this host allows it, with them.
func forEachContainment(t *testing.T, test func(t *testing.T, cfg Config)) {
	t.Run("process-group", func(t *testing.T) { test(t, Config{noCgroups: true}) })
	t.Run("cgroup", func(t *testing.T) {
		requireCgroup(t)
		test(t, Config{})
	})
}

// requiredEnv lists what a CI run insists on ("v1", "v2", "runner"):
// there, a gate that would skip fails instead, so isolation that silently
// went missing cannot pass as skipped tests.
const requiredEnv = "FLUX_SANDBOX_TEST_REQUIRE"

func required(what string) bool {
	return slices.Contains(strings.Split(os.Getenv(requiredEnv), ","), what)
}

// skip skips, or fails when the run requires what is missing.
func skip(t *testing.T, need, format string, args ...any) {
	t.Helper()
	if required(need) {
		t.Fatalf("%s=%s, but: %s", requiredEnv, os.Getenv(requiredEnv), fmt.Sprintf(format, args...))
	}
	t.Skipf(format, args...)
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		skip(t, "root", "needs root")
	}
}

// requireCgroup skips unless this host gives the sandbox a writable cgroup
// hierarchy; it returns its version.
func requireCgroup(t *testing.T) string {
	t.Helper()
	requireRoot(t)
	s, err := New(testConfig(t, Config{}))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v := s.Isolation().Cgroup
	for _, want := range []string{"v1", "v2"} {
		if required(want) && v != want {
			t.Fatalf("%s=%s, but the sandbox uses cgroup %s: %v", requiredEnv, os.Getenv(requiredEnv), v, s.Isolation().Degraded)
		}
	}
	if v == "none" {
		t.Skipf("no writable cgroup: %v", s.Isolation().Degraded)
	}
	return v
}

func requireCgroupV2(t *testing.T) {
	t.Helper()
	if v := requireCgroup(t); v != "v2" {
		skip(t, "v2", "needs cgroup v2, this host uses %s", v)
	}
}

const testRunner = "flux-runner"

// requireRunner skips unless the flux-runner user exists (created by
// sandbox/vmtest/setup-runner.sh or the .deb) and the test runs as root.
func requireRunner(t *testing.T) *user.User {
	t.Helper()
	requireRoot(t)
	u, err := user.Lookup(testRunner)
	if err != nil {
		skip(t, "runner", "user %s missing (sandbox/vmtest/setup-runner.sh creates it): %v", testRunner, err)
	}
	return u
}

// sharedDir is a temp dir the runner user can enter.
func sharedDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sandbox-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// execDir is a running execution's cgroup dir for a v1 controller or the
// v2 cgroup.
func execDir(t *testing.T, p *Process, ctrl string) string {
	t.Helper()
	switch cg := p.box.cgroup.(type) {
	case *execCgroupV1:
		return cg.cg.dirs[ctrl]
	case *execCgroupV2:
		return cg.dir
	}
	t.Fatalf("no cgroup")
	return ""
}

func TestScriptIsBornInsideItsCgroup(t *testing.T) {
	requireCgroup(t)
	s := newSandbox(t, Config{})
	for i := range 20 {
		out := newOutputBuffer()
		spec := Spec{ID: fmt.Sprintf("born-%d", i), Path: writeScript(t, t.TempDir(), `cat /proc/$$/cgroup`), Output: out}
		p := start(t, s, spec)
		want := strings.TrimPrefix(execDir(t, p, "memory"), "/sys/fs/cgroup")
		want = want[strings.Index(want, "/"+filepath.Base(filepath.Dir(want))):]
		waitDone(t, p, 10*time.Second)
		if !strings.Contains(out.String(), want) {
			t.Fatalf("run %d: the script's first line ran in\n%s\nnot in %s", i, out.String(), want)
		}
	}
}

func TestOutOfMemoryIsReportedFromTheKernelsCounter(t *testing.T) {
	requireCgroup(t)
	s := newSandbox(t, Config{})
	spec := testChild(t, "alloc", "200")
	spec.Limits.MemoryBytes = ptr(64 << 20)
	res := waitDone(t, start(t, s, spec), 30*time.Second)
	if !res.OOMKilled {
		t.Fatalf("result %+v, want OOMKilled", res)
	}
	err := res.Err()
	if !errors.Is(err, ErrOutOfMemory) || err.Error() != "out of memory: exceeded the 64 MiB limit" {
		t.Errorf("Err() = %v", err)
	}

	spec = testChild(t, "alloc", "16")
	spec.Limits.MemoryBytes = ptr(64 << 20)
	out := newOutputBuffer()
	spec.Output = out
	res = waitDone(t, start(t, s, spec), 30*time.Second)
	if res.OOMKilled || res.ExitCode != 0 || out.String() != "allocated 16\n" {
		t.Errorf("16 MiB under a 64 MiB limit: %+v, output %q", res, out.String())
	}
	if res.PeakMemoryBytes < 16<<20 || res.PeakMemoryBytes > 64<<20+1<<20 {
		t.Errorf("peak memory %d, want between 16 MiB and the limit", res.PeakMemoryBytes)
	}
}

func TestCPULimitHolds(t *testing.T) {
	requireCgroup(t)
	s := newSandbox(t, Config{})
	_, res := run(t, s, `while :; do :; done`, Spec{Limits: Limits{CPUMillicores: ptr(200)}, Timeout: time.Second})
	if !res.TimedOut {
		t.Fatalf("result %+v", res)
	}
	share := res.CPUTime.Seconds() / res.WallTime.Seconds()
	t.Logf("cpu %v over %v: %.2f of a CPU", res.CPUTime, res.WallTime, share)
	if share < 0.05 || share > 0.30 {
		t.Errorf("a busy loop under 200m got %.2f of a CPU, want about 0.2", share)
	}
}

func TestForkBombIsStoppedByThePidsLimit(t *testing.T) {
	version := requireCgroup(t)
	s := newSandbox(t, Config{PidsLimit: 64})
	// On v1 the slot's thread, which forks the function, is one task of
	// the cgroup: the function still gets its 64.
	limit := uint64(64)
	if version == "v1" {
		limit++
	}
	out := newOutputBuffer()
	p := start(t, s, Spec{Path: writeScript(t, t.TempDir(), `echo started
bomb() { bomb | bomb & }
bomb
sleep 60`), Output: out, Timeout: 30 * time.Second})
	out.waitFor(t, "started", 10*time.Second)
	dir := execDir(t, p, "pids")
	// Wait until the bomb hits the limit, while the node still forks.
	err := poll(10*time.Second, func() (bool, error) {
		if err := exec.Command("/bin/true").Run(); err != nil {
			return false, fmt.Errorf("node cannot fork during the bomb: %w", err)
		}
		cur, err := readUint(dir, "pids.current")
		if err != nil {
			return false, err
		}
		if cur > limit {
			return false, fmt.Errorf("pids.current %d above the limit %d", cur, limit)
		}
		return cur >= 60, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	p.Cancel()
	res := waitDone(t, p, 5*time.Second)
	if !res.Cancelled {
		t.Errorf("result %+v", res)
	}
}

func TestSetsidEscapeeDies(t *testing.T) {
	requireCgroup(t)
	s := newSandbox(t, Config{})
	// Two escapees leave the process group: one by setsid, one by a
	// double fork and setsid; each says its pid and touches a file once
	// it runs. The main process waits for both, then does what the case
	// says.
	const escape = `setsid sh -c 'echo "escapee $$"; touch "$TMPDIR/e1"; exec sleep 60' &
( setsid sh -c 'echo "double $$"; touch "$TMPDIR/e2"; exec sleep 60' & )
while [ ! -e "$TMPDIR/e1" ] || [ ! -e "$TMPDIR/e2" ]; do sleep 0.01; done
echo ready
`
	for _, tc := range []struct {
		name, then string
		timeout    time.Duration
		cancel     bool
	}{
		{name: "cancel", then: "sleep 60", cancel: true},
		{name: "timeout", then: "sleep 60", timeout: time.Second},
		{name: "main exits", then: "exit 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := newOutputBuffer()
			p := start(t, s, Spec{Path: writeScript(t, t.TempDir(), escape+tc.then), Output: out, Timeout: tc.timeout})
			out.waitFor(t, "ready", 10*time.Second)
			if tc.cancel {
				p.Cancel()
			}
			res := waitDone(t, p, 5*time.Second)
			if res.Cancelled != tc.cancel || res.TimedOut != (tc.timeout > 0) {
				t.Errorf("result %+v", res)
			}
			for _, prefix := range []string{"escapee ", "double "} {
				line := out.String()[strings.Index(out.String(), prefix):]
				pid, _ := strconv.Atoi(strings.Fields(strings.TrimPrefix(line, prefix))[0])
				if pid == 0 || !processGone(pid) {
					t.Errorf("%s%d survived", prefix, pid)
				}
			}
		})
	}
}

func TestNothingLeaksAfter200Executions(t *testing.T) {
	requireCgroup(t)
	s := newSandbox(t, Config{})
	script := writeScript(t, sharedDir(t), `sleep 60 & echo $!`)
	var pids []int
	for i := range 200 {
		out := newOutputBuffer()
		res := waitDone(t, start(t, s, Spec{ID: fmt.Sprintf("leak-%d", i), Path: script, Output: out}), 10*time.Second)
		if res.ExitCode != 0 {
			t.Fatalf("run %d: %+v", i, res)
		}
		pid, _ := strconv.Atoi(strings.TrimSpace(out.String()))
		pids = append(pids, pid)
	}
	for _, pid := range pids {
		if !processGone(pid) {
			t.Errorf("process %d left alive", pid)
		}
	}
	// What is left are the slots' own cgroups (v1) or the empty ones made
	// ahead (v2): no more than the pool holds.
	// The last slot comes back just after its execution is Done.
	var live, inUse int
	if err := poll(5*time.Second, func() (bool, error) {
		live, _, inUse = s.host.pool.stats()
		return inUse == 0, nil
	}); err != nil {
		t.Errorf("%d slots still in use: %v", inUse, err)
	}
	for ctrl, dir := range instanceDirs(t, s) {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		if n := countDirs(entries); n > max(live, v2ReadyCgroups) {
			t.Errorf("%s: %d cgroups left in %s for %d slots", ctrl, n, dir, live)
		}
	}
}

func countDirs(entries []os.DirEntry) int {
	n := 0
	for _, e := range entries {
		if e.IsDir() {
			n++
		}
	}
	return n
}

// instanceDirs are the sandbox's own cgroup dirs, by controller.
func instanceDirs(t *testing.T, s *Sandbox) map[string]string {
	t.Helper()
	switch d := s.host.cgroups.(type) {
	case *cgroupV1:
		return d.instance
	case *cgroupV2:
		return map[string]string{"unified": d.instance}
	}
	t.Fatal("no cgroups")
	return nil
}

func TestCrashedAgentsCgroupsAreRemoved(t *testing.T) {
	requireCgroup(t)
	s := newSandbox(t, Config{})
	// A dead agent's instance, with a live process inside.
	const stale = "999999999-1-1"
	sleeper := exec.Command("/bin/sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan struct{})
	go func() { _ = sleeper.Wait(); close(waited) }()
	defer func() { _ = sleeper.Process.Kill(); <-waited }()
	var staleDirs []string
	for _, dir := range instanceDirs(t, s) {
		d := filepath.Join(filepath.Dir(dir), stale, "x1-old")
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		staleDirs = append(staleDirs, filepath.Dir(d))
		if err := writeCgroupFile(d, "cgroup.procs", strconv.Itoa(sleeper.Process.Pid)); err != nil {
			t.Fatal(err)
		}
	}
	newSandbox(t, Config{})
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Error("the stale cgroup's process survived")
	}
	for _, d := range staleDirs {
		if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("stale cgroup %s kept: %v", d, err)
		}
	}
}

func TestRunnerUserIsolation(t *testing.T) {
	u := requireRunner(t)
	shared := sharedDir(t)
	secret := filepath.Join(shared, "secret")
	if err := os.WriteFile(secret, []byte("root only"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := newSandbox(t, Config{User: testRunner, ScratchDir: shared})
	iso := s.Isolation()
	if iso.User != testRunner || strconv.Itoa(iso.UID) != u.Uid {
		t.Errorf("isolation %+v", iso)
	}
	appDir := filepath.Join(shared, "app")
	if err := os.Mkdir(appDir, 0o755); err != nil {
		t.Fatal(err)
	}
	out := newOutputBuffer()
	p := start(t, s, Spec{Path: writeScript(t, appDir, `echo "uid $(id -u)"
echo "groups $(id -G)"
grep NoNewPrivs /proc/self/status
cat /proc/`+strconv.Itoa(os.Getpid())+`/environ >/dev/null 2>&1 && echo "agent env readable" || echo "agent env refused"
cat `+secret+` 2>/dev/null && echo "secret readable" || echo "secret refused"
echo hi > "$TMPDIR/f" && echo "tmp file of $(stat -c %u "$TMPDIR/f")"`), Env: []string{"PATH=/usr/bin:/bin"}, Output: out})
	res := waitDone(t, p, 10*time.Second)
	var uid string
	fmt.Sscanf(out.String(), "uid %s", &uid)
	if n, err := strconv.ParseUint(uid, 10, 32); err != nil || !iso.UIDRange.Contains(uint32(n)) {
		t.Errorf("uid %q is not one of the range %s", uid, iso.UIDRange)
	}
	want := fmt.Sprintf("uid %s\ngroups %s\nNoNewPrivs:\t1\nagent env refused\nsecret refused\ntmp file of %s\n", uid, u.Gid, uid)
	if diff := cmp.Diff(want, out.String()); diff != "" || res.ExitCode != 0 {
		t.Errorf("exit %d, output (-want +got):\n%s", res.ExitCode, diff)
	}
}

func TestMissingRunnerDegrades(t *testing.T) {
	requireRoot(t)
	s := newSandbox(t, Config{User: "flux-no-such-user"})
	iso := s.Isolation()
	if iso.UID != 0 || len(iso.Degraded) == 0 || !strings.Contains(strings.Join(iso.Degraded, ";"), "flux-no-such-user") {
		t.Errorf("isolation %+v", iso)
	}
	out, res := run(t, s, `id -u`, Spec{})
	if out != "0\n" || res.ExitCode != 0 {
		t.Errorf("functions do not run as the agent: %q %+v", out, res)
	}
}

func TestDetectLayout(t *testing.T) {
	for _, tc := range []struct {
		fixture string
		mode    string
		want    cgroupLayout
	}{
		{"hybrid", "v1", cgroupLayout{
			v1:      map[string]string{"cpu": "/sys/fs/cgroup/cpu", "cpuacct": "/sys/fs/cgroup/cpuacct", "memory": "/sys/fs/cgroup/memory", "pids": "/sys/fs/cgroup/pids", "freezer": "/sys/fs/cgroup/freezer"},
			v2Mount: "/sys/fs/cgroup/unified", v2Own: "/",
		}},
		{"v1-comounted", "v1", cgroupLayout{
			v1:      map[string]string{"cpu": "/sys/fs/cgroup/cpu,cpuacct", "cpuacct": "/sys/fs/cgroup/cpu,cpuacct", "memory": "/sys/fs/cgroup/memory", "pids": "/sys/fs/cgroup/pids", "freezer": "/sys/fs/cgroup/freezer"},
			v2Mount: "/sys/fs/cgroup/unified", v2Own: "/system.slice/flux-agent.service",
		}},
		{"v2-systemd", "v2", cgroupLayout{
			v1:      map[string]string{},
			v2Mount: "/sys/fs/cgroup", v2Own: "/system.slice/flux-agent.service",
		}},
		{"v2-favordynmods", "v2", cgroupLayout{
			v1:      map[string]string{},
			v2Mount: "/sys/fs/cgroup", v2Own: "/system.slice/flux-agent.service", favorDynMods: true,
		}},
		{"v2-namespaced", "v2", cgroupLayout{
			v1:      map[string]string{},
			v2Mount: "/sys/fs/cgroup", v2Own: "/",
		}},
		{"none", "none", cgroupLayout{v1: map[string]string{}}},
	} {
		t.Run(tc.fixture, func(t *testing.T) {
			fs, err := procfs.NewFS(filepath.Join("testdata", "layout", tc.fixture))
			if err != nil {
				t.Fatal(err)
			}
			mounts, err := fs.GetProcMounts(1)
			if err != nil {
				t.Fatal(err)
			}
			p, err := fs.Proc(1)
			if err != nil {
				t.Fatal(err)
			}
			own, err := p.Cgroups()
			if err != nil {
				t.Fatal(err)
			}
			got := detectLayout(mounts, own)
			if diff := cmp.Diff(tc.want, got, cmp.AllowUnexported(cgroupLayout{})); diff != "" {
				t.Errorf("layout (-want +got):\n%s", diff)
			}
			if got.mode() != tc.mode {
				t.Errorf("mode %s, want %s", got.mode(), tc.mode)
			}
		})
	}
}

func TestParseCgroupFiles(t *testing.T) {
	for _, tc := range []struct {
		file string
		want map[string]uint64
	}{
		{"memory.events", map[string]uint64{"low": 0, "high": 0, "max": 31, "oom": 1, "oom_kill": 1, "oom_group_kill": 1}},
		{"memory.oom_control", map[string]uint64{"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 1}},
		{"cpu.stat", map[string]uint64{"usage_usec": 1002345, "user_usec": 998000, "system_usec": 4345, "nr_periods": 10, "nr_throttled": 8, "throttled_usec": 3201456, "nr_bursts": 0, "burst_usec": 0}},
		{"cgroup.events", map[string]uint64{"populated": 0, "frozen": 0}},
	} {
		t.Run(tc.file, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("testdata", "cgroupfs", tc.file))
			if err != nil {
				t.Fatal(err)
			}
			got, err := parseFlatKeyed(bytes.NewReader(b))
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
	for _, bad := range []string{"oom_kill", "oom_kill x", "a 1 2"} {
		if _, err := parseFlatKeyed(strings.NewReader(bad)); err == nil {
			t.Errorf("parseFlatKeyed(%q) accepted it", bad)
		}
	}
	procs, err := parseProcs(strings.NewReader("12\n345\n\n"))
	if diff := cmp.Diff([]int{12, 345}, procs); diff != "" || err != nil {
		t.Errorf("parseProcs: %v (-want +got):\n%s", err, diff)
	}
	if _, err := parseProcs(strings.NewReader("12\nx\n")); err == nil {
		t.Error("parseProcs accepted a bad line")
	}
	if v, err := parseUint(strings.NewReader("67108864\n")); v != 64<<20 || err != nil {
		t.Errorf("parseUint = %d, %v", v, err)
	}
	if _, err := parseUint(strings.NewReader("max\n")); err == nil {
		t.Error("parseUint accepted max")
	}
}

func TestIsolationSaysWhatIsMissing(t *testing.T) {
	s := newSandbox(t, Config{noCgroups: true})
	iso := s.Isolation()
	if iso.Cgroup != "none" || len(iso.Degraded) == 0 {
		t.Errorf("isolation %+v", iso)
	}
	_ = context.Background
}

func TestLimitsAreWrittenBeforeTheStart(t *testing.T) {
	version := requireCgroup(t)
	s := newSandbox(t, Config{PidsLimit: 77})
	out := newOutputBuffer()
	p := start(t, s, Spec{
		Path:   writeScript(t, t.TempDir(), "echo ready; sleep 60"),
		Output: out,
		Limits: Limits{MemoryBytes: ptr(48 << 20), CPUMillicores: ptr(250)},
	})
	defer func() { p.Cancel(); <-p.Done() }()
	out.waitFor(t, "ready", 10*time.Second)
	type file struct{ ctrl, name, value string }
	want := map[string][]file{
		"v1": {
			{"memory", "memory.limit_in_bytes", "50331648"},
			{"cpu", "cpu.cfs_quota_us", "25000"},
			{"cpu", "cpu.cfs_period_us", "100000"},
			// 77 for the function, one for the slot's thread that forked it.
			{"pids", "pids.max", "78"},
		},
		"v2": {
			{"memory", "memory.max", "50331648"},
			{"memory", "memory.swap.max", "0"},
			{"memory", "memory.oom.group", "1"},
			{"cpu", "cpu.max", "25000 100000"},
			{"pids", "pids.max", "77"},
		},
	}[version]
	var got []file
	for _, f := range want {
		b, err := os.ReadFile(filepath.Join(execDir(t, p, f.ctrl), f.name))
		if errors.Is(err, os.ErrNotExist) && f.name == "memory.swap.max" {
			got = append(got, f) // no swap accounting on this kernel
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, file{f.ctrl, f.name, strings.TrimSpace(string(b))})
	}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(file{})); diff != "" {
		t.Errorf("limits (-want +got):\n%s", diff)
	}
}

func TestUnwritableLimitIsAnError(t *testing.T) {
	requireCgroup(t)
	s := newSandbox(t, Config{})
	// A CPU quota above what CFS takes (2^44 µs per period).
	_, err := s.Start(context.Background(), Spec{ID: "huge", Path: "/bin/true", Dir: "/", Limits: Limits{CPUMillicores: ptr(1e12)}})
	if err == nil {
		t.Fatal("a limit the kernel refuses did not fail the start")
	}
	t.Logf("refused: %v", err)
	if _, _, inUse := s.host.pool.stats(); inUse != 0 {
		t.Errorf("a refused start kept its slot")
	}
	// The slot is fit for the next execution.
	if out, res := run(t, s, "echo ok", Spec{}); out != "ok\n" || res.ExitCode != 0 {
		t.Errorf("after a refused start: %q %+v", out, res)
	}
}

func TestV2AgentMovesIntoALeafOfItsCgroup(t *testing.T) {
	requireCgroupV2(t)
	s := newSandbox(t, Config{})
	own, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	inst := instanceDirs(t, s)["unified"]
	parent := filepath.Dir(inst)
	if parent == "/sys/fs/cgroup" {
		t.Skip("the test runs in the root cgroup, which may hold processes")
	}
	if got, want := strings.TrimSpace(string(own)), "0::"+strings.TrimPrefix(parent, "/sys/fs/cgroup")+"/"+agentLeaf; got != want {
		t.Errorf("agent in %q, want %q", got, want)
	}
	ctl, err := readCgroupFile(parent, "cgroup.subtree_control")
	if err != nil || !strings.Contains(string(ctl), "memory") || !strings.Contains(string(ctl), "pids") {
		t.Errorf("subtree_control of %s: %q %v", parent, ctl, err)
	}
}

func TestNoPidsLimit(t *testing.T) {
	requireCgroup(t)
	s := newSandbox(t, Config{PidsLimit: NoPidsLimit})
	out := newOutputBuffer()
	p := start(t, s, Spec{Path: writeScript(t, t.TempDir(), "echo ready; sleep 60"), Output: out})
	defer func() { p.Cancel(); <-p.Done() }()
	out.waitFor(t, "ready", 10*time.Second)
	b, err := os.ReadFile(filepath.Join(execDir(t, p, "pids"), "pids.max"))
	if err != nil || strings.TrimSpace(string(b)) != "max" {
		t.Errorf("pids.max %q %v, want max", b, err)
	}
}

func TestV2PeakIsSampledWithoutMemoryPeak(t *testing.T) {
	requireCgroupV2(t)
	s := newSandbox(t, Config{})
	s.host.cgroups.(*cgroupV2).samplePeak = true // as on kernels before 5.19
	spec := testChild(t, "alloc-hold", "32")
	out := newOutputBuffer()
	spec.Output = out
	p := start(t, s, spec)
	out.waitFor(t, "allocated 32", 30*time.Second)
	// On the test VM memory.current of a child holding 32 MiB was seen
	// anywhere from 9 to 30 MB (not yet understood), so this proves only
	// that the sampler runs and its figure reaches the result: without it
	// the peak is 0.
	sampler := p.box.cgroup.(*execCgroupV2).sampler
	if err := poll(10*time.Second, func() (bool, error) { return sampler.peak.Load() > 1<<20, nil }); err != nil {
		t.Fatalf("sampled peak %d: %v", sampler.peak.Load(), err)
	}
	p.Cancel()
	if res := waitDone(t, p, 5*time.Second); res.PeakMemoryBytes < sampler.peak.Load() {
		t.Errorf("result peak %d, below the sampled %d", res.PeakMemoryBytes, sampler.peak.Load())
	}
}

func TestV2FreezeKillWithoutCgroupKill(t *testing.T) {
	requireCgroupV2(t)
	s := newSandbox(t, Config{})
	out := newOutputBuffer()
	p := start(t, s, Spec{Path: writeScript(t, t.TempDir(), `setsid sh -c 'echo "escapee $$"; while :; do sleep 1 & wait; done' &
echo ready
while :; do sleep 1 & wait; done`), Output: out})
	out.waitFor(t, "ready", 10*time.Second)
	out.waitFor(t, "escapee", 10*time.Second)
	dir := execDir(t, p, "")
	if err := freezeKillThaw(v2Freezer(dir), func() []string { return cgroupTree(dir) }, 0); err != nil {
		entries, lerr := os.ReadDir(dir)
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		res := waitDone(t, p, 5*time.Second)
		t.Fatalf("%v (dir holds %v %v; output %q; result %+v)", err, names, lerr, out.String(), res)
	}
	res := waitDone(t, p, 5*time.Second)
	if res.ExitCode != 137 {
		t.Errorf("result %+v, want killed", res)
	}
	line := out.String()[strings.Index(out.String(), "escapee "):]
	pid, _ := strconv.Atoi(strings.Fields(strings.TrimPrefix(line, "escapee "))[0])
	if pid == 0 || !processGone(pid) {
		t.Errorf("escapee %d survived the freeze-kill", pid)
	}
}

// With a uid range, concurrent executions run as different uids: one
// cannot read another's environment or signal it, and the uids come back
// when the executions end.
func TestPerExecutionUIDs(t *testing.T) {
	u := requireRunner(t)
	shared := sharedDir(t)
	s := newSandbox(t, Config{User: testRunner, ScratchDir: shared, UIDs: UIDRange{First: 2_900_000, Count: 2}})
	if s.Isolation().Cgroup == "none" {
		skip(t, "v1", "no writable cgroup: per-execution uids are off without one")
	}
	if got := s.Isolation().UIDRange; got.Count != 2 {
		t.Fatalf("isolation %+v", s.Isolation())
	}
	appDir := filepath.Join(shared, "app")
	if err := os.Mkdir(appDir, 0o755); err != nil {
		t.Fatal(err)
	}
	victimOut := newOutputBuffer()
	victim := start(t, s, Spec{Path: writeScript(t, appDir, `echo "up $(id -u) $(id -g)"; exec sleep 60`),
		Env: []string{"PATH=/usr/bin:/bin", "API_KEY=victim-secret"}, Output: victimOut})
	victimOut.waitFor(t, "up", 10*time.Second)
	runIn := func(body string) (string, Result) {
		out := newOutputBuffer()
		p := start(t, s, Spec{Path: writeScript(t, appDir, body), Env: []string{"PATH=/usr/bin:/bin"}, Output: out})
		res := waitDone(t, p, 10*time.Second)
		return out.String(), res
	}
	out, res := runIn(fmt.Sprintf(`echo "me $(id -u)"
cat /proc/%d/environ 2>/dev/null | tr '\0' '\n' | grep API_KEY || echo "environ refused"
kill -9 %d 2>/dev/null && echo "killed it" || echo "kill refused"`, victim.Pid(), victim.Pid()))
	if !strings.Contains(out, "environ refused") || !strings.Contains(out, "kill refused") || res.ExitCode != 0 {
		t.Errorf("one execution reached another:\n%s", out)
	}
	var victimUID, otherUID, victimGID string
	fmt.Sscanf(victimOut.String(), "up %s %s", &victimUID, &victimGID)
	fmt.Sscanf(out, "me %s", &otherUID)
	if victimGID != u.Gid || !strings.HasPrefix(victimUID, "290000") || !strings.HasPrefix(otherUID, "290000") || victimUID == otherUID {
		t.Errorf("victim ran as %q, the other as %q: want two uids of the range, group %s", victimOut.String(), out, u.Gid)
	}
	victim.Cancel()
	waitDone(t, victim, 10*time.Second)
	// Both uids are free again: two more executions start.
	for range 2 {
		if out, _ := runIn(`id -u`); !strings.HasPrefix(out, "29000") {
			t.Errorf("after the first two ended: %q", out)
		}
	}
}

// The boot parameter counts whatever the mounts say; a false or malformed
// value does not.
func TestFavorDynModsBooted(t *testing.T) {
	for cmdline, want := range map[string]bool{
		"BOOT_IMAGE=/vmlinuz root=/dev/vda1 cgroup_favordynmods=true quiet": true,
		"cgroup_favordynmods=1":     true,
		"cgroup_favordynmods=false": false,
		"cgroup_favordynmods=maybe": false,
		"root=/dev/vda1 quiet":      false,
	} {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "cmdline"), []byte(cmdline+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		fs, err := procfs.NewFS(dir)
		if err != nil {
			t.Fatal(err)
		}
		if got := favorDynModsBooted(fs); got != want {
			t.Errorf("%q: %v, want %v", cmdline, got, want)
		}
	}
}
