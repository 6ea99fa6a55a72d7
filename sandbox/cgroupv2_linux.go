package sandbox

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// v2Controllers must be enabled for each execution's cgroup.
var v2Controllers = []string{"memory", "cpu", "pids"}

// agentLeaf is where the agent moves itself inside its own delegated
// cgroup: v2 lets a cgroup have processes or controlled children, not both.
const agentLeaf = "agent"

// cgroupV2 keeps one cgroup per execution under this agent instance's
// cgroup, in the unified hierarchy.
type cgroupV2 struct {
	log      *slog.Logger
	instance string
	// samplePeak is set on kernels before 5.19, which have no memory.peak.
	samplePeak bool
}

func openCgroupV2(layout cgroupLayout, root, instance string, log *slog.Logger) (*cgroupV2, error) {
	base, err := v2Base(layout, root)
	if err != nil {
		return nil, err
	}
	if err := enableControllers(base); err != nil {
		return nil, err
	}
	c := &cgroupV2{log: log, instance: filepath.Join(base, instance)}
	removeStaleInstances(base, killTreeV2, log)
	if err := os.Mkdir(c.instance, 0o755); err != nil {
		return nil, err
	}
	if err := enableControllers(c.instance); err != nil {
		return nil, errors.Join(err, rmdirCgroup(c.instance, emptyTimeout))
	}
	_, err = os.Stat(filepath.Join(c.instance, "memory.peak"))
	c.samplePeak = err != nil
	return c, nil
}

// v2Base is the cgroup the instances go under: the configured root, or the
// agent's own cgroup after the agent moved itself into a leaf of it.
func v2Base(layout cgroupLayout, root string) (string, error) {
	if root != "" {
		base, err := joinCgroupPath(layout.v2Mount, root)
		if err != nil {
			return "", err
		}
		return base, os.MkdirAll(base, 0o755)
	}
	if layout.v2Own == "" {
		return "", errors.New("the agent's own cgroup is not visible under the cgroup2 mount; set cgroup_root")
	}
	base, err := joinCgroupPath(layout.v2Mount, layout.v2Own)
	if err != nil {
		return "", err
	}
	if layout.v2Own == "/" {
		return base, nil // the root cgroup may have processes and children
	}
	if filepath.Base(base) == agentLeaf {
		// Already in the leaf (another Sandbox in this process moved it).
		return filepath.Dir(base), nil
	}
	if err := os.Mkdir(filepath.Join(base, agentLeaf), 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return "", err
	}
	if err := writeCgroupFile(filepath.Join(base, agentLeaf), "cgroup.procs", strconv.Itoa(os.Getpid())); err != nil {
		return "", fmt.Errorf("moving the agent into a leaf: %w", err)
	}
	if procs, err := readProcs(base); err != nil || len(procs) > 0 {
		return "", errors.Join(err, fmt.Errorf("%s still holds processes %v besides the agent", base, procs))
	}
	return base, nil
}

// enableControllers turns on the memory, cpu and pids controllers for the
// children of dir; a controller dir's parent does not delegate is an error.
func enableControllers(dir string) error {
	avail, err := readCgroupFile(dir, "cgroup.controllers")
	if err != nil {
		return err
	}
	enabled, err := readCgroupFile(dir, "cgroup.subtree_control")
	if err != nil {
		return err
	}
	var missing, enable []string
	for _, c := range v2Controllers {
		switch {
		case !slices.Contains(strings.Fields(string(avail)), c):
			missing = append(missing, c)
		case !slices.Contains(strings.Fields(string(enabled)), c):
			enable = append(enable, "+"+c)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("controllers %v are not delegated to %s", missing, dir)
	}
	if len(enable) == 0 {
		return nil
	}
	return writeCgroupFile(dir, "cgroup.subtree_control", strings.Join(enable, " "))
}

func (c *cgroupV2) version() string { return "v2" }

func (c *cgroupV2) close() error { return rmdirCgroup(c.instance, emptyTimeout) }

func (c *cgroupV2) create(name string, limits resolvedLimits) (execCgroup, error) {
	e := &execCgroupV2{dir: filepath.Join(c.instance, name), limits: limits}
	if err := os.Mkdir(e.dir, 0o755); err != nil {
		return nil, fmt.Errorf("cgroup: %w", err)
	}
	if err := e.writeLimits(); err != nil {
		return nil, errors.Join(fmt.Errorf("cgroup limits: %w", err), rmdirCgroup(e.dir, emptyTimeout))
	}
	if c.samplePeak {
		e.sampler = startPeakSampler(e.dir)
	}
	return e, nil
}

type execCgroupV2 struct {
	dir     string
	limits  resolvedLimits
	sampler *peakSampler // nil when the kernel keeps memory.peak
}

func (e *execCgroupV2) writeLimits() error {
	if m := e.limits.memory; m != nil {
		if err := writeCgroupFile(e.dir, "memory.max", strconv.FormatInt(*m, 10)); err != nil {
			return err
		}
		// The file is missing when the kernel does not account swap.
		if _, err := os.Stat(filepath.Join(e.dir, "memory.swap.max")); err == nil {
			if err := writeCgroupFile(e.dir, "memory.swap.max", "0"); err != nil {
				return err
			}
		}
	}
	// An OOM kill takes the whole execution, not one process of it.
	if err := writeCgroupFile(e.dir, "memory.oom.group", "1"); err != nil {
		return err
	}
	if e.limits.cpuMillicores != nil {
		v := strconv.FormatInt(e.limits.cpuQuotaMicros(), 10) + " " + strconv.Itoa(cpuPeriodMicros)
		if err := writeCgroupFile(e.dir, "cpu.max", v); err != nil {
			return err
		}
	}
	if e.limits.pids <= 0 {
		return nil
	}
	return writeCgroupFile(e.dir, "pids.max", strconv.FormatInt(e.limits.pids, 10))
}

// prepare makes the fork clone3 straight into the cgroup
// (CLONE_INTO_CGROUP).
func (e *execCgroupV2) prepare(cmd *exec.Cmd) (func(int) error, func(), error) {
	fd, err := unix.Open(e.dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, &os.PathError{Op: "open", Path: e.dir, Err: err}
	}
	cmd.SysProcAttr.UseCgroupFD = true
	cmd.SysProcAttr.CgroupFD = fd
	return nil, func() { _ = unix.Close(fd) }, nil
}

func (e *execCgroupV2) signalAll(sig syscall.Signal) error { return signalProcs(e.dir, sig) }

func (e *execCgroupV2) kill() error { return killTreeV2(e.dir) }

// killTreeV2 kills every process in dir and its descendants: cgroup.kill
// (5.14+), else freeze, kill each, thaw.
func killTreeV2(dir string) error {
	err := writeCgroupFile(dir, "cgroup.kill", "1")
	if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if _, serr := os.Stat(dir); serr != nil {
		return nil // the cgroup itself is gone
	}
	return freezeKillV2(dir)
}

// freezeKillV2 is the kill for kernels without cgroup.kill: frozen, no
// process can fork while each is killed.
func freezeKillV2(dir string) error {
	if err := writeCgroupFile(dir, "cgroup.freeze", "1"); err != nil {
		return err
	}
	frozenErr := poll(time.Second, func() (bool, error) {
		ev, err := readFlatKeyed(dir, "cgroup.events")
		return ev["frozen"] == 1, err
	})
	var errs []error
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			errs = append(errs, signalProcs(p, unix.SIGKILL))
		}
		return nil
	})
	// SIGKILL gets through the v2 freezer, so the cgroup may already be
	// empty and removed by now.
	if err := writeCgroupFile(dir, "cgroup.freeze", "0"); !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return errors.Join(err, frozenErr)
	}
	return nil
}

func (e *execCgroupV2) waitEmpty(timeout time.Duration) error {
	return poll(timeout, func() (bool, error) {
		ev, err := readFlatKeyed(e.dir, "cgroup.events")
		return err == nil && ev["populated"] == 0, err
	})
}

func (e *execCgroupV2) measure(res *Result) {
	if e.sampler != nil {
		res.PeakMemoryBytes = e.sampler.close()
	} else if v, err := readUint(e.dir, "memory.peak"); err == nil {
		res.PeakMemoryBytes = v
	}
	if ev, err := readFlatKeyed(e.dir, "memory.events"); err == nil {
		res.OOMKilled = ev["oom_kill"] > 0 || ev["oom_group_kill"] > 0
	}
	if st, err := readFlatKeyed(e.dir, "cpu.stat"); err == nil {
		res.CPUTime = time.Duration(st["usage_usec"]) * time.Microsecond
	}
}

func (e *execCgroupV2) remove() error {
	if e.sampler != nil {
		e.sampler.close()
	}
	return rmdirCgroup(e.dir, emptyTimeout)
}

// peakSampleInterval is how often memory.current is read where the kernel
// keeps no peak; a spike shorter than this can be missed.
const peakSampleInterval = 20 * time.Millisecond

// peakSampler follows a cgroup's memory.current and keeps the highest
// value seen.
type peakSampler struct {
	stop, done chan struct{}
	once       sync.Once
	peak       atomic.Uint64
}

func startPeakSampler(dir string) *peakSampler {
	s := &peakSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		tick := time.NewTicker(peakSampleInterval)
		defer tick.Stop()
		for {
			if v, err := readUint(dir, "memory.current"); err == nil {
				s.observe(v)
			}
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

func (s *peakSampler) observe(v uint64) {
	for cur := s.peak.Load(); v > cur && !s.peak.CompareAndSwap(cur, v); cur = s.peak.Load() {
	}
}

// close stops the sampling, waits for it, and returns the peak seen.
func (s *peakSampler) close() uint64 {
	s.once.Do(func() { close(s.stop) })
	<-s.done
	return s.peak.Load()
}
