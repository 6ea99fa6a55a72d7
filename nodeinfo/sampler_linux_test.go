package nodeinfo

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/prometheus/procfs"
)

// readCPU reads the stat fixture in dir as the sampler would.
func readCPU(t *testing.T, dir string) (cpuTimes, error) {
	t.Helper()
	src, err := openStatSource(dir)
	if err != nil {
		t.Fatalf("openStatSource(%s): %v", dir, err)
	}
	return src.cpuTimes()
}

func TestCPUPercentFromStatSnapshots(t *testing.T) {
	tests := []struct {
		name   string
		before string
		after  string
		want   float64
		wantOK bool
	}{
		{"user system and softirq against idle", "base", "busy-75", 75, true},
		{"only idle advanced", "base", "idle", 0, true},
		{"only user advanced", "base", "all-busy", 100, true},
		{"guest time is not counted twice", "base", "guest-50", 50, true},
		{"steal is busy", "base", "steal-50", 50, true},
		{"iowait is idle", "base", "iowait", 0, true},
		{"same snapshot twice gives no figure", "base", "base", 0, false},
		{"a CPU going offline gives no figure", "base", "cpu-offlined", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prev, err := readCPU(t, filepath.Join("testdata/stat", tt.before))
			if err != nil {
				t.Fatal(err)
			}
			cur, err := readCPU(t, filepath.Join("testdata/stat", tt.after))
			if err != nil {
				t.Fatal(err)
			}
			got, ok := busyPercent(prev, cur)
			if ok != tt.wantOK {
				t.Fatalf("busyPercent ok = %v, want %v (percent %v)", ok, tt.wantOK, got)
			}
			if diff := cmp.Diff(tt.want, got, cmpopts.EquateApprox(0, 1e-9)); diff != "" {
				t.Errorf("CPU percent %s → %s (-want +got):\n%s", tt.before, tt.after, diff)
			}
		})
	}
}

func TestReadCPUTimes(t *testing.T) {
	tests := []struct {
		dir     string
		want    cpuTimes
		wantErr error
	}{
		// busy = user+nice+system+irq+softirq+steal; total adds idle and iowait (USER_HZ 100).
		{dir: "testdata/stat/base", want: cpuTimes{busy: 15.5, total: 96.5}},
		{dir: "testdata/proc", want: cpuTimes{busy: 424.60, total: 789.74}},
		{dir: "testdata/stat/garbage", wantErr: procfs.ErrFileParse},
		{dir: "testdata/stat/no-cpu-line", wantErr: ErrMissingField},
		{dir: "testdata/stat/all-zero", wantErr: ErrMissingField},
		{dir: "testdata/stat/html", wantErr: ErrMissingField},
		{dir: "testdata/stat/missing", wantErr: fs.ErrNotExist},
	}
	for _, tt := range tests {
		t.Run(tt.dir, func(t *testing.T) {
			got, err := readCPU(t, tt.dir)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("cpuTimes() error = %v, want %v", err, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(cpuTimes{}), cmpopts.EquateApprox(0, 1e-9)); diff != "" {
				t.Errorf("cpuTimes() (-want +got):\n%s", diff)
			}
		})
	}
}

func TestReadMemory(t *testing.T) {
	const kB = 1024
	tests := []struct {
		dir     string
		want    Memory
		wantErr error
	}{
		{dir: "testdata/meminfo/quarter-used", want: Memory{TotalBytes: 16384000 * kB, UsedBytes: 4096000 * kB}},
		{dir: "testdata/meminfo/all-free", want: Memory{TotalBytes: 8000000 * kB}},
		{dir: "testdata/proc", want: Memory{TotalBytes: 24684092 * kB, UsedBytes: (24684092 - 23243972) * kB}},
		{dir: "testdata/meminfo/no-memavailable", wantErr: ErrMissingField},
		{dir: "testdata/meminfo/no-memtotal", wantErr: ErrMissingField},
		{dir: "testdata/meminfo/available-exceeds-total", wantErr: ErrImplausible},
		{dir: "testdata/meminfo/zero-total", wantErr: ErrImplausible},
		{dir: "testdata/meminfo/unknown-unit", wantErr: procfs.ErrFileParse},
		{dir: "testdata/meminfo/html", wantErr: procfs.ErrFileParse},
		{dir: "testdata/meminfo/garbage", wantErr: procfs.ErrFileParse},
		{dir: "testdata/stat/missing", wantErr: fs.ErrNotExist},
	}
	for _, tt := range tests {
		t.Run(tt.dir, func(t *testing.T) {
			got, err := readMemory(tt.dir)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("readMemory(%s) error = %v, want %v", tt.dir, err, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("readMemory(%s) (-want +got):\n%s", tt.dir, diff)
			}
		})
	}
}

func TestNewSamplerMissingProcRoot(t *testing.T) {
	s, err := NewSampler(filepath.Join(t.TempDir(), "no-proc"), time.Second, nil)
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("NewSampler on a missing root = %v, %v; want fs.ErrNotExist", s, err)
	}
}

// replaceFile swaps a fixture into a fake /proc in one rename, so the
// sampler never reads half a file.
func replaceFile(t *testing.T, from, to string) {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	tmp := to + ".new"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, to); err != nil {
		t.Fatal(err)
	}
}

// A whole run over a fake /proc: the since-boot figure at once, the delta
// once /proc/stat moves, fresh memory, and the last good figures kept when
// /proc turns to garbage.
func TestSamplerOverFakeProc(t *testing.T) {
	proc := t.TempDir()
	replaceFile(t, "testdata/stat/base/stat", filepath.Join(proc, "stat"))
	replaceFile(t, "testdata/meminfo/quarter-used/meminfo", filepath.Join(proc, "meminfo"))

	s, err := NewSampler(proc, time.Millisecond, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	const kB = 1024
	approx := cmpopts.EquateApprox(0, 1e-9)
	ignoreTime := cmpopts.IgnoreFields(Snapshot{}, "SampledAt")
	want := Snapshot{CPUPercent: 15.5 / 96.5 * 100, Memory: Memory{TotalBytes: 16384000 * kB, UsedBytes: 4096000 * kB}}
	if diff := cmp.Diff(want, s.Snapshot(), approx, ignoreTime); diff != "" {
		t.Errorf("first snapshot (-want +got):\n%s", diff)
	}

	replaceFile(t, "testdata/stat/busy-75/stat", filepath.Join(proc, "stat"))
	replaceFile(t, "testdata/meminfo/all-free/meminfo", filepath.Join(proc, "meminfo"))
	want = Snapshot{CPUPercent: 75, Memory: Memory{TotalBytes: 8000000 * kB}}
	waitFor(t, "the 75% delta and the new memory", func() bool {
		return cmp.Equal(want, s.Snapshot(), approx, ignoreTime)
	})

	replaceFile(t, "testdata/stat/garbage/stat", filepath.Join(proc, "stat"))
	replaceFile(t, "testdata/meminfo/no-memavailable/meminfo", filepath.Join(proc, "meminfo"))
	after := s.Snapshot().SampledAt
	waitFor(t, "two more samples", func() bool { return s.Snapshot().SampledAt.After(after) })
	after = s.Snapshot().SampledAt
	waitFor(t, "two more samples", func() bool { return s.Snapshot().SampledAt.After(after) })
	if diff := cmp.Diff(want, s.Snapshot(), approx, ignoreTime); diff != "" {
		t.Errorf("snapshot over a garbage /proc (-want +got):\n%s", diff)
	}
}

func TestSamplerOverRealProc(t *testing.T) {
	s, err := NewSampler("/proc", 10*time.Millisecond, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	first := s.Snapshot().SampledAt
	waitFor(t, "a delta reading", func() bool { return s.Snapshot().SampledAt.After(first) })
	got := s.Snapshot()
	if got.CPUPercent < 0 || got.CPUPercent > 100 {
		t.Errorf("CPUPercent = %v, want 0..100", got.CPUPercent)
	}
	if got.Memory.TotalBytes == 0 || got.Memory.UsedBytes > got.Memory.TotalBytes {
		t.Errorf("Memory = %+v, want 0 < used ≤ total", got.Memory)
	}
}

// BenchmarkProcSample is the background cost of one sample of the real /proc.
func BenchmarkProcSample(b *testing.B) {
	src, err := openStatSource("/proc")
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := src.cpuTimes(); err != nil {
			b.Fatal(err)
		}
		if _, err := src.memory(); err != nil {
			b.Fatal(err)
		}
	}
}
