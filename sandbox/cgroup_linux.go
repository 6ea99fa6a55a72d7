package sandbox

import (
	"log/slog"
	"syscall"
	"time"

	"github.com/prometheus/procfs"
)

// resolvedLimits are an execution's limits with the config's defaults
// applied.
type resolvedLimits struct {
	memory        *int64
	cpuMillicores *int64
	pids          int64
}

// cgroupDriver makes one cgroup per execution in one cgroup version's
// layout, under this agent instance's own parent cgroup.
type cgroupDriver interface {
	version() string
	// create makes the execution's cgroup with its limits written; an
	// unwritable limit is an error and leaves nothing behind.
	create(name string, limits resolvedLimits) (execCgroup, error)
	// close removes the instance's parent cgroup.
	close() error
}

// execCgroup is one execution's cgroup.
type execCgroup interface {
	// enter runs on the thread that is about to fork, so the child is born
	// inside; leave undoes what enter did to the thread.
	enter(attr *syscall.SysProcAttr) (leave func() error, err error)
	signalAll(sig syscall.Signal) error
	// kill kills every process in the cgroup, none can fork meanwhile.
	kill() error
	waitEmpty(timeout time.Duration) error
	measure(res *Result)
	remove() error
}

// openCgroups finds a cgroup hierarchy this agent can write, or says why
// there is none.
func openCgroups(cfg Config, instance string, proc procfs.FS, log *slog.Logger) (cgroupDriver, string) {
	return nil, "cgroups are not implemented yet"
}
