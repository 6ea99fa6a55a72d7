package nodeinfo

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/windows"
)

func TestCPUTimesFromSystemTimes(t *testing.T) {
	// ticks builds a FILETIME of n 100 ns ticks, spanning both halves.
	ticks := func(n uint64) windows.Filetime {
		return windows.Filetime{LowDateTime: uint32(n), HighDateTime: uint32(n >> 32)}
	}
	const second = 10_000_000
	tests := []struct {
		name               string
		idle, kernel, user uint64
		want               cpuTimes
		wantErr            error
	}{
		{"kernel time includes idle", 6 * second, 8 * second, 2 * second, cpuTimes{busy: 4, total: 10}, nil},
		{"beyond 32 bits", 1 << 33, 1 << 34, 0, cpuTimes{busy: float64(1<<33) / second, total: float64(1<<34) / second}, nil},
		{"no time at all", 0, 0, 0, cpuTimes{}, ErrImplausible},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := cpuTimesFromSystemTimes(ticks(tt.idle), ticks(tt.kernel), ticks(tt.user))
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("error = %v, want %v", err, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(cpuTimes{})); diff != "" {
				t.Errorf("cpuTimesFromSystemTimes (-want +got):\n%s", diff)
			}
		})
	}
}

func TestSamplerOverWindowsKernel(t *testing.T) {
	s, err := NewSampler("", 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got := s.Snapshot()
	if got.CPUPercent < 0 || got.CPUPercent > 100 || got.Memory.TotalBytes == 0 || got.Memory.UsedBytes > got.Memory.TotalBytes {
		t.Errorf("Snapshot = %+v, want sane figures", got)
	}
}
