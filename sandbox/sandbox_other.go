//go:build !linux && !windows

package sandbox

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"time"
)

// The agent contains functions on Linux and Windows only; elsewhere New
// fails, so the package still builds for tools that import it.

var scratchEnvKeys = []string{"TMPDIR"}

func envKeyEqual(a, b string) bool { return a == b }

type host struct{}

func newHost(Config, string) (*host, Isolation, error) {
	return nil, Isolation{}, fmt.Errorf("no containment on %s: %w", runtime.GOOS, errors.ErrUnsupported)
}

func (h *host) close() error                    { return nil }
func (h *host) acquireUID() (uint32, error)     { return 0, nil }
func (h *host) releaseUID(uint32)               {}
func (h *host) ownScratch(string, uint32) error { return nil }
func (h *host) start(*exec.Cmd, string, Limits, uint32) (*box, error) {
	return nil, errors.ErrUnsupported
}

type box struct{}

func (b *box) terminate() error                         { return errors.ErrUnsupported }
func (b *box) kill() error                              { return errors.ErrUnsupported }
func (b *box) waitEmpty(time.Duration) error            { return nil }
func (b *box) limited() bool                            { return false }
func (b *box) measure(*Result, *os.ProcessState)        {}
func (b *box) remove() error                            { return nil }
func waitExited(*os.Process) error                      { return errors.ErrUnsupported }
func exitStatus(state *os.ProcessState) (code, sig int) { return state.ExitCode(), 0 }
func processIdentity() (string, error)                  { return strconv.Itoa(os.Getpid()), nil }
func processAlive(string) bool                          { return true }
