package sandbox

import (
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// waitUsage reads p's usage until ok accepts it, and fails after timeout.
func waitUsage(t *testing.T, p *Process, timeout time.Duration, ok func(Usage) bool) Usage {
	t.Helper()
	var u Usage
	err := poll(timeout, func() (bool, error) {
		var err error
		u, err = p.Usage()
		return err == nil && ok(u), err
	})
	if err != nil {
		t.Fatalf("usage %+v: %v", u, err)
	}
	return u
}

func TestUsageOfARunningExecution(t *testing.T) {
	forEachContainment(t, testUsageOfARunningExecution)
	t.Run("runner", func(t *testing.T) {
		requireRunner(t)
		requireCgroup(t)
		testUsageOfARunningExecution(t, Config{User: testRunner})
	})
}

// testUsageOfARunningExecution runs a function that holds 32 MiB and
// burns CPU: its usage shows both, and its uid, while it runs, and
// nothing once it is over.
func testUsageOfARunningExecution(t *testing.T, cfg Config) {
	s := newSandbox(t, cfg)
	spec := testChild(t, "alloc-spin", "32")
	out := newOutputBuffer()
	spec.Output = out
	p := start(t, s, spec)
	t.Cleanup(p.Cancel)
	out.waitFor(t, "allocated 32 uid ", 30*time.Second)
	var uid int
	if _, err := fmt.Sscanf(out.String(), "allocated 32 uid %d", &uid); err != nil {
		t.Fatalf("output %q: %v", out.String(), err)
	}
	u := waitUsage(t, p, 20*time.Second, func(u Usage) bool {
		return u.MemoryBytes >= 32<<20 && u.CPUTime >= 200*time.Millisecond
	})
	t.Logf("while running: %+v", u)
	if u.UID != uid {
		t.Errorf("usage says uid %d, the function runs as %d", u.UID, uid)
	}
	if r := s.Isolation().UIDRange; r.Count > 0 && !r.Contains(uint32(u.UID)) {
		t.Errorf("uid %d is not from the range %s", u.UID, r)
	}
	p.Cancel()
	res := waitDone(t, p, 10*time.Second)
	if res.CPUTime < u.CPUTime {
		t.Errorf("final CPU time %v is below the %v read while it ran", res.CPUTime, u.CPUTime)
	}
	if got, err := p.Usage(); !errors.Is(err, ErrExecutionOver) {
		t.Errorf("after Done: %+v, %v; want ErrExecutionOver", got, err)
	}
}

func TestUsageIsTheExecutionsOnlyInAReusedSlot(t *testing.T) {
	forEachContainment(t, testUsageIsTheExecutionsOnlyInAReusedSlot)
}

// testUsageIsTheExecutionsOnlyInAReusedSlot runs a function that burns
// CPU, then another in the same slot (on cgroup v1 the same cgroups, whose
// counters span both): the second's usage starts near zero, and the
// first's reads nothing of the second's.
func testUsageIsTheExecutionsOnlyInAReusedSlot(t *testing.T, cfg Config) {
	const burn = 500 * time.Millisecond
	s := newSandbox(t, cfg)
	spec := testChild(t, "alloc-spin", "1")
	spec.ID = "usage-first"
	first := start(t, s, spec)
	t.Cleanup(first.Cancel)
	waitUsage(t, first, 30*time.Second, func(u Usage) bool { return u.CPUTime >= burn })
	first.Cancel()
	res := waitDone(t, first, 10*time.Second)
	if res.CPUTime < burn {
		t.Fatalf("the first burnt %v, want at least %v", res.CPUTime, burn)
	}
	// The first's slot is back and next in line.
	firstCgroup, v1 := first.box.cgroup.(*execCgroupV1)
	if err := poll(5*time.Second, func() (bool, error) {
		p := s.host.pool
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.inUse == 0 && (!v1 || len(p.free) > 0 && p.free[len(p.free)-1].v1 == firstCgroup.cg), nil
	}); err != nil {
		t.Fatalf("the first's slot is not back: %v", err)
	}

	spec = testChild(t, "alloc-hold", "1")
	spec.ID = "usage-second"
	out := newOutputBuffer()
	spec.Output = out
	second := start(t, s, spec)
	t.Cleanup(second.Cancel)
	if v1 && second.box.cgroup.(*execCgroupV1).cg != firstCgroup.cg {
		t.Fatal("the second execution is not in the first's slot")
	}
	out.waitFor(t, "allocated 1", 30*time.Second)
	u, err := second.Usage()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("first: %v; second once started: %+v", res.CPUTime, u)
	if u.CPUTime > res.CPUTime/2 {
		t.Errorf("the second's CPU time %v once started, after the first's %v: want its own, near 0", u.CPUTime, res.CPUTime)
	}
	if got, err := first.Usage(); !errors.Is(err, ErrExecutionOver) {
		t.Errorf("the first's usage while the second runs in its slot: %+v, %v; want ErrExecutionOver", got, err)
	}
	second.Cancel()
	if res2 := waitDone(t, second, 10*time.Second); res2.CPUTime > res.CPUTime/2 {
		t.Errorf("the second's final CPU time %v counts the first's %v", res2.CPUTime, res.CPUTime)
	}
}

func TestCgroupUsageFromFiles(t *testing.T) {
	dir := filepath.Join("testdata", "cgroupfs")
	dirs := map[string]string{"memory": dir, "cpuacct": dir}
	for _, tc := range []struct {
		name string
		cg   execCgroup
		want Usage
	}{
		{"v2", &execCgroupV2{dir: dir}, Usage{MemoryBytes: 42 << 20, CPUTime: 1002345 * time.Microsecond}},
		{"v1", &execCgroupV1{cg: &slotCgroupV1{dirs: dirs}, cpuBase: 2_000_000_000}, Usage{MemoryBytes: 34 << 20, CPUTime: 500 * time.Millisecond}},
		{"v1 counter below the base", &execCgroupV1{cg: &slotCgroupV1{dirs: dirs}, cpuBase: 3_000_000_000}, Usage{MemoryBytes: 34 << 20}},
		{"v1 without cpuacct", &execCgroupV1{cg: &slotCgroupV1{dirs: map[string]string{"memory": dir}}}, Usage{MemoryBytes: 34 << 20}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if v1, ok := tc.cg.(*execCgroupV1); ok {
				t.Cleanup(v1.cg.files.close)
			}
			got, err := tc.cg.usage()
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
	if _, err := (&execCgroupV2{dir: t.TempDir()}).usage(); err == nil {
		t.Error("v2 usage of a dir without cgroup files: no error")
	}
}
