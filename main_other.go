//go:build !windows

package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

// runUntilStopped runs the agent until SIGINT or SIGTERM. After the first
// signal the default action is back: a second one ends the agent at once,
// without the graceful shutdown.
func runUntilStopped(run func(context.Context) int) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	context.AfterFunc(ctx, stop)
	return run(ctx)
}
