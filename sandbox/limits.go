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

// v1Values is what a slot's v1 limit files hold; -1 is no limit.
type v1Values struct {
	memory, quota, pids int64
}

// unlimitedV1 is a slot's state when its cgroups are made.
var unlimitedV1 = v1Values{memory: -1, quota: -1, pids: -1}

// v1Target is what an execution's limits are in v1 terms. extraTasks
// counts tasks of the agent's own that sit in the pids cgroup beside the
// function (the slot's thread).
func v1Target(l resolvedLimits, extraTasks int64) v1Values {
	v := unlimitedV1
	if l.memory != nil {
		v.memory = *l.memory
	}
	if l.cpuMillicores != nil {
		v.quota = l.cpuQuotaMicros()
	}
	if l.pids > 0 {
		v.pids = l.pids + extraTasks
	}
	return v
}

// v1Writes lists the writes that take a slot's cgroups from cur to next,
// nothing for a value that stays: a slot that runs the same function again
// writes nothing. memory.memsw.limit_in_bytes (memory plus swap, at the same
// value: no swapping past the limit) may never be below
// memory.limit_in_bytes, so it goes first when the limit rises and second
// when it falls.
func v1Writes(cur, next v1Values) []cgroupFile {
	var files []cgroupFile
	if next.memory != cur.memory {
		mem := cgroupFile{"memory", "memory.limit_in_bytes", strconv.FormatInt(next.memory, 10)}
		memsw := cgroupFile{"memory", v1MemswLimit, mem.value}
		if above(next.memory, cur.memory) {
			files = append(files, memsw, mem)
		} else {
			files = append(files, mem, memsw)
		}
	}
	if next.quota != cur.quota {
		files = append(files, cgroupFile{"cpu", "cpu.cfs_quota_us", strconv.FormatInt(next.quota, 10)})
	}
	if next.pids != cur.pids {
		pids := "max"
		if next.pids > 0 {
			pids = strconv.FormatInt(next.pids, 10)
		}
		files = append(files, cgroupFile{"pids", "pids.max", pids})
	}
	return files
}

// above says whether limit a is higher than b, -1 being no limit.
func above(a, b int64) bool {
	switch {
	case a < 0:
		return b >= 0
	case b < 0:
		return false
	}
	return a > b
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
