package sandbox

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// defaultCgroupV1Root is the parent of the agents' cgroups in each v1
// hierarchy.
const defaultCgroupV1Root = "/flux-agent"

// v1Controllers are the v1 hierarchies the sandbox needs; cpuacct is
// optional (CPU time then comes from rusage).
var v1Controllers = []string{"memory", "cpu", "pids", "freezer"}

// forceEmptyAbove is the page cache (files the function read) a slot's
// cgroup may still be charged with after an execution before it is
// reclaimed: the next function's limit and peak must not count the last
// one's cache. Kernel memory left charged (a few hundred KiB of slab) is
// not reclaimable and never counts: reclaiming it in vain costs retries.
const forceEmptyAbove = 8 << 20

// cgroupV1 keeps a set of cgroups per slot, one in each of the memory, cpu,
// (cpuacct,) pids and freezer hierarchies, with the slot's thread inside
// so that functions are born in them; they are reset and reused from one
// execution to the next.
type cgroupV1 struct {
	// self is the agent's pid: v1's cgroup.procs lists it beside the
	// functions, because the slot's thread sits there.
	self int
	// instance maps a controller to this agent's dir in its hierarchy.
	instance map[string]string
}

func openCgroupV1(layout cgroupLayout, root, instance string, self int, log *slog.Logger) (*cgroupV1, error) {
	if root == "" {
		root = defaultCgroupV1Root
	}
	c := &cgroupV1{self: self, instance: map[string]string{}}
	for _, ctrl := range append([]string{"cpuacct"}, v1Controllers...) {
		mount, ok := layout.v1[ctrl]
		if !ok {
			if ctrl == "cpuacct" {
				continue
			}
			return nil, fmt.Errorf("no v1 hierarchy has the %s controller", ctrl)
		}
		parent, err := joinCgroupPath(mount, root)
		if err != nil {
			return nil, err
		}
		c.instance[ctrl] = filepath.Join(parent, instance)
	}
	for _, dir := range distinctDirs(c.instance) {
		removeStaleInstances(filepath.Dir(dir), c.killStale, log)
	}
	var made []string
	for _, dir := range distinctDirs(c.instance) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, errors.Join(err, removeDirs(made))
		}
		made = append(made, dir)
	}
	return c, nil
}

func (c *cgroupV1) version() string { return "v1" }

// distinctDirs lists the distinct dirs of a controller map: co-mounted
// controllers (cpu,cpuacct) share one.
func distinctDirs(dirs map[string]string) []string {
	var out []string
	seen := map[string]bool{}
	for _, ctrl := range append([]string{"cpuacct"}, v1Controllers...) {
		if d, ok := dirs[ctrl]; ok && !seen[d] {
			seen[d] = true
			out = append(out, d)
		}
	}
	return out
}

func removeDirs(dirs []string) error {
	var errs []error
	for _, d := range dirs {
		errs = append(errs, rmdirCgroup(d, emptyTimeout))
	}
	return errors.Join(errs...)
}

// killStale kills everything in a dead agent's instance (found through its
// freezer dir), frozen first so a fork bomb cannot outrun it.
func (c *cgroupV1) killStale(dir string) error {
	freezerDir := filepath.Join(filepath.Dir(c.instance["freezer"]), filepath.Base(dir))
	return freezeKillThaw(v1Freezer(freezerDir), func() []string { return cgroupTree(freezerDir) }, 0)
}

func (c *cgroupV1) close() error { return removeDirs(distinctDirs(c.instance)) }

// slotCgroupV1 is one slot's cgroups.
type slotCgroupV1 struct {
	dirs     map[string]string // controller → the slot's dir
	distinct []string
	files    cgroupFiles
	// held is what the limit files hold now.
	held v1Values
	// oomBase is the OOM kill counter at the start of the current
	// execution.
	oomBase uint64
}

// attach makes each slot's cgroups, then moves the slots' threads in, one
// right after the other.
func (c *cgroupV1) attach(slots []*slot) error {
	var errs []error
	for _, s := range slots {
		cg := &slotCgroupV1{dirs: map[string]string{}, held: unlimitedV1}
		for ctrl, d := range c.instance {
			cg.dirs[ctrl] = filepath.Join(d, "s"+strconv.Itoa(s.id))
		}
		cg.distinct = distinctDirs(cg.dirs)
		var made []string
		var err error
		for _, d := range cg.distinct {
			if err = os.Mkdir(d, 0o755); err != nil {
				break
			}
			made = append(made, d)
		}
		if err == nil {
			err = writeCgroupFile(cg.dirs["cpu"], "cpu.cfs_period_us", strconv.Itoa(cpuPeriodMicros))
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("slot %d cgroups: %w", s.id, errors.Join(err, removeDirs(made))))
			continue
		}
		s.v1 = cg
	}
	for _, s := range slots {
		if s.v1 == nil {
			continue
		}
		for _, d := range s.v1.distinct {
			if err := writeCgroupFile(d, "tasks", strconv.Itoa(s.tid)); err != nil {
				errs = append(errs, fmt.Errorf("slot %d: moving its thread in: %w", s.id, err))
				break
			}
		}
		if err := s.v1.readBase(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// readBase notes the OOM kill counter before the first execution.
func (cg *slotCgroupV1) readBase() error {
	m, err := cg.files.readFlatKeyed(cg.dirs["memory"], "memory.oom_control")
	if err != nil {
		return err
	}
	cg.oomBase = m["oom_kill"]
	return nil
}

// detach removes a slot's cgroups; its thread is ending, and the kernel
// takes a moment to let go of it.
func (c *cgroupV1) detach(s *slot) error {
	s.v1.files.close()
	return removeDirs(s.v1.distinct)
}

// acquire writes the execution's limits into the slot's cgroups, those
// that differ from what they hold; the slot's thread counts as one task of
// the pids limit. The CPU counter spans every execution the slot ran and
// the cleanups after them: read now, it is this execution's zero.
func (c *cgroupV1) acquire(s *slot, l resolvedLimits) (execCgroup, error) {
	if err := s.v1.set(v1Target(l, 1)); err != nil {
		return nil, err
	}
	e := &execCgroupV1{c: c, cg: s.v1, limits: l}
	if d, ok := s.v1.dirs["cpuacct"]; ok {
		base, err := s.v1.files.readUint(d, "cpuacct.usage")
		if err != nil {
			return nil, err
		}
		e.cpuBase = base
	}
	return e, nil
}

// unknownV1 marks limit files whose content a failed write left unknown.
var unknownV1 = v1Values{memory: -2, quota: -2, pids: -2}

// set takes the slot's limit files to next.
func (cg *slotCgroupV1) set(next v1Values) error {
	if cg.held == unknownV1 {
		// From the unlimited state, whatever the order of the writes that
		// failed left: memory+swap first, as for any rise.
		for _, f := range v1Writes(v1Values{memory: 0, quota: 0, pids: 0}, unlimitedV1) {
			_ = cg.files.write(cg.dirs[f.ctrl], f.name, f.value)
		}
		cg.held = unlimitedV1
	}
	for _, f := range v1Writes(cg.held, next) {
		if err := cg.files.write(cg.dirs[f.ctrl], f.name, f.value); err != nil {
			if !(optionalCgroupFile(f.name) && errors.Is(err, os.ErrNotExist)) {
				// What the files hold is unknown now: make the next set
				// write everything.
				cg.held = unknownV1
				return err
			}
		}
	}
	cg.held = next
	return nil
}

type execCgroupV1 struct {
	c      *cgroupV1
	cg     *slotCgroupV1
	limits resolvedLimits
	// cpuBase is the slot's cpuacct.usage when the execution was given
	// the cgroups; written before the box is anyone else's, then only read.
	cpuBase uint64
	// isEmpty is set when empty found nothing left, which waitEmpty then
	// needs not ask again: only a member can fork into a cgroup.
	isEmpty bool
}

func (e *execCgroupV1) fd() int { return -1 }

func (e *execCgroupV1) join(int) error {
	return errors.New("cgroup v1 places processes through the slot's thread")
}

func (e *execCgroupV1) signalAll(sig syscall.Signal) error {
	return signalProcs(e.cg.dirs["freezer"], sig, e.c.self)
}

func (e *execCgroupV1) empty() bool {
	pids, err := readProcsExcept(e.cg.dirs["freezer"], e.c.self)
	e.isEmpty = err == nil && len(pids) == 0
	return e.isEmpty
}

func (e *execCgroupV1) kill() error {
	// The usual end of an execution: nothing is left. An empty cgroup
	// stays empty and needs no freeze.
	dir := e.cg.dirs["freezer"]
	if e.empty() {
		return nil
	}
	return freezeKillThaw(v1Freezer(dir), func() []string { return []string{dir} }, e.c.self)
}

// v1Freezer freezes a v1 freezer cgroup with its descendants. The slot's
// thread is frozen with the functions: it is idle while they run.
func v1Freezer(dir string) freezer {
	return freezer{
		freeze: func() error { return writeCgroupFile(dir, "freezer.state", "FROZEN") },
		thaw:   func() error { return writeCgroupFile(dir, "freezer.state", "THAWED") },
		frozen: func() (bool, error) {
			b, err := readCgroupFile(dir, "freezer.state")
			return strings.TrimSpace(string(b)) == "FROZEN", err
		},
	}
}

func (e *execCgroupV1) waitEmpty(timeout time.Duration) error {
	if e.isEmpty {
		return nil
	}
	return poll(timeout, func() (bool, error) {
		pids, err := readProcsExcept(e.cg.dirs["freezer"], e.c.self)
		return len(pids) == 0, err
	})
}

// usage reads the slot's memory charge and its CPU counter past the
// execution's base, through the files kept open.
func (e *execCgroupV1) usage() (Usage, error) {
	cg := e.cg
	mem, err := cg.files.readUint(cg.dirs["memory"], "memory.usage_in_bytes")
	if err != nil {
		return Usage{}, err
	}
	u := Usage{MemoryBytes: mem}
	if d, ok := cg.dirs["cpuacct"]; ok {
		v, err := cg.files.readUint(d, "cpuacct.usage")
		if err != nil {
			return Usage{}, err
		}
		u.CPUTime = e.cpuTime(v)
	}
	return u, nil
}

// cpuTime is the execution's share of the slot's CPU counter v.
func (e *execCgroupV1) cpuTime(v uint64) time.Duration {
	if v < e.cpuBase {
		return 0
	}
	return time.Duration(v - e.cpuBase)
}

// measure reads the peak and the counters; the OOM counter read is the
// next execution's base.
func (e *execCgroupV1) measure(res *Result) {
	cg := e.cg
	if v, err := cg.files.readUint(cg.dirs["memory"], "memory.max_usage_in_bytes"); err == nil {
		res.PeakMemoryBytes = v
	}
	if m, err := cg.files.readFlatKeyed(cg.dirs["memory"], "memory.oom_control"); err == nil {
		res.OOMKilled = m["oom_kill"] > cg.oomBase
		cg.oomBase = m["oom_kill"]
	}
	if d, ok := cg.dirs["cpuacct"]; ok {
		if v, err := cg.files.readUint(d, "cpuacct.usage"); err == nil {
			res.CPUTime = e.cpuTime(v)
		}
	}
}

// release readies the slot's cgroups for its next execution: the CPU
// quota off (a throttled quota would slow the slot's thread's next fork),
// the page cache the function left charged there reclaimed, the peak
// restarted. The memory and pids limits stay: the next execution is often
// of the same function, and then nothing is written.
func (e *execCgroupV1) release(gone bool) error {
	cg := e.cg
	if !gone {
		return errors.New("the execution's processes were not proven gone")
	}
	next := cg.held
	next.quota = -1
	if err := cg.set(next); err != nil {
		return err
	}
	if used, err := cg.files.readUint(cg.dirs["memory"], "memory.usage_in_bytes"); err == nil && used > forceEmptyAbove {
		if st, err := readFlatKeyed(cg.dirs["memory"], "memory.stat"); err == nil && st["cache"] > forceEmptyAbove {
			if err := cg.files.write(cg.dirs["memory"], "memory.force_empty", "0"); err != nil {
				return err
			}
		}
	}
	return cg.files.write(cg.dirs["memory"], "memory.max_usage_in_bytes", "0")
}
