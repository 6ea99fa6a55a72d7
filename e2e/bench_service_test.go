package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// baselineBinaryEnv names another agent build that BenchmarkAgentCost
// measures in the same run, interleaved with this one (before/after).
const baselineBinaryEnv = "FLUX_E2E_BASELINE_BINARY"

// BenchmarkAgentCost measures what one no-op execution costs the agent as
// shipped: sync latency (with a bare fork/exec of the same script as the
// floor), how soon an async call returns, the agent's CPU, and the Redis
// commands and round trips (the server's read events) per execution. With
// FLUX_E2E_BASELINE_BINARY set, the other build runs the same calls,
// interleaved, each agent with a Redis of its own.
//
//	FLUX_E2E_BASELINE_BINARY=/path/to/old/flux-agent go test -run '^$' -bench AgentCost -benchtime 500x ./e2e/
func BenchmarkAgentCost(b *testing.B) {
	type subject struct {
		name   string
		rs     *redisServer
		a      *agent
		c      fluxpb.AgentServiceClient
		sync   []time.Duration
		async  []time.Duration
		cpu0   time.Duration
		stats0 map[string]int64
	}
	binaries := map[string]string{"this": ""}
	if path := os.Getenv(baselineBinaryEnv); path != "" {
		binaries["baseline"] = path
	}
	var subjects []*subject
	for _, name := range []string{"this", "baseline"} {
		path, ok := binaries[name]
		if !ok {
			continue
		}
		s := &subject{name: name, rs: startRedis(b)}
		b.Setenv(releaseBinaryEnv, path)
		s.a = releaseAgent(b, s.rs, agentOptions{})
		s.c = s.a.client(b)
		install(b, s.c, fn{Name: "noop", Script: "exit 0\n", Config: &fluxpb.FunctionConfig{MaxConcurrency: 100000}})
		subjects = append(subjects, s)
	}
	script := filepath.Join(b.TempDir(), "noop.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	run := func(s *subject, async bool) time.Duration {
		start := time.Now()
		resp, err := s.c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "noop", ExecutionId: newID(), Async: async})
		took := time.Since(start)
		if err != nil || resp.GetError() != "" {
			b.Fatalf("%s: %v %v", s.name, resp, err)
		}
		return took
	}
	for _, s := range subjects { // warm up: connections, code pages, pools
		for range 20 {
			run(s, false)
		}
		s.cpu0, s.stats0 = processCPU(b, s.a.cmd.Process.Pid), redisStats(b, s.rs)
	}
	var floor []time.Duration
	b.ResetTimer()
	for range b.N {
		for _, s := range subjects {
			s.sync = append(s.sync, run(s, false))
		}
		start := time.Now()
		if err := exec.Command(script).Run(); err != nil {
			b.Fatal(err)
		}
		floor = append(floor, time.Since(start))
	}
	idle := func(s *subject) {
		if !waitUntil(time.Minute, func() bool {
			st, err := s.c.ReportNodeStatus(ctx, &fluxpb.NodeStatusRequest{})
			return err == nil && st.GetActiveTasks() == 0
		}) {
			b.Fatalf("%s: async executions did not end", s.name)
		}
	}
	for range b.N {
		for _, s := range subjects { // one at a time: the return of an idle agent
			s.async = append(s.async, run(s, true))
			idle(s)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(percentile(floor, 0.5).Microseconds()), "forkexec-p50-µs")
	for _, s := range subjects {
		n := float64(2 * b.N)
		stats := redisStats(b, s.rs)
		// The INFO that read stats0 is counted in stats; ReportNodeStatus
		// does not touch Redis.
		commands := float64(stats["total_commands_processed"]-s.stats0["total_commands_processed"]-1) / n
		reads := float64(stats["total_reads_processed"]-s.stats0["total_reads_processed"]-1) / n
		cpu := processCPU(b, s.a.cmd.Process.Pid) - s.cpu0
		b.ReportMetric(float64(percentile(s.sync, 0.5).Microseconds()), s.name+"-sync-p50-µs")
		b.ReportMetric(float64(percentile(s.sync, 0.99).Microseconds()), s.name+"-sync-p99-µs")
		b.ReportMetric(float64(percentile(s.async, 0.5).Microseconds()), s.name+"-async-return-p50-µs")
		b.ReportMetric(float64(cpu.Microseconds())/n, s.name+"-agent-cpu-µs/exec")
		b.ReportMetric(commands, s.name+"-redis-cmds/exec")
		b.ReportMetric(reads, s.name+"-redis-trips/exec")
	}
}

// redisStats reads the counters of INFO stats.
func redisStats(b *testing.B, rs *redisServer) map[string]int64 {
	info, err := rs.Client.Info(context.Background(), "stats").Result()
	if err != nil {
		b.Fatal(err)
	}
	stats := map[string]int64{}
	for _, line := range strings.Split(info, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ":"); ok {
			if n, err := strconv.ParseInt(v, 10, 64); err == nil {
				stats[k] = n
			}
		}
	}
	return stats
}
