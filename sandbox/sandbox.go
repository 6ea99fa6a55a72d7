// Package sandbox starts one function process and contains it: its own
// process group (Linux) or job object (Windows), on Linux a cgroup it is born
// into with memory, CPU and pids limits, an unprivileged user, and a kill
// that takes the whole tree at once.
package sandbox

import (
	"io"
	"time"
)

// Limits bound one execution. A nil field is "no limit", which is not the
// same as a limit of 0.
type Limits struct {
	MemoryBytes   *int64
	CPUMillicores *int64
	Pids          *int64
}

// Spec is everything needed to start one execution.
type Spec struct {
	// ID names the execution (and its cgroup); unique among running ones.
	ID string
	// Path is the absolute path of the executable.
	Path string
	// Args follow Path in argv.
	Args []string
	// Dir is the working directory.
	Dir string
	// Env is the complete environment; nothing is inherited from the agent.
	Env []string
	// Limits are applied before the first instruction of the function runs.
	Limits Limits
	// Timeout, when non-zero, ends the execution: SIGTERM to the whole tree,
	// then a kill after KillGrace.
	Timeout   time.Duration
	KillGrace time.Duration
	// Output receives stdout and stderr as one stream, in the order written.
	// It is written from a single goroutine, and never after Done is closed.
	Output io.Writer
}

// Result is how an execution ended.
type Result struct {
	// ExitCode is the process's exit status, or 128+N when signal N killed it.
	ExitCode int
	// Signal is the signal that killed the process, 0 if it exited.
	Signal int
	// OOMKilled is read from the cgroup's own counters, never guessed.
	OOMKilled bool
	TimedOut  bool
	Cancelled bool
	// PeakMemoryBytes and CPUTime are 0 when they could not be measured.
	PeakMemoryBytes uint64
	CPUTime         time.Duration
	StartedAt       time.Time
	WallTime        time.Duration
}
