package sandbox

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// landlockScopeABI is the first Landlock ABI with scopes (Linux 6.12).
const landlockScopeABI = 6

// scopeThread confines the calling thread, and every process it forks, to
// a Landlock domain of its own that scopes abstract Unix sockets and
// signals: a function can then neither connect to an abstract socket made
// outside its slot (the node's daemons, another slot's functions, which
// share the node's network namespace in filtered mode) nor signal a
// process outside it. It returns false on kernels without scopes, where it
// changes nothing. The thread must have no_new_privs.
func scopeThread() (bool, error) {
	abi, _, errno := unix.Syscall(unix.SYS_LANDLOCK_CREATE_RULESET, 0, 0, unix.LANDLOCK_CREATE_RULESET_VERSION)
	if errno != 0 || abi < landlockScopeABI {
		return false, nil // no Landlock, or one without scopes
	}
	attr := unix.LandlockRulesetAttr{Scoped: unix.LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | unix.LANDLOCK_SCOPE_SIGNAL}
	// The attribute as ABI 6 knows it: the fields up to Scoped.
	size := unsafe.Offsetof(attr.Scoped) + unsafe.Sizeof(attr.Scoped)
	fd, _, errno := unix.Syscall(unix.SYS_LANDLOCK_CREATE_RULESET, uintptr(unsafe.Pointer(&attr)), size, 0)
	if errno != 0 {
		return false, fmt.Errorf("landlock ruleset: %w", errno)
	}
	defer unix.Close(int(fd))
	if _, _, errno := unix.Syscall(unix.SYS_LANDLOCK_RESTRICT_SELF, fd, 0, 0); errno != 0 {
		return false, fmt.Errorf("landlock: %w", errno)
	}
	return true, nil
}
