package nodeinfo

import (
	"fmt"
	"path/filepath"

	"github.com/prometheus/procfs"
)

// procStats reads /proc/stat and /proc/meminfo under one proc root.
type procStats struct {
	fs   procfs.FS
	root string
}

func openStatSource(procRoot string) (statSource, error) {
	fs, err := procfs.NewFS(procRoot)
	if err != nil {
		return nil, fmt.Errorf("open proc filesystem %s: %w", procRoot, err)
	}
	return procStats{fs: fs, root: procRoot}, nil
}

func (p procStats) cpuTimes() (cpuTimes, error) {
	stat, err := p.fs.Stat()
	if err != nil {
		return cpuTimes{}, fmt.Errorf("read %s: %w", filepath.Join(p.root, "stat"), err)
	}
	times, err := cpuTimesFromStat(stat.CPUTotal)
	if err != nil {
		return cpuTimes{}, fmt.Errorf("read %s: %w", filepath.Join(p.root, "stat"), err)
	}
	return times, nil
}

func (p procStats) memory() (Memory, error) {
	info, err := p.fs.Meminfo()
	if err != nil {
		return Memory{}, fmt.Errorf("read %s: %w", filepath.Join(p.root, "meminfo"), err)
	}
	mem, err := memoryFromMeminfo(info)
	if err != nil {
		return Memory{}, fmt.Errorf("read %s: %w", filepath.Join(p.root, "meminfo"), err)
	}
	return mem, nil
}

// cpuTimesFromStat sums the aggregate "cpu" line of /proc/stat the way top
// does: iowait counts as idle, steal as busy (the node could not run), and
// guest time is left out because the kernel already counts it in user time.
func cpuTimesFromStat(s procfs.CPUStat) (cpuTimes, error) {
	busy := s.User + s.Nice + s.System + s.IRQ + s.SoftIRQ + s.Steal
	total := busy + s.Idle + s.Iowait
	if total <= 0 {
		return cpuTimes{}, fmt.Errorf("aggregate cpu line absent or all zero: %w", ErrMissingField)
	}
	return cpuTimes{busy: busy, total: total}, nil
}

// memoryFromMeminfo needs MemAvailable: MemFree alone would count the page
// cache as used and make every long-running node look full.
func memoryFromMeminfo(info procfs.Meminfo) (Memory, error) {
	if info.MemTotalBytes == nil {
		return Memory{}, fmt.Errorf("MemTotal: %w", ErrMissingField)
	}
	if info.MemAvailableBytes == nil {
		return Memory{}, fmt.Errorf("MemAvailable (Linux 3.14 or later): %w", ErrMissingField)
	}
	return memoryFromTotals(*info.MemTotalBytes, *info.MemAvailableBytes)
}
