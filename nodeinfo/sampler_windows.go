package nodeinfo

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/windows"
)

// x/sys/windows does not wrap these two, so they are loaded from kernel32
// (always present) on first use.
var (
	kernel32                 = windows.NewLazySystemDLL("kernel32.dll")
	procGetSystemTimes       = kernel32.NewProc("GetSystemTimes")
	procGlobalMemoryStatusEx = kernel32.NewProc("GlobalMemoryStatusEx")
)

// memoryStatusEx is the Win32 MEMORYSTATUSEX structure.
type memoryStatusEx struct {
	length               uint32
	memoryLoad           uint32
	totalPhys            uint64
	availPhys            uint64
	totalPageFile        uint64
	availPageFile        uint64
	totalVirtual         uint64
	availVirtual         uint64
	availExtendedVirtual uint64
}

// kernelStats asks the Windows kernel; there is no file to read, so it holds
// nothing.
type kernelStats struct{}

// openStatSource ignores procRoot: Windows has no procfs.
func openStatSource(string) (statSource, error) {
	if err := procGetSystemTimes.Find(); err != nil {
		return nil, fmt.Errorf("load GetSystemTimes: %w", err)
	}
	if err := procGlobalMemoryStatusEx.Find(); err != nil {
		return nil, fmt.Errorf("load GlobalMemoryStatusEx: %w", err)
	}
	return kernelStats{}, nil
}

func (kernelStats) cpuTimes() (cpuTimes, error) {
	var idle, kernel, user windows.Filetime
	ok, _, err := procGetSystemTimes.Call(
		uintptr(unsafe.Pointer(&idle)),
		uintptr(unsafe.Pointer(&kernel)),
		uintptr(unsafe.Pointer(&user)),
	)
	if ok == 0 {
		return cpuTimes{}, fmt.Errorf("GetSystemTimes: %w", err)
	}
	return cpuTimesFromSystemTimes(idle, kernel, user)
}

func (kernelStats) memory() (Memory, error) {
	status := memoryStatusEx{length: uint32(unsafe.Sizeof(memoryStatusEx{}))}
	ok, _, err := procGlobalMemoryStatusEx.Call(uintptr(unsafe.Pointer(&status)))
	if ok == 0 {
		return Memory{}, fmt.Errorf("GlobalMemoryStatusEx: %w", err)
	}
	return memoryFromTotals(status.totalPhys, status.availPhys)
}

// cpuTimesFromSystemTimes converts GetSystemTimes' figures; kernel time
// includes idle time, so busy is kernel plus user minus idle.
func cpuTimesFromSystemTimes(idle, kernel, user windows.Filetime) (cpuTimes, error) {
	total := filetimeSeconds(kernel) + filetimeSeconds(user)
	if total <= 0 {
		return cpuTimes{}, fmt.Errorf("GetSystemTimes reported no CPU time: %w", ErrImplausible)
	}
	return cpuTimes{busy: total - filetimeSeconds(idle), total: total}, nil
}

// filetimeSeconds reads a FILETIME as a duration (100 ns ticks), not as a
// date: windows.Filetime.Nanoseconds would subtract the 1601 epoch.
func filetimeSeconds(ft windows.Filetime) float64 {
	ticks := uint64(ft.HighDateTime)<<32 | uint64(ft.LowDateTime)
	return float64(ticks) / 1e7
}
