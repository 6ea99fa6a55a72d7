package sandbox

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestV1Writes(t *testing.T) {
	mib := func(n int64) *int64 { v := n << 20; return &v }
	for _, tc := range []struct {
		name      string
		cur, next v1Values
		want      []cgroupFile
	}{
		{"same limits write nothing", v1Values{64 << 20, 25000, 1025}, v1Values{64 << 20, 25000, 1025}, nil},
		{"from none, memory falls: memory first", unlimitedV1, v1Target(resolvedLimits{memory: mib(64), pids: 1024}, 1), []cgroupFile{
			{"memory", "memory.limit_in_bytes", "67108864"},
			{"memory", v1MemswLimit, "67108864"},
			{"pids", "pids.max", "1025"},
		}},
		{"memory rises: memory+swap first", v1Values{64 << 20, -1, -1}, v1Values{128 << 20, -1, -1}, []cgroupFile{
			{"memory", v1MemswLimit, "134217728"},
			{"memory", "memory.limit_in_bytes", "134217728"},
		}},
		{"to no limit is a rise", v1Values{64 << 20, 25000, 9}, unlimitedV1, []cgroupFile{
			{"memory", v1MemswLimit, "-1"},
			{"memory", "memory.limit_in_bytes", "-1"},
			{"cpu", "cpu.cfs_quota_us", "-1"},
			{"pids", "pids.max", "max"},
		}},
		{"cpu quota", unlimitedV1, v1Target(resolvedLimits{cpuMillicores: mib(0), pids: 0}, 1), []cgroupFile{
			{"cpu", "cpu.cfs_quota_us", "0"},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, v1Writes(tc.cur, tc.next), cmp.AllowUnexported(cgroupFile{})); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
	m250 := int64(250)
	if got := v1Target(resolvedLimits{cpuMillicores: &m250}, 1); got.quota != 25000 {
		t.Errorf("250m is a quota of %d µs per 100 ms, want 25000", got.quota)
	}
}

func TestV2LimitFiles(t *testing.T) {
	mem, cpu := int64(48<<20), int64(250)
	got := v2LimitFiles(resolvedLimits{memory: &mem, cpuMillicores: &cpu, pids: 77})
	want := []cgroupFile{
		{"memory", "memory.max", "50331648"},
		{"memory", v2SwapMax, "0"},
		{"memory", "memory.oom.group", "1"},
		{"cpu", "cpu.max", "25000 100000"},
		{"pids", "pids.max", "77"},
	}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(cgroupFile{})); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if got := v2LimitFiles(resolvedLimits{}); len(got) != 1 || got[0].name != "memory.oom.group" {
		t.Errorf("no limits: %v, want only memory.oom.group", got)
	}
}
