package service

import (
	"context"
	"fmt"

	"github.com/serverless-fabric/flux-agent/deployments"
	"github.com/serverless-fabric/flux-agent/sandbox"
)

// Sandbox starts function processes: the service's view of
// *sandbox.Sandbox, small enough for a test to fake.
type Sandbox interface {
	// Start creates the process held: stopped before the function's first
	// instruction until Process.Resume. ctx covers the start only.
	Start(ctx context.Context, spec sandbox.Spec) (Process, error)
}

// Process is one started execution.
type Process interface {
	Pid() int
	// Done is closed once the process tree is gone and its output drained.
	Done() <-chan struct{}
	// Result is how it ended; valid once Done is closed.
	Result() sandbox.Result
	// Cancel kills the tree; a held process dies without running a single
	// instruction of the function. Idempotent.
	Cancel()
	// Resume lets a held process run.
	Resume() error
	// Usage reads what the execution has used so far; once it is over,
	// an error wrapping sandbox.ErrExecutionOver.
	Usage() (sandbox.Usage, error)
}

// CodeStore pins deployed code for executions: the service's view of
// *deployments.Store.
type CodeStore interface {
	// Checkout pins the current version of function's code and resolves
	// its handler inside it.
	Checkout(function, handler string) (Code, error)
}

// Code is one pinned version of a function's code.
type Code struct {
	// Dir is the version's directory, the execution's working directory.
	Dir string
	// Version names the version, for the record.
	Version string
	// Path is the handler's absolute path.
	Path string
	// Release unpins the version; it may then be removed.
	Release func()
}

// nativeSandbox adapts *sandbox.Sandbox to Sandbox: every process starts
// held, so a duplicate id never runs an instruction of the function.
type nativeSandbox struct{ sb *sandbox.Sandbox }

func (n nativeSandbox) Start(ctx context.Context, spec sandbox.Spec) (Process, error) {
	spec.Hold = true
	p, err := n.sb.Start(ctx, spec)
	if err != nil {
		return nil, err
	}
	return p, nil
}

// deployedCode adapts *deployments.Store to CodeStore.
type deployedCode struct{ store *deployments.Store }

func (d deployedCode) Checkout(function, handler string) (Code, error) {
	lease, err := d.store.Acquire(function)
	if err != nil {
		return Code{}, fmt.Errorf("function %s has no deployed code: %w", function, err)
	}
	path, err := lease.Handler(handler)
	if err != nil {
		lease.Release()
		return Code{}, fmt.Errorf("handler: %w", err)
	}
	return Code{Dir: lease.Dir, Version: lease.Version, Path: path, Release: lease.Release}, nil
}
