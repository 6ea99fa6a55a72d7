//go:build !linux && !windows

package sandbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
)

// The agent contains functions on Linux and Windows only; elsewhere New
// fails, so the package still builds for tools that import it.

var scratchEnvKeys = []string{"TMPDIR"}

func envKeyEqual(a, b string) bool { return a == b }

type host struct{}

func newHost(Config) (*host, error) {
	return nil, fmt.Errorf("no containment on %s: %w", runtime.GOOS, errors.ErrUnsupported)
}

func (h *host) start(context.Context, Spec, func()) (*box, error) {
	return nil, errors.ErrUnsupported
}
func (h *host) isolation() Isolation { return Isolation{Cgroup: "none"} }
func (h *host) close() error         { return nil }

type box struct{}

func (b *box) pid() int              { return 0 }
func (b *box) resume() error         { return errors.ErrUnsupported }
func (b *box) terminate() error      { return errors.ErrUnsupported }
func (b *box) kill() error           { return errors.ErrUnsupported }
func (b *box) done() <-chan struct{} { return nil }
func (b *box) result() Result        { return Result{} }
func (b *box) usage() (Usage, error) { return Usage{}, errors.ErrUnsupported }
func (b *box) logger() *slog.Logger  { return slog.New(slog.DiscardHandler) }
