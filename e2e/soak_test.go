package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// The soak's sizes: short in CI, long by hand, e.g.
//
//	FLUX_E2E_SOAK_SEQUENTIAL=10000 FLUX_E2E_SOAK_CONCURRENT=1000 \
//	  go test -race -run TestSoak -v -timeout 2h ./e2e/
const (
	soakSequentialEnv = "FLUX_E2E_SOAK_SEQUENTIAL"
	soakConcurrentEnv = "FLUX_E2E_SOAK_CONCURRENT"
)

// soakSettleEnv is how long the agent may take to come back to rest after
// the soak (a Go duration; default 90s: the sandbox ends warm slots idle
// for a minute). FLUX_E2E_SOAK_TRACE=1 logs the figures meanwhile.
const (
	soakSettleEnv = "FLUX_E2E_SOAK_SETTLE"
	soakTraceEnv  = "FLUX_E2E_SOAK_TRACE"
)

func soakSettle(t *testing.T) time.Duration {
	t.Helper()
	v := os.Getenv(soakSettleEnv)
	if v == "" {
		return 90 * time.Second
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		t.Fatalf("%s=%q: %v", soakSettleEnv, v, err)
	}
	return d
}

func soakSize(t *testing.T, env string, ci int) int {
	t.Helper()
	v := os.Getenv(env)
	if v == "" {
		return ci
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		t.Fatalf("%s=%q: want a count", env, v)
	}
	return n
}

// soakKind is what one soak execution does, and what its record must say.
type soakKind int

const (
	soakOK soakKind = iota
	soakFail
	soakTimeout
	soakCancel
	soakOOM
)

// soakFunctions names the function of each kind; the concurrent round
// uses the queueing ("wait") variants.
var soakFunctions = map[soakKind]string{soakOK: "ok", soakFail: "fail", soakTimeout: "timeout", soakCancel: "cancel", soakOOM: "oom"}

// soakKindOf spreads the kinds: mostly successes, some failures, a few of
// the expensive ones (a timeout costs its 1 s).
func soakKindOf(i int, oom bool) soakKind {
	switch i % 50 {
	case 7:
		return soakTimeout
	case 13, 39:
		return soakCancel
	case 21:
		if oom {
			return soakOOM
		}
	case 2, 11, 25, 33, 44:
		return soakFail
	}
	return soakOK
}

// soakFigures are what the agent holds; after the soak they are back
// where they were.
//
// The sandbox keeps warm slots (a thread, a cgroup per controller and
// their fds each) in proportion to the recent peak of concurrent
// executions, keeps twice that many once the peak has passed, and ends
// the idle ones beyond after a minute: the counts cannot come back to
// those of a fresh agent. The figures before are taken once a burst twice
// the soak's warmed the pool; those after must come back to no more than
// them once the slots the soak added were idle a minute.
type soakFigures struct {
	fds, goroutines, threads, cgroups, scratch, uids, keysWithoutTTL int
	rss                                                              int64
}

func (f soakFigures) String() string {
	return fmt.Sprintf("fds %d, goroutines %d, threads %d, cgroups %d, scratch entries %d, uids in use %d, Redis keys without TTL %d, RSS %s",
		f.fds, f.goroutines, f.threads, f.cgroups, f.scratch, f.uids, f.keysWithoutTTL, mib(f.rss))
}

// backTo reports whether f holds no more than before, with no process
// left and RSS within 10 %.
func (f soakFigures) backTo(before soakFigures) bool {
	return f.fds <= before.fds && f.goroutines <= before.goroutines && f.threads <= before.threads &&
		f.cgroups <= before.cgroups && f.scratch <= before.scratch && f.uids == 0 &&
		f.keysWithoutTTL == before.keysWithoutTTL && f.rss <= before.rss*11/10
}

// soakProbe reads the figures of one agent.
type soakProbe struct {
	a          *agent
	redis      *redis.Client
	firstUID   int
	lastUID    int
	instance   string // the sandbox's cgroup instance prefix: "<pid>-"
	scratchDir string
}

func newSoakProbe(t *testing.T, a *agent, rc *redis.Client) *soakProbe {
	t.Helper()
	cfg, err := os.ReadFile(a.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	p := &soakProbe{a: a, redis: rc, instance: strconv.Itoa(a.cmd.Process.Pid) + "-"}
	if m := regexp.MustCompile(`uid_range: (\d+)-(\d+)`).FindSubmatch(cfg); m != nil {
		p.firstUID, _ = strconv.Atoi(string(m[1]))
		p.lastUID, _ = strconv.Atoi(string(m[2]))
	}
	if m := regexp.MustCompile(`scratch_dir: (\S+)`).FindSubmatch(cfg); m != nil {
		p.scratchDir = string(m[1])
	}
	return p
}

func (p *soakProbe) read(t *testing.T) soakFigures {
	t.Helper()
	pid := p.a.cmd.Process.Pid
	var f soakFigures
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	f.fds = len(fds)
	st := procStatus(t, pid)
	f.rss = st["VmRSS"]
	f.threads = procThreads(t, pid)
	f.goroutines = metricValue(t, p.a.MetricsURL, "go_goroutines")
	instances, _ := filepath.Glob("/sys/fs/cgroup/*/flux-agent/" + p.instance + "*")
	for _, dir := range instances {
		filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() && path != dir {
				f.cgroups++
			}
			return nil
		})
	}
	if entries, err := os.ReadDir(p.scratchDir); err == nil {
		for _, e := range entries {
			if sub, err := os.ReadDir(filepath.Join(p.scratchDir, e.Name())); err == nil {
				f.scratch += len(sub)
			}
		}
	}
	if p.lastUID > 0 {
		f.uids = processesWithUIDs(p.firstUID, p.lastUID)
	}
	ctx := context.Background()
	iter := p.redis.Scan(ctx, 0, "*", 1000).Iterator()
	for iter.Next(ctx) {
		if ttl, err := p.redis.TTL(ctx, iter.Val()).Result(); err == nil && ttl == -1 {
			f.keysWithoutTTL++
		}
	}
	return f
}

// procThreads reads Threads from /proc/<pid>/status.
func procThreads(t *testing.T, pid int) int {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(data)) {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

// processesWithUIDs counts the processes running as a uid in [first, last].
func processesWithUIDs(first, last int) int {
	entries, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		data, err := os.ReadFile(filepath.Join("/proc", e.Name(), "status"))
		if err != nil {
			continue
		}
		for line := range strings.Lines(string(data)) {
			if v, ok := strings.CutPrefix(line, "Uid:"); ok {
				fields := strings.Fields(v)
				if uid, err := strconv.Atoi(fields[0]); err == nil && uid >= first && uid <= last {
					n++
				}
				break
			}
		}
	}
	return n
}

// metricValue reads a gauge without labels from the agent's /metrics.
func metricValue(t *testing.T, url, name string) int {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return int(f)
		}
	}
	io.Copy(io.Discard, resp.Body)
	t.Fatalf("%s not in /metrics", name)
	return 0
}

// checkSoakRecord says what is wrong with an execution's record, or "".
func checkSoakRecord(kind soakKind, id string, rec *record) string {
	switch {
	case rec == nil:
		return "no record"
	case !isFinal(rec):
		return "not final"
	}
	ok := false
	switch kind {
	case soakOK:
		ok = rec.Status == "success" && rec.Output == "ok "+id+"\n"
	case soakFail:
		ok = rec.Status == "failed" && rec.Error == "exit code 3" && rec.Output == "bad\n"
	case soakTimeout:
		ok = rec.Status == "failed" && rec.TimedOut && strings.Contains(rec.Error, "timed out")
	case soakCancel:
		ok = rec.Status == "cancelled"
	case soakOOM:
		ok = rec.Status == "failed" && rec.OOMKilled
	}
	if !ok {
		return fmt.Sprintf("wrong record %+v", rec)
	}
	return ""
}

// The soak: sequential then concurrent executions of every kind (success,
// failure, timeout, cancel, and OOM where cgroups limit memory) through
// the agent as shipped. Every record ends final and right, and the
// agent's fds, goroutines, threads, cgroups, scratch dirs, uids in use and
// Redis keys without TTL come back to their counts before the soak, its
// RSS to within 10 %.
func TestSoak(t *testing.T) {
	sequential := soakSize(t, soakSequentialEnv, 200)
	concurrent := soakSize(t, soakConcurrentEnv, 100)
	rs := startRedis(t)
	a := releaseAgent(t, rs, agentOptions{AgentID: "agent-soak", YAML: fmt.Sprintf("queue_limit: %d\n", 2*concurrent+100)})
	c := a.client(t)
	oom := os.Geteuid() == 0 && !strings.Contains(a.logs.String(), `"isolation_cgroup":"none"`)
	if !oom {
		t.Log("no OOM executions: they need root and cgroups")
	}
	scripts := map[soakKind]string{
		soakOK:      "echo ok $1\n",
		soakFail:    "echo bad\nexit 3\n",
		soakTimeout: "echo slow\nsleep 30\n",
		soakCancel:  "echo start\nsleep 30\n",
		soakOOM:     "dd if=/dev/zero of=/dev/null bs=200M count=1 2>/dev/null\necho survived\n",
	}
	for kind, name := range soakFunctions {
		for _, wait := range []bool{false, true} {
			cfg := &fluxpb.FunctionConfig{MaxConcurrency: 1000, MaxConcurrencyBehavior: "exit"}
			if wait {
				name = "q" + name
				cfg.MaxConcurrencyBehavior = "wait"
			}
			switch kind {
			case soakTimeout:
				cfg.TimeoutSeconds = 1
			case soakOOM:
				cfg.MemoryMb = 32
			}
			install(t, c, fn{Name: name, Script: scripts[kind], Config: cfg})
		}
	}
	probe := newSoakProbe(t, a, rs.Client)
	// Warm up: the pools, buffers and connections an agent keeps once it
	// worked are part of where it starts from.
	t.Logf("fresh:  %v", probe.read(t))
	for i := range 50 {
		runSoakExecution(t, c, soakOK, i%2 == 1)
	}
	if wrong := runSoakConcurrent(t, c, 2*concurrent, oom); wrong > 0 {
		t.Fatalf("%d executions of the warm-up ended wrong", wrong)
	}
	var before soakFigures
	if !waitUntil(30*time.Second, func() bool {
		before = probe.read(t)
		return before.uids == 0 && activeTasks(t, c) == 0
	}) {
		t.Fatalf("the agent did not come to rest after the warm-up: %v", before)
	}
	t.Logf("before: %v", before)

	start := time.Now()
	failures := 0
	for i := range sequential {
		kind := soakKindOf(i, oom)
		if msg := runSoakExecution(t, c, kind, i%2 == 1 || kind == soakCancel); msg != "" {
			if failures++; failures <= 10 {
				t.Errorf("sequential %d (%s): %s", i, soakFunctions[kind], msg)
			}
		}
	}
	seqTime := time.Since(start)
	t.Logf("%d sequential executions in %s", sequential, seqTime.Round(time.Millisecond))

	start = time.Now()
	failures += runSoakConcurrent(t, c, concurrent, oom)
	t.Logf("%d concurrent executions in %s", concurrent, time.Since(start).Round(time.Millisecond))
	if failures > 0 {
		t.Errorf("%d executions ended wrong", failures)
	}

	var after soakFigures
	ended := time.Now()
	lastLog := ended
	back := waitUntil(soakSettle(t), func() bool {
		after = probe.read(t)
		if os.Getenv(soakTraceEnv) != "" && time.Since(lastLog) > 5*time.Second {
			t.Logf("settling: %v", after)
			lastLog = time.Now()
		}
		return after.backTo(before) && activeTasks(t, c) == 0
	})
	t.Logf("after:  %v (%s after the last execution)", after, time.Since(ended).Round(time.Millisecond))
	if !back {
		t.Errorf("the agent did not come back to where it started:\nbefore %v\nafter  %v", before, after)
	}
}

// runSoakExecution runs one execution to its end and checks its record.
func runSoakExecution(t *testing.T, c fluxpb.AgentServiceClient, kind soakKind, async bool) string {
	t.Helper()
	id := newID()
	name := soakFunctions[kind]
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	resp, err := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: name, ExecutionId: id, Async: async, Args: []string{id}})
	if err != nil {
		return err.Error()
	}
	if async && resp.GetError() != "" {
		return "async refused: " + resp.GetError()
	}
	if kind == soakCancel {
		if !waitUntil(10*time.Second, func() bool { r := getRecord(t, c, id); return r != nil && r.Output == "start\n" }) {
			return "never started"
		}
		if r, err := c.CancelExecution(ctx, &fluxpb.CancelExecutionRequest{ExecutionId: id}); err != nil || !r.GetSuccess() {
			return fmt.Sprintf("cancel: %v %v", r, err)
		}
	}
	var rec *record
	waitUntil(30*time.Second, func() bool { rec = getRecord(t, c, id); return rec != nil && isFinal(rec) })
	if msg := checkSoakRecord(kind, id, rec); msg != "" {
		return msg
	}
	if !async && (resp.GetError() != rec.Error || string(resp.GetOutput()) != rec.Output) {
		return fmt.Sprintf("sync reply %v differs from the record %+v", resp, rec)
	}
	return ""
}

// runSoakConcurrent starts n executions at once (async ones queue for a
// slot, sync ones may be refused at capacity), cancels those meant to be
// cancelled, waits for every record and checks it; it returns how many
// ended wrong.
func runSoakConcurrent(t *testing.T, c fluxpb.AgentServiceClient, n int, oom bool) int {
	t.Helper()
	type started struct {
		id    string
		kind  soakKind
		async bool
		resp  *fluxpb.ExecutionResponse
		err   error
	}
	results := make([]started, n)
	var wg sync.WaitGroup
	for i := range n {
		kind := soakKindOf(i, oom)
		async := i%5 != 0 || kind != soakOK
		results[i] = started{id: newID(), kind: kind, async: async}
		wg.Add(1)
		go func(s *started) {
			defer wg.Done()
			name := soakFunctions[s.kind]
			if s.async {
				name = "q" + name
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			s.resp, s.err = c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: name, ExecutionId: s.id, Async: s.async, Args: []string{s.id}})
			if s.err == nil && s.kind == soakCancel {
				r, err := c.CancelExecution(ctx, &fluxpb.CancelExecutionRequest{ExecutionId: s.id})
				if err != nil || !r.GetSuccess() {
					s.err = fmt.Errorf("cancel: %v %v", r, err)
				}
			}
		}(&results[i])
	}
	wg.Wait()
	wrong, refused := 0, 0
	report := func(s started, msg string) {
		if wrong++; wrong <= 10 {
			t.Errorf("concurrent %s (%s, async=%v): %s", s.id, soakFunctions[s.kind], s.async, msg)
		}
	}
	for _, s := range results {
		if s.err != nil {
			report(s, s.err.Error())
			continue
		}
		if !s.async && strings.Contains(s.resp.GetError(), "at capacity") {
			refused++
			if getRecord(t, c, s.id) != nil {
				report(s, "a sync refusal left a record")
			}
			continue
		}
		var rec *record
		waitUntil(2*time.Minute, func() bool { rec = getRecord(t, c, s.id); return rec != nil && isFinal(rec) })
		if msg := checkSoakRecord(s.kind, s.id, rec); msg != "" {
			report(s, msg)
		}
	}
	t.Logf("concurrent: %d sync calls refused at capacity (allowed), %d wrong", refused, wrong)
	return wrong
}
