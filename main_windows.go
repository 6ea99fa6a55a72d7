package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/windows/svc"
)

// serviceStopHint is what the service manager is told a stop may take: the
// default shutdown grace and the final writes.
const serviceStopHint = stopTimeout

// runUntilStopped runs the agent as a Windows service when the service
// manager started it (stop and shutdown requests end it gracefully), and
// otherwise in a console until Ctrl-C.
func runUntilStopped(run func(context.Context) int) int {
	isService, err := svc.IsWindowsService()
	if err != nil || !isService {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		context.AfterFunc(ctx, stop)
		return run(ctx)
	}
	h := &serviceHandler{run: run}
	if err := svc.Run("flux-agent", h); err != nil {
		return 1
	}
	return h.code
}

// serviceHandler runs the agent for the Windows service manager.
type serviceHandler struct {
	run  func(context.Context) int
	code int
}

// Execute implements svc.Handler.
func (h *serviceHandler) Execute(_ []string, requests <-chan svc.ChangeRequest, status chan<- svc.Status) (bool, uint32) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan int, 1)
	go func() { done <- h.run(ctx) }()
	status <- svc.Status{State: svc.Running, Accepts: svc.AcceptStop | svc.AcceptShutdown}
	for {
		select {
		case h.code = <-done:
			status <- svc.Status{State: svc.StopPending}
			return false, uint32(h.code)
		case r := <-requests:
			switch r.Cmd {
			case svc.Interrogate:
				status <- r.CurrentStatus
			case svc.Stop, svc.Shutdown:
				status <- svc.Status{State: svc.StopPending, WaitHint: uint32(serviceStopHint / time.Millisecond)}
				cancel()
			}
		}
	}
}
