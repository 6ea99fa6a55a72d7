package sandbox

import "math"

// Job object limit flags (winnt.h), written here so the computation below
// builds and is tested on every OS.
const (
	jobLimitActiveProcess           = 0x00000008
	jobLimitJobMemory               = 0x00000200
	jobLimitDieOnUnhandledException = 0x00000400
	jobLimitKillOnJobClose          = 0x00002000
)

// jobLimits is what a Windows job object gets for one execution.
type jobLimits struct {
	flags           uint32
	jobMemory       uint64 // bytes for all processes of the job; 0: none
	activeProcesses uint32
	// cpuRate is the hard cap in 1/100 of a percent of the whole machine
	// (JOBOBJECT_CPU_RATE_CONTROL_INFORMATION.CpuRate); 0: none.
	cpuRate uint32
}

// newJobLimits maps an execution's limits to a job object's. A process
// left in the job dies when the agent closes it (KILL_ON_JOB_CLOSE), also
// when the agent itself dies; a crash dialog never holds an execution.
func newJobLimits(l Limits, pids int64, numCPU int) jobLimits {
	j := jobLimits{flags: jobLimitKillOnJobClose | jobLimitDieOnUnhandledException}
	if l.Pids != nil {
		pids = *l.Pids
	}
	if pids > 0 {
		j.flags |= jobLimitActiveProcess
		j.activeProcesses = uint32(min(pids, math.MaxUint32))
	}
	if l.MemoryBytes != nil {
		j.flags |= jobLimitJobMemory
		j.jobMemory = uint64(*l.MemoryBytes)
	}
	if l.CPUMillicores != nil && numCPU > 0 {
		// 1000 millicores are one CPU, 10000 is all of them.
		rate := *l.CPUMillicores * 10 / int64(numCPU)
		j.cpuRate = uint32(max(1, min(rate, 10000)))
	}
	return j
}
