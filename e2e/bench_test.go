package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// Benchmarks run the agent built without the race detector, as shipped.
//
//	go test -run '^$' -bench . -benchtime 200x ./e2e/
func benchAgent(b *testing.B, rs *redisServer, yaml string) *agent {
	b.Helper()
	return releaseAgent(b, rs, agentOptions{YAML: yaml})
}

func percentile(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[int(float64(len(s)-1)*p)]
}

// BenchmarkSyncNoop compares a sync no-op execution through the agent
// (gRPC, Redis records, sandbox) with a plain fork/exec of the same script.
func BenchmarkSyncNoop(b *testing.B) {
	rs := startRedis(b)
	a := benchAgent(b, rs, "")
	c := a.client(b)
	install(b, c, fn{Name: "noop", Script: "exit 0\n"})
	script := filepath.Join(b.TempDir(), "noop.sh")
	os.WriteFile(script, []byte("#!/bin/sh\nexit 0\n"), 0o755)

	agentTimes := make([]time.Duration, 0, b.N)
	execTimes := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		resp, err := c.ExecuteFunction(context.Background(), &fluxpb.ExecutionRequest{FunctionName: "noop", ExecutionId: newID()})
		if err != nil || resp.GetError() != "" {
			b.Fatal(resp, err)
		}
		agentTimes = append(agentTimes, time.Since(start))
		start = time.Now()
		if err := exec.Command(script).Run(); err != nil {
			b.Fatal(err)
		}
		execTimes = append(execTimes, time.Since(start))
	}
	b.StopTimer()
	b.ReportMetric(float64(percentile(agentTimes, 0.5).Microseconds()), "agent-p50-µs")
	b.ReportMetric(float64(percentile(agentTimes, 0.99).Microseconds()), "agent-p99-µs")
	b.ReportMetric(float64(percentile(execTimes, 0.5).Microseconds()), "forkexec-p50-µs")
	b.ReportMetric(float64(percentile(execTimes, 0.99).Microseconds()), "forkexec-p99-µs")
}

// BenchmarkAsyncOutput measures an async function that prints 2 MiB and
// 20 MiB: wall time to its final record, the agent's CPU time and the bytes
// Redis received.
func BenchmarkAsyncOutput(b *testing.B) {
	for _, mib := range []int{2, 20} {
		b.Run(fmt.Sprintf("%dMiB", mib), func(b *testing.B) {
			rs := startRedis(b)
			a := benchAgent(b, rs, "output_limit: 32MiB\n")
			c := a.client(b)
			// Lines of 64 bytes, written in many small writes as a chatty
			// function would.
			install(b, c, fn{Name: "chatty", Script: fmt.Sprintf(
				"yes 0123456789012345678901234567890123456789012345678901234567890 | head -c %d\n", mib<<20)})
			var wall, cpu time.Duration
			var redisBytes int64
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				cpu0, in0 := processCPU(b, a.cmd.Process.Pid), redisInputBytes(b, rs)
				start := time.Now()
				id := execAsync(b, c, "chatty")
				rec := waitRecord(b, c, id, 120*time.Second, "final", isFinal)
				wall += time.Since(start)
				if rec.Status != "success" || int64(len(rec.Output)) != int64(mib)<<20 {
					b.Fatalf("status %s, %d bytes of output", rec.Status, len(rec.Output))
				}
				cpu += processCPU(b, a.cmd.Process.Pid) - cpu0
				redisBytes += redisInputBytes(b, rs) - in0
			}
			b.StopTimer()
			b.ReportMetric(float64(wall.Milliseconds())/float64(b.N), "wall-ms/op")
			b.ReportMetric(float64(cpu.Milliseconds())/float64(b.N), "agent-cpu-ms/op")
			b.ReportMetric(float64(redisBytes)/float64(b.N)/(1<<20), "redis-MiB-in/op")
		})
	}
}

// BenchmarkLiveOutputLatency measures how long a printed line takes to be
// visible through GetExecution while the function still runs.
func BenchmarkLiveOutputLatency(b *testing.B) {
	rs := startRedis(b)
	a := benchAgent(b, rs, "")
	c := a.client(b)
	tr := newTrigger(b)
	defer tr.fire(b)
	install(b, c, fn{Name: "ticker", Script: "i=0\nwhile [ $i -lt 100000 ]; do date +%s%N; sleep 0.05; i=$((i+1)); done\n"})
	id := execAsync(b, c, "ticker")
	var lat []time.Duration
	seen := 0
	b.ResetTimer()
	for len(lat) < b.N {
		rec := getRecord(b, c, id)
		now := time.Now()
		lines := strings.Split(strings.TrimSpace(rec.Output), "\n")
		for _, l := range lines[min(seen, len(lines)):] {
			ns, err := strconv.ParseInt(l, 10, 64)
			if err != nil {
				continue
			}
			lat = append(lat, now.Sub(time.Unix(0, ns)))
		}
		seen = len(lines)
		time.Sleep(2 * time.Millisecond) // poll interval of this measurement
	}
	b.StopTimer()
	c.CancelExecution(context.Background(), &fluxpb.CancelExecutionRequest{ExecutionId: id})
	b.ReportMetric(float64(percentile(lat, 0.5).Milliseconds()), "p50-ms")
	b.ReportMetric(float64(percentile(lat, 0.99).Milliseconds()), "p99-ms")
	b.ReportMetric(float64(slices.Max(lat).Milliseconds()), "max-ms")
}

// processCPU is a process's user+system CPU time from /proc/<pid>/stat.
func processCPU(b *testing.B, pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	fields := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond // USER_HZ = 100
}

func redisInputBytes(b *testing.B, rs *redisServer) int64 {
	info, err := rs.Client.Info(context.Background(), "stats").Result()
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "total_net_input_bytes:"); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	b.Fatal("no total_net_input_bytes in INFO stats")
	return 0
}
