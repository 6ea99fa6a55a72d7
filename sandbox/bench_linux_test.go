package sandbox

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// BenchmarkNoopExecution is the cost of one execution of a no-op script
// from Start to Done, per containment, against a plain fork/exec, with the
// context switches of this process's threads per execution (each a
// thread that slept and was woken: the main cost of handoffs on a VM).
//
//	go test -run '^$' -bench NoopExecution ./sandbox/
func BenchmarkNoopExecution(b *testing.B) {
	script := filepath.Join(b.TempDir(), "noop.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		b.Fatal(err)
	}
	b.Run("plain-exec", func(b *testing.B) {
		s0 := selfContextSwitches()
		for b.Loop() {
			if err := exec.Command(script).Run(); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(selfContextSwitches()-s0)/float64(b.N), "switches/op")
	})
	for _, tc := range []struct {
		name string
		cfg  Config
		hold bool
	}{
		{"process-group", Config{noCgroups: true}, false},
		{"cgroup", Config{}, false},
		{"cgroup-held", Config{}, true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			s, err := New(testConfig(b, tc.cfg))
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			if tc.name != "process-group" && s.Isolation().Cgroup == "none" {
				b.Skip("no writable cgroup")
			}
			s0 := selfContextSwitches()
			for b.Loop() {
				p, err := s.Start(context.Background(), Spec{ID: "bench", Path: script, Dir: "/", Hold: tc.hold})
				if err != nil {
					b.Fatal(err)
				}
				if err := p.Resume(); err != nil {
					b.Fatal(err)
				}
				<-p.Done()
				if r := p.Result(); r.ExitCode != 0 {
					b.Fatalf("exit %d", r.ExitCode)
				}
			}
			b.ReportMetric(float64(selfContextSwitches()-s0)/float64(b.N), "switches/op")
		})
	}
}

// selfContextSwitches sums the context switches of this process's threads.
func selfContextSwitches() int64 {
	tasks, _ := filepath.Glob("/proc/self/task/*/status")
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
