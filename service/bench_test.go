//go:build !windows

// The lifecycle tests run a real redis-server and stop it with SIGSTOP:
// they are built where both exist.

package service

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// cpuTime is the CPU this process has used, user and system.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkExecution is the service's own cost of one no-op execution:
// a real Redis, a fake sandbox (whose process exits at once), no tracing
// exporter. cpu-µs/op is this process's CPU (the service, the Redis
// client, the fake) per execution; the Redis round trips are in ns/op.
//
//	go test -run '^$' -bench Execution -benchmem ./service/
func BenchmarkExecution(b *testing.B) {
	for _, async := range []bool{false, true} {
		b.Run(fmt.Sprintf("async=%v", async), func(b *testing.B) {
			h := newHarness(b, nil)
			h.register(b, &fluxpb.FunctionConfig{Name: "noop"}, exits(0, ""))
			h.execute(b, "noop", "exc-warm-up", async)
			waitFor(5*time.Second, func() bool { return h.svc.ActiveTasks() == 0 })
			ctx := context.Background()
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := cpuTime(b)
			for i := 0; i < b.N; i++ {
				resp, err := h.svc.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{
					FunctionName: "noop", ExecutionId: fmt.Sprintf("exc-%d", i), Async: async})
				if err != nil || resp.GetError() != "" {
					b.Fatal(resp, err)
				}
			}
			if !waitFor(time.Minute, func() bool { return h.svc.ActiveTasks() == 0 }) {
				b.Fatal("executions did not end")
			}
			b.StopTimer()
			b.ReportMetric(float64((cpuTime(b)-cpu0).Microseconds())/float64(b.N), "cpu-µs/op")
		})
	}
}
