//go:build linux

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// BenchmarkStartLatency measures the start path against the floor it
// competes with, a bare fork/exec of the same script, in one run: sync
// no-op latency (p50, p99), throughput with 8 concurrent callers against a
// fork/exec loop with 8 workers, the agent's CPU per execution, the CPU the
// execution's own processes spend beyond the function, how soon an async
// call returns, and the Redis round trips per execution. The agent is the
// release build with the default isolation (its own uid, cgroup with
// limits, network policy, private tmp).
//
//	go test -run '^$' -bench StartLatency -benchtime 2000x ./e2e/
//
// With FLUX_E2E_AGENT_ADDR (and FLUX_E2E_AGENT_PID, FLUX_E2E_REDIS_ADDR) it
// measures an agent that runs already instead of starting one: the .deb's
// VM runs it against the agent systemd runs on cgroup v2.
func BenchmarkStartLatency(b *testing.B) {
	target := benchTarget(b)
	c, pid, rs := target.client, target.pid, target.redis
	install(b, c, fn{Name: "noop", Script: "exit 0\n", Config: &fluxpb.FunctionConfig{MaxConcurrency: 1 << 20}})
	script := filepath.Join(b.TempDir(), "noop.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	sync1 := func(async bool) time.Duration {
		start := time.Now()
		resp, err := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "noop", ExecutionId: newID(), Async: async})
		took := time.Since(start)
		if err != nil || resp.GetError() != "" {
			b.Fatalf("execute: %v %v", resp, err)
		}
		return took
	}
	forkExec := func() time.Duration {
		start := time.Now()
		if err := exec.Command(script).Run(); err != nil {
			b.Fatal(err)
		}
		return time.Since(start)
	}
	for range 50 { // warm: connections, code pages, the slot pool
		sync1(false)
		forkExec()
	}

	// Latency, interleaved so that noise hits both alike.
	cpu0, children0, switches0 := processCPU(b, pid), childrenCPU(b, pid), contextSwitches(pid)
	stats0 := redisStats(b, rs)
	var agentTimes, floorTimes []time.Duration
	var floorChildren time.Duration
	b.ResetTimer()
	for range b.N {
		agentTimes = append(agentTimes, sync1(false))
		before := ownChildrenCPU()
		floorTimes = append(floorTimes, forkExec())
		floorChildren += ownChildrenCPU() - before
	}
	b.StopTimer()
	n := float64(b.N)
	agentCPU := processCPU(b, pid) - cpu0
	switches := float64(contextSwitches(pid)-switches0) / n
	execCPU := childrenCPU(b, pid) - children0
	stats := redisStats(b, rs)
	trips := float64(stats["total_reads_processed"]-stats0["total_reads_processed"]-1) / n

	// Throughput: the same number of executions by 8 callers, then by a
	// fork/exec loop with 8 workers.
	const workers = 8
	total := max(b.N, 100)
	parallel := func(work func()) float64 {
		var wg sync.WaitGroup
		start := time.Now()
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < total; i += workers {
					work()
				}
			}()
		}
		wg.Wait()
		return float64(total) / time.Since(start).Seconds()
	}
	agentRate := parallel(func() { sync1(false) })
	floorRate := parallel(func() { forkExec() })

	// Async: how soon the call returns on an idle agent.
	var asyncTimes []time.Duration
	for range min(b.N, 300) {
		asyncTimes = append(asyncTimes, sync1(true))
		if !waitUntil(time.Minute, func() bool {
			st, err := c.ReportNodeStatus(ctx, &fluxpb.NodeStatusRequest{})
			return err == nil && st.GetActiveTasks() == 0
		}) {
			b.Fatal("async executions did not end")
		}
	}

	p50, p99 := percentile(agentTimes, 0.5), percentile(agentTimes, 0.99)
	f50, f99 := percentile(floorTimes, 0.5), percentile(floorTimes, 0.99)
	b.ReportMetric(float64(p50.Microseconds()), "sync-p50-µs")
	b.ReportMetric(float64(p99.Microseconds()), "sync-p99-µs")
	b.ReportMetric(float64(f50.Microseconds()), "forkexec-p50-µs")
	b.ReportMetric(float64(f99.Microseconds()), "forkexec-p99-µs")
	b.ReportMetric(float64(p50)/float64(f50), "p50-ratio")
	b.ReportMetric(float64(p99)/float64(f99), "p99-ratio")
	b.ReportMetric(agentRate, "agent-exec/s")
	b.ReportMetric(floorRate, "forkexec-exec/s")
	b.ReportMetric(agentRate/floorRate, "throughput-ratio")
	b.ReportMetric(float64(agentCPU.Microseconds())/n, "agent-cpu-µs/exec")
	b.ReportMetric(float64(execCPU.Microseconds())/n, "exec-cpu-µs/exec")
	b.ReportMetric(float64(floorChildren.Microseconds())/n, "forkexec-cpu-µs/exec")
	b.ReportMetric(float64(percentile(asyncTimes, 0.5).Microseconds()), "async-return-p50-µs")
	b.ReportMetric(trips, "redis-trips/exec")
	b.ReportMetric(switches, "agent-context-switches/exec")
	b.Logf("%s", fmt.Sprintf("sync p50 %v (%.2fx the fork/exec floor's %v), p99 %v (%.2fx %v); %0.f exec/s with %d callers against %0.f (%.2fx); agent CPU %v/exec, %.1f context switches/exec; the execution's processes %v/exec against %v for a bare fork/exec; async returns in %v (p50); %.1f Redis round trips/exec",
		p50, float64(p50)/float64(f50), f50, p99, float64(p99)/float64(f99), f99, agentRate, workers, floorRate, agentRate/floorRate,
		agentCPU/time.Duration(b.N), switches, execCPU/time.Duration(b.N), floorChildren/time.Duration(b.N), percentile(asyncTimes, 0.5), trips))
}

// startTarget is the agent a benchmark measures.
type startTarget struct {
	client fluxpb.AgentServiceClient
	pid    int
	redis  *redisServer
}

// benchTarget starts the release build against a Redis of its own, or
// takes the running agent FLUX_E2E_AGENT_ADDR names.
func benchTarget(b *testing.B) startTarget {
	addr := os.Getenv(externalAgentEnv)
	if addr == "" {
		rs := startRedis(b)
		a := releaseAgent(b, rs, agentOptions{Env: strings.Fields(os.Getenv("FLUX_E2E_AGENT_ENV"))})
		return startTarget{client: a.client(b), pid: a.cmd.Process.Pid, redis: rs}
	}
	pid, err := strconv.Atoi(os.Getenv("FLUX_E2E_AGENT_PID"))
	if err != nil {
		b.Fatalf("FLUX_E2E_AGENT_PID: %v", err)
	}
	rdb := redis.NewClient(&redis.Options{Addr: os.Getenv("FLUX_E2E_REDIS_ADDR")})
	b.Cleanup(func() { rdb.Close() })
	a := &agent{Addr: addr}
	return startTarget{client: fluxpb.NewAgentServiceClient(a.dial(b, insecureCreds())), pid: pid, redis: &redisServer{Client: rdb}}
}

// childrenCPU is the CPU time of a process's reaped children (cutime and
// cstime of /proc/<pid>/stat): the functions an agent ran.
func childrenCPU(b *testing.B, pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	fields := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	cu, _ := strconv.ParseInt(fields[13], 10, 64)
	cs, _ := strconv.ParseInt(fields[14], 10, 64)
	return time.Duration(cu+cs) * 10 * time.Millisecond // USER_HZ = 100
}

// contextSwitches sums the voluntary and involuntary context switches of
// every thread of a process: each is a thread that slept and was woken,
// the main cost of a start's handoffs on a virtual machine.
func contextSwitches(pid int) int64 {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	var n int64
	for _, t := range tasks {
		data, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.HasSuffix(k, "ctxt_switches") {
				c, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				n += c
			}
		}
	}
	return n
}

// ownChildrenCPU is the CPU of this process's reaped children.
func ownChildrenCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_CHILDREN, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
