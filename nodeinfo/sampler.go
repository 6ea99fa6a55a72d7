package nodeinfo

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultSampleInterval is how often a Sampler refreshes its figures: often
// enough for Flux's autoscaler, rare enough to cost nothing measurable.
const DefaultSampleInterval = time.Second

// firstDeltaDelay is how soon after start the second CPU sample is taken, so
// that the first figure reflecting current load exists within the first
// second whatever the interval.
const firstDeltaDelay = 200 * time.Millisecond

var (
	// ErrMissingField reports that a statistics source lacks a figure the
	// agent needs, e.g. MemAvailable on Linux kernels before 3.14.
	ErrMissingField = errors.New("missing field")
	// ErrImplausible reports figures no running machine can have, e.g. more
	// memory available than installed or no CPU time at all.
	ErrImplausible = errors.New("implausible value")
)

// Memory is the node's physical memory as Flux's autoscaler sees it: used is
// total minus what the kernel says is available to new work without swapping,
// so page cache does not count as used.
type Memory struct {
	TotalBytes uint64
	UsedBytes  uint64
}

// Percent is the used share of total memory, 0..100; 0 when total is unknown.
func (m Memory) Percent() float64 {
	if m.TotalBytes == 0 {
		return 0
	}
	return float64(m.UsedBytes) / float64(m.TotalBytes) * 100
}

// memoryFromTotals checks the two figures every platform reports and derives
// used memory from them.
func memoryFromTotals(totalBytes, availableBytes uint64) (Memory, error) {
	if totalBytes == 0 {
		return Memory{}, fmt.Errorf("total memory is 0: %w", ErrImplausible)
	}
	if availableBytes > totalBytes {
		return Memory{}, fmt.Errorf("available memory %d B exceeds total %d B: %w", availableBytes, totalBytes, ErrImplausible)
	}
	return Memory{TotalBytes: totalBytes, UsedBytes: totalBytes - availableBytes}, nil
}

// cpuTimes is the node's cumulative CPU time, summed over all CPUs, in
// seconds: busy is the part spent doing work, total includes idle time.
type cpuTimes struct {
	busy  float64
	total float64
}

// busyPercent is the busy share of all CPU time between two readings, 0..100.
// ok is false when no time passed or a counter went backwards (a CPU was
// unplugged, a counter wrapped): there is then no figure to give.
func busyPercent(prev, cur cpuTimes) (percent float64, ok bool) {
	busy := cur.busy - prev.busy
	total := cur.total - prev.total
	if total <= 0 || busy < 0 || busy > total {
		return 0, false
	}
	return busy / total * 100, true
}

// sinceBootPercent is the busy share of all CPU time since boot: a sane
// figure to answer with before a second reading exists.
func sinceBootPercent(t cpuTimes) float64 {
	percent, _ := busyPercent(cpuTimes{}, t)
	return percent
}

// statSource reads the node's raw figures; each platform file provides one
// through openStatSource.
type statSource interface {
	cpuTimes() (cpuTimes, error)
	memory() (Memory, error)
}

// Snapshot is the node's load as of the last background sample.
type Snapshot struct {
	// CPUPercent is the busy share of all CPUs over the last interval, 0..100.
	CPUPercent float64
	Memory     Memory
	// SampledAt is when the figures were last refreshed.
	SampledAt time.Time
}

// Sampler keeps the node's CPU and memory figures fresh in a background
// goroutine, so reading them is an atomic load instead of file I/O on the RPC
// path. Close stops the goroutine.
type Sampler struct {
	source   statSource
	interval time.Duration
	logger   *slog.Logger

	latest atomic.Pointer[Snapshot]

	cancel    context.CancelFunc
	done      chan struct{}
	closeOnce sync.Once
}

// NewSampler reads the node's figures once, so errors such as a missing
// /proc surface at start-up, and then keeps them fresh every interval
// (DefaultSampleInterval when interval is 0 or less). procRoot is where
// procfs is mounted ("/proc"); platforms without one ignore it.
//
// Until a second CPU reading exists, CPUPercent is the average since boot;
// the second reading is taken after at most 200 ms.
func NewSampler(procRoot string, interval time.Duration, logger *slog.Logger) (*Sampler, error) {
	source, err := openStatSource(procRoot)
	if err != nil {
		return nil, err
	}
	return startSampler(source, interval, logger)
}

func startSampler(source statSource, interval time.Duration, logger *slog.Logger) (*Sampler, error) {
	if interval <= 0 {
		interval = DefaultSampleInterval
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	cpu, err := source.cpuTimes()
	if err != nil {
		return nil, err
	}
	mem, err := source.memory()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Sampler{
		source:   source,
		interval: interval,
		logger:   logger,
		cancel:   cancel,
		done:     make(chan struct{}),
	}
	s.latest.Store(&Snapshot{CPUPercent: sinceBootPercent(cpu), Memory: mem, SampledAt: time.Now()})
	go s.run(ctx, cpu)
	return s, nil
}

// Snapshot returns the figures of the last sample; it never blocks.
func (s *Sampler) Snapshot() Snapshot {
	return *s.latest.Load()
}

// CPUPercent is Snapshot().CPUPercent.
func (s *Sampler) CPUPercent() float64 {
	return s.latest.Load().CPUPercent
}

// Memory is Snapshot().Memory.
func (s *Sampler) Memory() Memory {
	return s.latest.Load().Memory
}

// Close stops the background sampling and waits for it to end. The last
// figures stay readable. Closing twice is harmless.
func (s *Sampler) Close() error {
	s.closeOnce.Do(s.cancel)
	<-s.done
	return nil
}

func (s *Sampler) run(ctx context.Context, prev cpuTimes) {
	defer close(s.done)
	timer := time.NewTimer(min(firstDeltaDelay, s.interval))
	defer timer.Stop()
	var cpuFailing, memFailing bool
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		next := *s.latest.Load()
		next.SampledAt = time.Now()

		cur, err := s.source.cpuTimes()
		cpuFailing = s.noteFailure("cpu", err, cpuFailing)
		if err == nil {
			if percent, ok := busyPercent(prev, cur); ok {
				next.CPUPercent = percent
			}
			prev = cur
		}
		mem, err := s.source.memory()
		memFailing = s.noteFailure("memory", err, memFailing)
		if err == nil {
			next.Memory = mem
		}
		s.latest.Store(&next)
		timer.Reset(s.interval)
	}
}

// noteFailure logs when reading a figure starts or stops failing, not on
// every interval, and returns whether it is failing now. While it fails, the
// last good figure is kept.
func (s *Sampler) noteFailure(figure string, err error, wasFailing bool) bool {
	switch {
	case err != nil && !wasFailing:
		s.logger.Warn("node statistics unreadable; keeping the last good figure", "figure", figure, "err", err)
	case err == nil && wasFailing:
		s.logger.Info("node statistics readable again", "figure", figure)
	}
	return err != nil
}

// readMemory reads the node's memory figures once, for callers that do not
// keep a Sampler. procRoot is as for NewSampler.
func readMemory(procRoot string) (Memory, error) {
	source, err := openStatSource(procRoot)
	if err != nil {
		return Memory{}, err
	}
	return source.memory()
}
