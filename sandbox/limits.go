package sandbox

import "strconv"

// cgroupFile is one value to write into one file of an execution's
// cgroup. ctrl names the v1 hierarchy ("memory", "cpu", "pids"); v2 has one
// directory and ignores it.
type cgroupFile struct {
	ctrl, name, value string
}

// cpuPeriodMicros is the CFS period a CPU quota is expressed against.
const cpuPeriodMicros = 100_000

// resolvedLimits are an execution's limits with the config's defaults
// applied; pids <= 0 is no pids limit.
type resolvedLimits struct {
	memory        *int64
	cpuMillicores *int64
	pids          int64
}

func (l resolvedLimits) cpuQuotaMicros() int64 {
	return *l.cpuMillicores * cpuPeriodMicros / 1000
}

// Optional files: written when the kernel has them, skipped when it does
// not (no swap accounting).
const (
	v1MemswLimit = "memory.memsw.limit_in_bytes"
	v2SwapMax    = "memory.swap.max"
)

// v1LimitFiles is what a v1 execution's cgroups get, in the order to write
// them. The slot's cgroups are reused, so every limit is written each time
// (an unset limit as "no limit"), and memory.memsw, which must never be
// below memory, follows memory: lowering both from the unlimited state the
// slot is reset to between executions. extraTasks counts tasks of the
// agent's own that sit in the pids cgroup beside the function.
func v1LimitFiles(l resolvedLimits, extraTasks int64) []cgroupFile {
	mem := "-1"
	if l.memory != nil {
		mem = strconv.FormatInt(*l.memory, 10)
	}
	quota := "-1"
	if l.cpuMillicores != nil {
		quota = strconv.FormatInt(l.cpuQuotaMicros(), 10)
	}
	pids := "max"
	if l.pids > 0 {
		pids = strconv.FormatInt(l.pids+extraTasks, 10)
	}
	return []cgroupFile{
		{"memory", "memory.limit_in_bytes", mem},
		// memory+swap at the same value: no swapping past the limit.
		{"memory", v1MemswLimit, mem},
		{"cpu", "cpu.cfs_quota_us", quota},
		{"pids", "pids.max", pids},
	}
}

// v1ResetFiles undo v1LimitFiles between two executions of a slot: every
// limit off (memory.memsw first, since it may never be below memory), and
// the peak counter restarted.
func v1ResetFiles() []cgroupFile {
	return []cgroupFile{
		{"memory", v1MemswLimit, "-1"},
		{"memory", "memory.limit_in_bytes", "-1"},
		{"memory", "memory.max_usage_in_bytes", "0"},
		{"cpu", "cpu.cfs_quota_us", "-1"},
	}
}

// v2LimitFiles is what a fresh v2 execution cgroup gets.
func v2LimitFiles(l resolvedLimits) []cgroupFile {
	var files []cgroupFile
	if l.memory != nil {
		files = append(files,
			cgroupFile{"memory", "memory.max", strconv.FormatInt(*l.memory, 10)},
			cgroupFile{"memory", v2SwapMax, "0"})
	}
	// An OOM kill takes the whole execution, not one process of it.
	files = append(files, cgroupFile{"memory", "memory.oom.group", "1"})
	if l.cpuMillicores != nil {
		files = append(files, cgroupFile{"cpu", "cpu.max",
			strconv.FormatInt(l.cpuQuotaMicros(), 10) + " " + strconv.Itoa(cpuPeriodMicros)})
	}
	if l.pids > 0 {
		files = append(files, cgroupFile{"pids", "pids.max", strconv.FormatInt(l.pids, 10)})
	}
	return files
}

// optionalCgroupFile says whether a missing file may be skipped.
func optionalCgroupFile(name string) bool {
	return name == v1MemswLimit || name == v2SwapMax
}
