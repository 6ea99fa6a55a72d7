package sandbox

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
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

	mu    sync.Mutex
	ready []string // empty execution cgroups made ahead
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

func (c *cgroupV2) close() error {
	c.mu.Lock()
	ready := c.ready
	c.ready = nil
	c.mu.Unlock()
	var errs []error
	for _, d := range ready {
		errs = append(errs, rmdirCgroup(d, emptyTimeout))
	}
	return errors.Join(append(errs, rmdirCgroup(c.instance, emptyTimeout))...)
}

// Slots need nothing of the hierarchy on v2: functions are born straight
// into a cgroup of their own (CLONE_INTO_CGROUP).
func (c *cgroupV2) attach([]*slot) error { return nil }
func (c *cgroupV2) detach(*slot) error   { return nil }

// v2ReadyCgroups is how many empty cgroups are kept made ahead.
const v2ReadyCgroups = 4

// acquire takes an empty cgroup (made ahead, or now) and writes the
// execution's limits into it. Its name is random: nothing about the
// execution shows in the cgroup tree.
func (c *cgroupV2) acquire(_ *slot, l resolvedLimits) (execCgroup, error) {
	c.mu.Lock()
	var dir string
	if n := len(c.ready); n > 0 {
		dir, c.ready = c.ready[n-1], c.ready[:n-1]
	}
	c.mu.Unlock()
	if dir == "" {
		var err error
		if dir, err = c.mkdir(); err != nil {
			return nil, err
		}
	}
	e := &execCgroupV2{c: c, dir: dir, limits: l, cgfd: -1}
	for _, f := range v2LimitFiles(l) {
		if err := writeCgroupFile(dir, f.name, f.value); err != nil {
			if optionalCgroupFile(f.name) && errors.Is(err, os.ErrNotExist) {
				continue
			}
			return nil, errors.Join(err, e.remove())
		}
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, errors.Join(&os.PathError{Op: "open", Path: dir, Err: err}, e.remove())
	}
	e.cgfd = fd
	if c.samplePeak {
		e.sampler = startPeakSampler(dir)
	}
	return e, nil
}

// mkdir makes an empty execution cgroup with a random name.
func (c *cgroupV2) mkdir() (string, error) {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	dir := filepath.Join(c.instance, hex.EncodeToString(b[:]))
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", fmt.Errorf("cgroup: %w", err)
	}
	return dir, nil
}

// refill makes empty cgroups until v2ReadyCgroups wait; it runs after an
// execution, off its start path.
func (c *cgroupV2) refill() {
	for {
		c.mu.Lock()
		enough := len(c.ready) >= v2ReadyCgroups
		c.mu.Unlock()
		if enough {
			return
		}
		dir, err := c.mkdir()
		if err != nil {
			c.log.Warn("making a cgroup ahead", "err", err)
			return
		}
		c.mu.Lock()
		c.ready = append(c.ready, dir)
		c.mu.Unlock()
	}
}

type execCgroupV2 struct {
	c       *cgroupV2
	dir     string
	cgfd    int
	limits  resolvedLimits
	sampler *peakSampler // nil when the kernel keeps memory.peak
}

func (e *execCgroupV2) fd() int { return e.cgfd }

func (e *execCgroupV2) join(pid int) error {
	if err := writeCgroupFile(e.dir, "cgroup.procs", strconv.Itoa(pid)); err != nil {
		return fmt.Errorf("joining the execution's cgroup: %w", err)
	}
	return nil
}

func (e *execCgroupV2) signalAll(sig syscall.Signal) error { return signalProcs(e.dir, sig, 0) }

func (e *execCgroupV2) empty() bool {
	ev, err := readFlatKeyed(e.dir, "cgroup.events")
	return err == nil && ev["populated"] == 0
}

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
	return freezeKillThaw(v2Freezer(dir), func() []string { return cgroupTree(dir) }, 0)
}

// v2Freezer freezes a v2 cgroup with its descendants.
func v2Freezer(dir string) freezer {
	return freezer{
		freeze: func() error { return writeCgroupFile(dir, "cgroup.freeze", "1") },
		thaw:   func() error { return writeCgroupFile(dir, "cgroup.freeze", "0") },
		frozen: func() (bool, error) {
			ev, err := readFlatKeyed(dir, "cgroup.events")
			return ev["frozen"] == 1, err
		},
	}
}

func (e *execCgroupV2) waitEmpty(timeout time.Duration) error {
	return poll(timeout, func() (bool, error) {
		ev, err := readFlatKeyed(e.dir, "cgroup.events")
		return err == nil && ev["populated"] == 0, err
	})
}

// usage reads the execution's own cgroup: made for it, so its counters
// started at zero.
func (e *execCgroupV2) usage() (Usage, error) {
	mem, err := readUint(e.dir, "memory.current")
	if err != nil {
		return Usage{}, err
	}
	st, err := readFlatKeyed(e.dir, "cpu.stat")
	if err != nil {
		return Usage{}, err
	}
	usec, ok := st["usage_usec"]
	if !ok {
		return Usage{}, fmt.Errorf("%s: no usage_usec", filepath.Join(e.dir, "cpu.stat"))
	}
	return Usage{MemoryBytes: mem, CPUTime: time.Duration(usec) * time.Microsecond}, nil
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

// release removes the execution's cgroup and makes the next one ahead.
func (e *execCgroupV2) release(gone bool) error {
	err := e.remove()
	if gone {
		e.c.refill()
	}
	return err
}

func (e *execCgroupV2) remove() error {
	if e.sampler != nil {
		e.sampler.close()
	}
	if e.cgfd >= 0 {
		_ = unix.Close(e.cgfd)
		e.cgfd = -1
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
