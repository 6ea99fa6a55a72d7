package service

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/procfs"
)

// processFigures is what a running execution has used so far, for the
// admin's ListExecutions.
type processFigures struct {
	uid         int
	memoryBytes uint64
	cpuTime     time.Duration
}

// procUserHZ is the unit of the CPU times in /proc/<pid>/stat.
const procUserHZ = 100

// cgroupMounts finds, once, where the cgroup hierarchies are mounted.
var cgroupMounts = sync.OnceValues(func() (map[string]string, error) {
	mounts, err := procfs.GetMounts()
	if err != nil {
		return nil, err
	}
	dirs := map[string]string{}
	for _, m := range mounts {
		switch m.FSType {
		case "cgroup2":
			dirs[""] = m.MountPoint
		case "cgroup":
			for opt := range m.SuperOptions {
				dirs[opt] = m.MountPoint
			}
		}
	}
	return dirs, nil
})

// processUsage reads what the execution whose main process is pid has used:
// its uid, the memory charged to its cgroup now and its CPU time so far.
// On cgroup v2 both come from the execution's own cgroup. On v1 the
// sandbox reuses a slot's cgroups, whose CPU counter spans the executions
// before, so the CPU time is that of the processes still in the cgroup
// and of the children they reaped.
func processUsage(pid int) (processFigures, error) {
	p, err := procfs.NewProc(pid)
	if err != nil {
		return processFigures{}, err
	}
	st, err := p.NewStatus()
	if err != nil {
		return processFigures{}, err
	}
	f := processFigures{uid: int(st.UIDs[1])}
	cgroups, err := p.Cgroups()
	if err != nil {
		return f, err
	}
	mounts, err := cgroupMounts()
	if err != nil {
		return f, err
	}
	for _, cg := range cgroups {
		if cg.HierarchyID != 0 && slices.Contains(cg.Controllers, "memory") && mounts["memory"] != "" {
			dir := filepath.Join(mounts["memory"], cg.Path)
			f.memoryBytes, _ = readCgroupUint(dir, "memory.usage_in_bytes")
			f.cpuTime, err = treeCPUTime(dir)
			return f, err
		}
	}
	for _, cg := range cgroups {
		if cg.HierarchyID == 0 && mounts[""] != "" {
			dir := filepath.Join(mounts[""], cg.Path)
			f.memoryBytes, _ = readCgroupUint(dir, "memory.current")
			usec, err := cpuStatUsage(dir)
			f.cpuTime = time.Duration(usec) * time.Microsecond
			return f, err
		}
	}
	return f, errors.New("no cgroup of the execution found")
}

func readCgroupUint(dir, name string) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
}

// cpuStatUsage reads usage_usec from a v2 cgroup's cpu.stat.
func cpuStatUsage(dir string) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "usage_usec "); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("%s/cpu.stat has no usage_usec", dir)
}

// treeCPUTime sums the CPU time of the processes in a v1 cgroup (the
// agent's own pid aside: its slot thread sits there) and of the children
// they reaped.
func treeCPUTime(dir string) (time.Duration, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return 0, err
	}
	self := os.Getpid()
	var ticks int64
	for _, field := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(field)
		if err != nil || pid == self {
			continue
		}
		p, err := procfs.NewProc(pid)
		if err != nil {
			continue // gone meanwhile
		}
		st, err := p.Stat()
		if err != nil {
			continue
		}
		ticks += int64(st.UTime) + int64(st.STime) + int64(st.CUTime) + int64(st.CSTime)
	}
	return time.Duration(ticks) * time.Second / procUserHZ, nil
}
