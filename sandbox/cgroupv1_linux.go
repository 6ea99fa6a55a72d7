package sandbox

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// defaultCgroupV1Root is the parent of the agents' cgroups in each v1
// hierarchy.
const defaultCgroupV1Root = "/flux-agent"

// cgroupV1 keeps one cgroup per execution in each of the memory, cpu,
// (cpuacct,) pids and freezer hierarchies.
type cgroupV1 struct {
	log *slog.Logger
	// instance maps a controller to this agent's dir in its hierarchy.
	instance map[string]string
	sh, env  string
}

func openCgroupV1(layout cgroupLayout, root, instance string, log *slog.Logger) (*cgroupV1, error) {
	if root == "" {
		root = defaultCgroupV1Root
	}
	sh, env, err := v1Tools()
	if err != nil {
		return nil, err
	}
	c := &cgroupV1{log: log, instance: map[string]string{}, sh: sh, env: env}
	controllers := append([]string{"cpuacct"}, v1Controllers...)
	for _, ctrl := range controllers {
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
	for _, parent := range c.parents() {
		removeStaleInstances(parent, c.killTree, log)
	}
	var made []string
	for _, dir := range c.hierarchyDirs(c.instance) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, errors.Join(err, c.removeDirs(made))
		}
		made = append(made, dir)
	}
	return c, nil
}

func (c *cgroupV1) version() string { return "v1" }

// parents are the dirs holding the instances of all agents.
func (c *cgroupV1) parents() []string {
	var out []string
	for _, dir := range c.hierarchyDirs(c.instance) {
		out = append(out, filepath.Dir(dir))
	}
	return out
}

// hierarchyDirs lists the distinct dirs of a controller map: co-mounted
// controllers (cpu,cpuacct) share one.
func (c *cgroupV1) hierarchyDirs(dirs map[string]string) []string {
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

func (c *cgroupV1) removeDirs(dirs []string) error {
	var errs []error
	for _, d := range dirs {
		errs = append(errs, rmdirCgroup(d, emptyTimeout))
	}
	return errors.Join(errs...)
}

// killTree kills everything in a stale instance: frozen first, so a fork
// bomb cannot outrun it.
func (c *cgroupV1) killTree(freezerInstanceDir string) error {
	name := filepath.Base(freezerInstanceDir)
	dirs := map[string]string{}
	for ctrl, d := range c.instance {
		dirs[ctrl] = filepath.Join(filepath.Dir(d), name)
	}
	return killFrozenV1(dirs["freezer"], true)
}

func (c *cgroupV1) close() error {
	return c.removeDirs(c.hierarchyDirs(c.instance))
}

func (c *cgroupV1) create(name string, limits resolvedLimits) (execCgroup, error) {
	e := &execCgroupV1{dirs: map[string]string{}, limits: limits, sh: c.sh, env: c.env}
	for ctrl, d := range c.instance {
		e.dirs[ctrl] = filepath.Join(d, name)
	}
	var made []string
	for _, dir := range c.hierarchyDirs(e.dirs) {
		if err := os.Mkdir(dir, 0o755); err != nil {
			return nil, errors.Join(fmt.Errorf("cgroup: %w", err), c.removeDirs(made))
		}
		made = append(made, dir)
	}
	if err := e.writeLimits(); err != nil {
		return nil, errors.Join(fmt.Errorf("cgroup limits: %w", err), c.removeDirs(made))
	}
	e.distinct = made
	return e, nil
}

type execCgroupV1 struct {
	dirs     map[string]string // controller → this execution's dir
	distinct []string
	limits   resolvedLimits
	sh, env  string
}

func (e *execCgroupV1) writeLimits() error {
	if m := e.limits.memory; m != nil {
		v := strconv.FormatInt(*m, 10)
		if err := writeCgroupFile(e.dirs["memory"], "memory.limit_in_bytes", v); err != nil {
			return err
		}
		// memory+swap at the same value: no swapping past the limit. The
		// file is missing when the kernel does not account swap.
		if _, err := os.Stat(filepath.Join(e.dirs["memory"], "memory.memsw.limit_in_bytes")); err == nil {
			if err := writeCgroupFile(e.dirs["memory"], "memory.memsw.limit_in_bytes", v); err != nil {
				return err
			}
		}
	}
	if e.limits.cpuMillicores != nil {
		if err := writeCgroupFile(e.dirs["cpu"], "cpu.cfs_period_us", strconv.Itoa(cpuPeriodMicros)); err != nil {
			return err
		}
		if err := writeCgroupFile(e.dirs["cpu"], "cpu.cfs_quota_us", strconv.FormatInt(e.limits.cpuQuotaMicros(), 10)); err != nil {
			return err
		}
	}
	if e.limits.pids <= 0 {
		return nil
	}
	return writeCgroupFile(e.dirs["pids"], "pids.max", strconv.FormatInt(e.limits.pids, 10))
}

// v1Trampoline is the shell script a v1 execution starts as: it waits
// until the agent has moved it into its cgroups and says so on fd 3, then
// becomes env(1), which becomes the function with exactly its environment
// (a shell adds variables of its own, such as PWD). v1 has no
// CLONE_INTO_CGROUP, and moving the forking thread in instead would expose
// the agent to the execution's OOM killer while the child execs.
const v1Trampoline = `read -r _ <&3 || exit 125; exec 3<&-; exec "$0" -i -- "$@"`

// v1Tools finds the shell and env(1) the trampoline needs.
func v1Tools() (sh, env string, err error) {
	sh = "/bin/sh"
	if _, err := os.Stat(sh); err != nil {
		return "", "", fmt.Errorf("start trampoline: %w", err)
	}
	for _, env := range []string{"/usr/bin/env", "/bin/env"} {
		if _, err := os.Stat(env); err == nil {
			return sh, env, nil
		}
	}
	return "", "", fmt.Errorf("start trampoline: env(1): %w", os.ErrNotExist)
}

// prepare turns cmd into the gated trampoline; started moves the waiting
// process into every hierarchy, then opens the gate.
func (e *execCgroupV1) prepare(cmd *exec.Cmd) (func(int) error, func(), error) {
	if strings.Contains(cmd.Path, "=") {
		// env(1) would take it for a variable and run the first argument.
		return nil, nil, fmt.Errorf("%w: handler path %q contains '=' (cgroup v1 starts it through env(1))", ErrInvalidSpec, cmd.Path)
	}
	gateR, gateW, err := os.Pipe()
	if err != nil {
		return nil, nil, fmt.Errorf("start gate: %w", err)
	}
	args := append([]string{e.sh, "-c", v1Trampoline, e.env}, cmd.Env...)
	args = append(args, cmd.Path)
	cmd.Args = append(args, cmd.Args[1:]...)
	cmd.Path = e.sh
	cmd.Env = []string{}
	cmd.ExtraFiles = []*os.File{gateR}
	started := func(pid int) error {
		_ = gateR.Close()
		for _, d := range e.distinct {
			if err := writeCgroupFile(d, "cgroup.procs", strconv.Itoa(pid)); err != nil {
				return fmt.Errorf("joining the execution's cgroup: %w", err)
			}
		}
		if _, err := gateW.Write([]byte("go\n")); err != nil {
			return fmt.Errorf("start gate: %w", err)
		}
		return nil
	}
	cleanup := func() {
		_ = gateR.Close()
		_ = gateW.Close()
	}
	return started, cleanup, nil
}

func (e *execCgroupV1) signalAll(sig syscall.Signal) error {
	return signalProcs(e.dirs["freezer"], sig)
}

func (e *execCgroupV1) kill() error {
	// The usual end of an execution: nothing is left. Only a member can
	// fork into a cgroup, so an empty one stays empty and needs no freeze.
	if pids, err := readProcs(e.dirs["freezer"]); err == nil && len(pids) == 0 {
		return nil
	}
	return killFrozenV1(e.dirs["freezer"], false)
}

// killFrozenV1 freezes a v1 freezer cgroup (with its descendants), kills
// every process in it, and thaws it so the kills take effect.
func killFrozenV1(dir string, descendants bool) error {
	if err := writeCgroupFile(dir, "freezer.state", "FROZEN"); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	// A task in uninterruptible sleep can hold FREEZING; kill anyway then.
	frozenErr := poll(time.Second, func() (bool, error) {
		b, err := readCgroupFile(dir, "freezer.state")
		return strings.TrimSpace(string(b)) == "FROZEN", err
	})
	dirs := []string{dir}
	if descendants {
		_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() && p != dir {
				dirs = append(dirs, p)
			}
			return nil
		})
	}
	var errs []error
	for _, d := range dirs {
		errs = append(errs, signalProcs(d, unix.SIGKILL))
	}
	errs = append(errs, writeCgroupFile(dir, "freezer.state", "THAWED"))
	if frozenErr != nil && errors.Join(errs...) == nil {
		return nil // killed all the same
	}
	return errors.Join(errs...)
}

func (e *execCgroupV1) waitEmpty(timeout time.Duration) error {
	return poll(timeout, func() (bool, error) {
		pids, err := readProcs(e.dirs["freezer"])
		return len(pids) == 0, err
	})
}

func (e *execCgroupV1) measure(res *Result) {
	if v, err := readUint(e.dirs["memory"], "memory.max_usage_in_bytes"); err == nil {
		res.PeakMemoryBytes = v
	}
	if m, err := readFlatKeyed(e.dirs["memory"], "memory.oom_control"); err == nil {
		res.OOMKilled = m["oom_kill"] > 0
	}
	if d, ok := e.dirs["cpuacct"]; ok {
		if v, err := readUint(d, "cpuacct.usage"); err == nil {
			res.CPUTime = time.Duration(v)
		}
	}
}

func (e *execCgroupV1) remove() error {
	var errs []error
	for _, d := range e.distinct {
		errs = append(errs, rmdirCgroup(d, emptyTimeout))
	}
	return errors.Join(errs...)
}
