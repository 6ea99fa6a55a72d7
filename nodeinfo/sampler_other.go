//go:build !linux && !windows

package nodeinfo

import (
	"errors"
	"fmt"
	"runtime"
)

// openStatSource has nothing to read on platforms the agent does not ship
// for; it says so instead of failing to build, so the rest of the agent can
// be developed there.
func openStatSource(string) (statSource, error) {
	return nil, fmt.Errorf("node statistics on %s: %w", runtime.GOOS, errors.ErrUnsupported)
}
