//go:build linux

package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// idleFlood is how many connections the flood test holds open, as an
// attacker on the node (the metrics port listens on loopback) would.
const idleFlood = 5000

// raiseFileLimit lets the test itself hold n more descriptors.
func raiseFileLimit(t *testing.T, n uint64) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur >= n {
		return
	}
	saved := lim
	lim.Cur = min(n, lim.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur < n {
		t.Skipf("cannot raise RLIMIT_NOFILE to %d (hard limit %d): %v", n, lim.Max, err)
	}
	t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &saved) })
}

// processFigures are what a flood could exhaust in the agent.
type processFigures struct {
	fds, threads int
	rssKiB       int64
	goroutines   float64
}

func (f processFigures) String() string {
	return fmt.Sprintf("%d fds, %d threads, %d goroutines, RSS %d KiB", f.fds, f.threads, int(f.goroutines), f.rssKiB)
}

func figures(t *testing.T, a *agent) processFigures {
	t.Helper()
	pid := a.cmd.Process.Pid
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	// The sandbox keeps its slots' cgroup files open, and the pool grows
	// with the concurrency it saw: those are the sandbox's, not what a
	// flood of connections holds.
	n := 0
	for _, fd := range fds {
		target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if !strings.HasPrefix(target, "/sys/fs/cgroup/") {
			n++
		}
	}
	f := processFigures{fds: n, goroutines: metricsSample(t, a)["go_goroutines"]}
	for _, line := range strings.Split(string(status), "\n") {
		key, value, _ := strings.Cut(line, ":")
		fields := strings.Fields(value)
		if len(fields) == 0 {
			continue
		}
		switch key {
		case "VmRSS":
			f.rssKiB, _ = strconv.ParseInt(fields[0], 10, 64)
		case "Threads":
			f.threads, _ = strconv.Atoi(fields[0])
		}
	}
	return f
}

// probe makes one request on a new connection, as a liveness probe or a
// first scrape does, and returns its status and how long it took.
func probe(t *testing.T, url string) (int, time.Duration) {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	start := time.Now()
	resp, err := client.Get(url)
	if err != nil {
		t.Errorf("GET %s: %v", url, err)
		return 0, time.Since(start)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, time.Since(start)
}

// TestMetricsPortSurvivesIdleConnectionFlood opens 5 000 connections to the
// agent's metrics port and holds them, half silent and half stuck in the
// middle of their headers. Meanwhile /metrics and /readyz answer a new
// client within 1 s, a sync execution still runs, and the agent's
// descriptors, goroutines and memory stay bounded; they come back once the
// flood ends.
func TestMetricsPortSurvivesIdleConnectionFlood(t *testing.T) {
	raiseFileLimit(t, idleFlood+1024)
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{})
	c := a.client(t)
	install(t, c, fn{Name: "quick", Script: "echo ok\n"})
	if resp, _ := execSync(t, c, "quick"); resp.GetError() != "" {
		t.Fatalf("execution before the flood: %q", resp.GetError())
	}
	metricsAddr := strings.TrimPrefix(a.MetricsURL, "http://")
	before := figures(t, a)

	conns := make([]net.Conn, 0, idleFlood)
	t.Cleanup(func() {
		for _, conn := range conns {
			conn.Close()
		}
	})
	start := time.Now()
	for i := range idleFlood {
		conn, err := net.Dial("tcp", metricsAddr)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		if i%2 == 1 {
			io.WriteString(conn, "GET /metrics HTTP/1.1\r\nHost: flood\r\n") // never finished
		}
		conns = append(conns, conn)
	}
	t.Logf("%d connections opened in %v", idleFlood, time.Since(start))

	var slowest time.Duration
	for range 5 {
		for _, path := range []string{"/metrics", "/readyz"} {
			code, took := probe(t, a.MetricsURL+path)
			slowest = max(slowest, took)
			if code != http.StatusOK || took > time.Second {
				t.Errorf("%s during the flood: %d in %v, want 200 within 1s", path, code, took)
			}
		}
	}
	execStart := time.Now()
	if resp, _ := execSync(t, c, "quick"); resp.GetError() != "" || time.Since(execStart) > time.Second {
		t.Errorf("sync execution during the flood: %q in %v, want success within 1s", resp.GetError(), time.Since(execStart))
	}
	during := figures(t, a)
	t.Logf("agent before: %v; holding %d connections: %v; slowest probe %v, execution %v",
		before, idleFlood, during, slowest, time.Since(execStart))

	// The metrics server holds at most 64 connections, each a descriptor
	// and a goroutine or two; the rest was closed by the agent.
	if during.fds > before.fds+64+16 {
		t.Errorf("agent holds %d descriptors during the flood, %d before: more than its 64 connections", during.fds, before.fds)
	}
	if during.goroutines > before.goroutines+2*64+32 {
		t.Errorf("agent runs %.0f goroutines during the flood, %.0f before", during.goroutines, before.goroutines)
	}
	if grown := during.rssKiB - before.rssKiB; grown > 64<<10 {
		t.Errorf("agent RSS grew by %d MiB during the flood", grown>>10)
	}
	// The flood is reported, once: not a line per connection.
	if n := strings.Count(a.logs.String(), "metrics server at its connection cap"); n != 1 {
		t.Errorf("%d log lines about the connection cap during one flood, want 1", n)
	}

	for _, conn := range conns {
		conn.Close()
	}
	conns = nil
	var after processFigures
	if !waitUntil(10*time.Second, func() bool {
		after = figures(t, a)
		return after.fds <= before.fds+4
	}) {
		t.Errorf("agent descriptors %d after the flood ended, %d before", after.fds, before.fds)
	}
	t.Logf("agent after the flood: %v", after)
}
