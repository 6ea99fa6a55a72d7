package sandbox

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestNewJobLimits(t *testing.T) {
	base := uint32(jobLimitKillOnJobClose | jobLimitDieOnUnhandledException | jobLimitActiveProcess)
	for _, tc := range []struct {
		name   string
		limits Limits
		pids   int64
		cpus   int
		want   jobLimits
	}{
		{"none", Limits{}, 1024, 4, jobLimits{flags: base, activeProcesses: 1024}},
		{"memory", Limits{MemoryBytes: ptr(64 << 20)}, 1024, 4, jobLimits{flags: base | jobLimitJobMemory, jobMemory: 64 << 20, activeProcesses: 1024}},
		{"pids override", Limits{Pids: ptr(10)}, 1024, 4, jobLimits{flags: base, activeProcesses: 10}},
		{"200m of 4 CPUs", Limits{CPUMillicores: ptr(200)}, 1024, 4, jobLimits{flags: base, activeProcesses: 1024, cpuRate: 500}},
		{"200m of 1 CPU", Limits{CPUMillicores: ptr(200)}, 1024, 1, jobLimits{flags: base, activeProcesses: 1024, cpuRate: 2000}},
		{"more than the machine", Limits{CPUMillicores: ptr(8000)}, 1024, 2, jobLimits{flags: base, activeProcesses: 1024, cpuRate: 10000}},
		{"tiny share of many CPUs", Limits{CPUMillicores: ptr(10)}, 1024, 256, jobLimits{flags: base, activeProcesses: 1024, cpuRate: 1}},
		{"no pids limit", Limits{}, NoPidsLimit, 1, jobLimits{flags: base &^ jobLimitActiveProcess}},
		{"huge pids", Limits{Pids: ptr(1 << 40)}, 1024, 1, jobLimits{flags: base, activeProcesses: 1<<32 - 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := newJobLimits(tc.limits, tc.pids, tc.cpus)
			if diff := cmp.Diff(tc.want, got, cmp.AllowUnexported(jobLimits{})); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}
