package nodeinfo

import (
	"bytes"
	"errors"
	"log/slog"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestBusyPercent(t *testing.T) {
	tests := []struct {
		name      string
		prev, cur cpuTimes
		want      float64
		wantOK    bool
	}{
		{"half busy", cpuTimes{busy: 10, total: 100}, cpuTimes{busy: 60, total: 200}, 50, true},
		{"idle", cpuTimes{busy: 10, total: 100}, cpuTimes{busy: 10, total: 150}, 0, true},
		{"all busy", cpuTimes{busy: 10, total: 100}, cpuTimes{busy: 60, total: 150}, 100, true},
		{"since boot", cpuTimes{}, cpuTimes{busy: 25, total: 100}, 25, true},
		{"no time passed", cpuTimes{busy: 10, total: 100}, cpuTimes{busy: 10, total: 100}, 0, false},
		{"total went backwards", cpuTimes{busy: 10, total: 100}, cpuTimes{busy: 5, total: 50}, 0, false},
		{"busy went backwards", cpuTimes{busy: 10, total: 100}, cpuTimes{busy: 5, total: 150}, 0, false},
		{"busy grew more than total", cpuTimes{busy: 10, total: 100}, cpuTimes{busy: 80, total: 150}, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := busyPercent(tt.prev, tt.cur)
			if ok != tt.wantOK || got != tt.want {
				t.Errorf("busyPercent(%+v, %+v) = %v, %v; want %v, %v", tt.prev, tt.cur, got, ok, tt.want, tt.wantOK)
			}
		})
	}
}

func TestMemoryPercent(t *testing.T) {
	tests := []struct {
		mem  Memory
		want float64
	}{
		{Memory{TotalBytes: 400, UsedBytes: 100}, 25},
		{Memory{TotalBytes: 400, UsedBytes: 400}, 100},
		{Memory{TotalBytes: 400}, 0},
		{Memory{}, 0},
	}
	for _, tt := range tests {
		if got := tt.mem.Percent(); got != tt.want {
			t.Errorf("%+v.Percent() = %v, want %v", tt.mem, got, tt.want)
		}
	}
}

// fakeSource is a statSource whose figures the test sets.
type fakeSource struct {
	mu     sync.Mutex
	cpu    cpuTimes
	mem    Memory
	cpuErr error
	memErr error
	reads  int
}

func (f *fakeSource) cpuTimes() (cpuTimes, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reads++
	return f.cpu, f.cpuErr
}

func (f *fakeSource) memory() (Memory, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mem, f.memErr
}

func (f *fakeSource) set(update func(f *fakeSource)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	update(f)
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// syncBuffer collects log output written from the sampler's goroutine.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *syncBuffer) count(sub string) int {
	return bytes.Count([]byte(b.String()), []byte(sub))
}

func TestSamplerFirstFiguresAtOnce(t *testing.T) {
	src := &fakeSource{
		cpu: cpuTimes{busy: 30, total: 120},
		mem: Memory{TotalBytes: 1000, UsedBytes: 250},
	}
	s, err := startSampler(src, time.Hour, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	got := s.Snapshot()
	if diff := cmp.Diff(Memory{TotalBytes: 1000, UsedBytes: 250}, got.Memory); diff != "" {
		t.Errorf("memory before any interval (-want +got):\n%s", diff)
	}
	if got.CPUPercent != 25 {
		t.Errorf("CPU before a second reading = %v, want the since-boot average 25", got.CPUPercent)
	}
	if got.SampledAt.IsZero() {
		t.Error("SampledAt is zero")
	}
}

// With an interval of an hour, only the early second reading can bring the
// current load in: Flux must see it within the first second.
func TestSamplerSecondReadingComesEarly(t *testing.T) {
	src := &fakeSource{cpu: cpuTimes{busy: 0, total: 100}, mem: Memory{TotalBytes: 1000}}
	s, err := startSampler(src, time.Hour, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	src.set(func(f *fakeSource) {
		f.cpu = cpuTimes{busy: 90, total: 200}
		f.mem = Memory{TotalBytes: 1000, UsedBytes: 600}
	})
	waitFor(t, "the second reading", func() bool { return s.CPUPercent() == 90 })
	if diff := cmp.Diff(Memory{TotalBytes: 1000, UsedBytes: 600}, s.Memory()); diff != "" {
		t.Errorf("memory after the second reading (-want +got):\n%s", diff)
	}
}

func TestSamplerKeepsLastGoodFiguresAndLogsOnce(t *testing.T) {
	src := &fakeSource{cpu: cpuTimes{busy: 0, total: 100}, mem: Memory{TotalBytes: 1000, UsedBytes: 100}}
	var logs syncBuffer
	logger := slog.New(slog.NewTextHandler(&logs, nil))
	s, err := startSampler(src, time.Millisecond, logger)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	src.set(func(f *fakeSource) { f.cpu = cpuTimes{busy: 50, total: 200} })
	waitFor(t, "a 50% reading", func() bool { return s.CPUPercent() == 50 })

	boom := errors.New("proc unreadable")
	src.set(func(f *fakeSource) { f.cpuErr, f.memErr = boom, boom; f.reads = 0 })
	waitFor(t, "several failing readings", func() bool {
		src.mu.Lock()
		defer src.mu.Unlock()
		return src.reads >= 5
	})
	want := Snapshot{CPUPercent: 50, Memory: Memory{TotalBytes: 1000, UsedBytes: 100}}
	if diff := cmp.Diff(want, s.Snapshot(), cmp.FilterPath(func(p cmp.Path) bool { return p.Last().String() == ".SampledAt" }, cmp.Ignore())); diff != "" {
		t.Errorf("figures while failing (-want +got):\n%s", diff)
	}
	if n := logs.count("level=WARN"); n != 2 {
		t.Errorf("%d warnings while failing, want one per figure (2):\n%s", n, logs.String())
	}

	src.set(func(f *fakeSource) { f.cpuErr, f.memErr = nil, nil; f.cpu = cpuTimes{busy: 150, total: 300} })
	waitFor(t, "recovery", func() bool { return logs.count("readable again") == 2 })
	// Measured against the last good reading: 100 busy of 100 seconds.
	waitFor(t, "the figure after recovery", func() bool { return s.CPUPercent() == 100 })
}

func TestSamplerStartFailsWhenUnreadable(t *testing.T) {
	boom := errors.New("no proc")
	for _, src := range []*fakeSource{{cpuErr: boom}, {cpu: cpuTimes{total: 1}, memErr: boom}} {
		if s, err := startSampler(src, time.Hour, nil); !errors.Is(err, boom) {
			t.Errorf("startSampler = %v, %v; want error %v", s, err, boom)
		}
	}
}

func TestSamplerCloseTwice(t *testing.T) {
	s, err := startSampler(&fakeSource{cpu: cpuTimes{total: 1}}, time.Millisecond, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	_ = s.Snapshot() // still readable after Close
}

func BenchmarkSamplerSnapshot(b *testing.B) {
	s, err := startSampler(&fakeSource{cpu: cpuTimes{busy: 1, total: 2}, mem: Memory{TotalBytes: 2}}, time.Millisecond, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	var sum float64
	for b.Loop() {
		snap := s.Snapshot()
		sum += snap.CPUPercent + snap.Memory.Percent()
	}
	if math.IsNaN(sum) {
		b.Fatal("NaN")
	}
}

func BenchmarkSamplerSnapshotParallel(b *testing.B) {
	s, err := startSampler(&fakeSource{cpu: cpuTimes{busy: 1, total: 2}, mem: Memory{TotalBytes: 2}}, time.Millisecond, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	b.RunParallel(func(pb *testing.PB) {
		var sum float64
		for pb.Next() {
			sum += s.Snapshot().CPUPercent
		}
		if math.IsNaN(sum) {
			b.Error("NaN")
		}
	})
}
