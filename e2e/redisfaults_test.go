//go:build !windows

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/serverless-fabric/flux-agent/e2e/internal/testredis"
	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// logCount counts the agent's log lines with message msg.
func (a *agent) logCount(msg string) int {
	n := 0
	for line := range strings.Lines(a.logs.String()) {
		var fields map[string]any
		if json.Unmarshal([]byte(line), &fields) == nil && fields["msg"] == msg {
			n++
		}
	}
	return n
}

// storedRecord reads a record and its output straight from Redis (c is any
// client of the right server or cluster); nil when there is none.
func storedRecord(t testing.TB, c redis.UniversalClient, agentID, id string) (*record, string) {
	t.Helper()
	key := "flux:agent:" + agentID + ":exec:{" + id + "}"
	data, err := c.Get(context.Background(), key).Bytes()
	if err != nil {
		return nil, ""
	}
	var r record
	if err := json.Unmarshal(data, &r); err != nil {
		t.Fatalf("record %s: %v", id, err)
	}
	out, _ := c.Get(context.Background(), key+":output").Result()
	return &r, out
}

// asyncWith starts an async execution with a fresh id; err is the call's.
func asyncWith(c fluxpb.AgentServiceClient, name string) (string, error) {
	id := newID()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: name, ExecutionId: id, Async: true})
	return id, err
}

// Redis stalls (SIGSTOP) for 60 s across the end of executions: the sync
// caller gets its reply within a few seconds, Flux reads the final records
// from the agent meanwhile, and once Redis resumes the records become
// final in Redis without an agent restart. The outage is logged once, and
// its end once.
func TestRedisStalledAcrossTheEnd(t *testing.T) {
	t.Parallel()
	const stall = 60 * time.Second
	rs := testredis.Start(t)
	a := startAgent(t, &redisServer{Addr: rs.Addr}, agentOptions{AgentID: "agent-stall"})
	c := a.client(t)
	tr := newTrigger(t)
	install(t, c, fn{Name: "f", Script: "echo before\n" + tr.waitScript() + "echo after\n"})
	async := execAsync(t, c, "f")
	type reply struct {
		resp *fluxpb.ExecutionResponse
		err  error
		at   time.Time
	}
	replies := make(chan reply, 1)
	syncID := newID()
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		resp, err := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "f", ExecutionId: syncID})
		replies <- reply{resp, err, time.Now()}
	}()
	for _, id := range []string{async, syncID} {
		waitRecord(t, c, id, 10*time.Second, "live output", func(r *record) bool { return r.Output == "before\n" })
	}

	rs.Signal(syscall.SIGSTOP)
	stalled := time.Now()
	tr.fire(t)
	r := <-replies
	if r.err != nil || r.resp.GetError() != "" || string(r.resp.GetOutput()) != "before\nafter\n" {
		t.Fatalf("sync reply with Redis stalled: %v %v", r.resp, r.err)
	}
	t.Logf("sync reply %s after Redis stalled (the function ended at once)", r.at.Sub(stalled).Round(time.Millisecond))
	if took := r.at.Sub(stalled); took > 5*time.Second {
		t.Errorf("the sync reply waited %s for a stalled Redis", took)
	}
	// Meanwhile Flux polls: the agent answers the final records itself.
	for time.Since(stalled) < stall {
		for _, id := range []string{async, syncID} {
			start := time.Now()
			rec := getRecord(t, c, id)
			if rec == nil || rec.Status != "success" || rec.Output != "before\nafter\n" {
				t.Fatalf("%s during the stall: %+v", id, rec)
			}
			if took := time.Since(start); took > time.Second {
				t.Errorf("GetExecution took %s during the stall", took)
			}
		}
		if isHealthy(c) {
			t.Error("HealthCheck says healthy while Redis is stalled")
		}
		time.Sleep(time.Second) // the pace of Flux's polling, not a synchronisation
	}
	rs.Signal(syscall.SIGCONT)
	resumed := time.Now()
	for _, id := range []string{async, syncID} {
		var rec *record
		var out string
		if !waitUntil(15*time.Second, func() bool {
			rec, out = storedRecord(t, rs.Client, "agent-stall", id)
			return rec != nil && isFinal(rec)
		}) {
			t.Fatalf("%s not final in Redis after it resumed: %+v", id, rec)
		}
		if rec.Status != "success" || out != "before\nafter\n" {
			t.Errorf("%s in Redis: %+v output %q", id, rec, out)
		}
	}
	t.Logf("records final in Redis %s after it resumed", time.Since(resumed).Round(time.Millisecond))
	if n, err := rs.Client.SCard(context.Background(), "flux:agent:{agent-stall}:running").Result(); err != nil || n != 0 {
		t.Errorf("running set: %d, %v", n, err)
	}
	if !waitUntil(10*time.Second, func() bool { return isHealthy(c) }) {
		t.Error("HealthCheck unhealthy after Redis resumed")
	}
	resp, _ := execSync(t, c, "f")
	if resp.GetError() != "" {
		t.Errorf("an execution after the stall: %v", resp)
	}
	// The agent's own copies are dropped once Redis took them.
	if !waitUntil(10*time.Second, func() bool { return activeTasks(t, c) == 0 }) {
		t.Errorf("active_tasks = %d: final records still wait", activeTasks(t, c))
	}
	if n := a.logCount("final records not written: Redis fails; retrying in the background"); n != 1 {
		t.Errorf("the outage was logged %d times, want once", n)
	}
	if n := a.logCount("final records written again"); n != 1 {
		t.Errorf("the end of the outage was logged %d times, want once", n)
	}
}

// Redis is killed and restarted empty while executions run: the agent
// writes back its function configs and running records, and once each
// execution ends its record is whole (status, all its output from byte 0,
// no NUL padding). Functions keep running, also after an agent restart
// with Redis empty, without Flux registering them again.
func TestRedisRestartsEmptyMidRun(t *testing.T) {
	t.Parallel()
	const agentID = "agent-empty"
	rs := testredis.Start(t)
	a := startAgent(t, &redisServer{Addr: rs.Addr}, agentOptions{AgentID: agentID})
	c := a.client(t)
	tr, quiet := newTrigger(t), newTrigger(t)
	install(t, c, fn{Name: "f", Script: "echo before\n" + tr.waitScript() + "echo after\n"})
	install(t, c, fn{Name: "q", Script: quiet.waitScript()})
	async := execAsync(t, c, "f")
	silent := execAsync(t, c, "q")
	replies := make(chan *fluxpb.ExecutionResponse, 1)
	syncID := newID()
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		resp, err := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "f", ExecutionId: syncID})
		if err != nil {
			t.Errorf("sync: %v", err)
		}
		replies <- resp
	}()
	for _, id := range []string{async, syncID} {
		waitRecord(t, c, id, 10*time.Second, "live output", func(r *record) bool { return r.Output == "before\n" })
	}

	rs.Kill()
	rs.Restart()
	restarted := time.Now()
	ctx := context.Background()
	ids := []string{async, syncID, silent}
	if !waitUntil(15*time.Second, func() bool {
		if n, _ := rs.Client.HLen(ctx, "flux:agent:{"+agentID+"}:functions").Result(); n != 2 {
			return false
		}
		if n, _ := rs.Client.SCard(ctx, "flux:agent:{"+agentID+"}:running").Result(); n != 3 {
			return false
		}
		for _, id := range ids {
			if rec, out := storedRecord(t, rs.Client, agentID, id); rec == nil || rec.Status != "running" ||
				(id != silent && out != "before\n") {
				return false
			}
		}
		return true
	}) {
		rec, out := storedRecord(t, rs.Client, agentID, async)
		t.Fatalf("the agent did not write back what it owns: %+v %q\n", rec, out)
	}
	t.Logf("function configs, running records and output back in Redis %s after it restarted empty",
		time.Since(restarted).Round(time.Millisecond))
	tr.fire(t)
	quiet.fire(t)
	if resp := <-replies; resp == nil || string(resp.GetOutput()) != "before\nafter\n" {
		t.Errorf("sync reply: %v", resp)
	}
	for _, id := range ids {
		want := "before\nafter\n"
		if id == silent {
			want = ""
		}
		rec := waitRecord(t, c, id, 15*time.Second, "final", isFinal)
		stored, out := storedRecord(t, rs.Client, agentID, id)
		if rec.Status != "success" || rec.Output != want || stored == nil || stored.Status != "success" || out != want ||
			strings.ContainsRune(out, 0) {
			t.Errorf("%s after Redis restarted empty: %+v; in Redis %+v output %q", id, rec, stored, out)
		}
	}
	if resp, _ := execSync(t, c, "f"); resp.GetError() != "" {
		t.Errorf("after Redis restarted empty: %v", resp)
	}

	// The agent restarts; Redis restarted empty meanwhile.
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
	rs.Kill()
	rs.Restart()
	a.start(nil)
	c = a.client(t)
	resp, _ := execSync(t, c, "q") // its trigger fired: it ends at once
	if resp.GetError() != "" {
		t.Errorf("after an agent restart with Redis empty: %v", resp)
	}
	if ok, _ := rs.Client.HExists(ctx, "flux:agent:{"+agentID+"}:functions", "f").Result(); !ok {
		t.Error("the function configs are not back in Redis after the agent restarted")
	}
}

// Redis is unreachable when the agent starts (a connection refused), and
// reachable 20 s later: the agent starts all the same, refuses executions
// meanwhile (Unavailable, at once), then settles what an earlier run left
// running and runs executions, without a restart.
func TestRedisUnreachableAtStart(t *testing.T) {
	t.Parallel()
	const agentID = "agent-unreachable"
	rs := testredis.Start(t)
	a := startAgent(t, &redisServer{Addr: rs.Addr}, agentOptions{AgentID: agentID})
	c := a.client(t)
	install(t, c, fn{Name: "long", Script: "echo up\nsleep 600\n"})
	install(t, c, fn{Name: "hello", Script: "echo hello\n"})
	id := execAsync(t, c, "long")
	waitRecord(t, c, id, 10*time.Second, "up", func(r *record) bool { return r.Output == "up\n" })
	a.cmd.Process.Kill() // the agent crashes
	<-a.exited
	if err := rs.Client.Save(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	rs.Kill()

	start := time.Now()
	a.start(nil)
	t.Logf("agent started %s after it was launched, Redis unreachable", time.Since(start).Round(time.Millisecond))
	c = a.client(t)
	for time.Since(start) < 20*time.Second {
		callStart := time.Now()
		_, err := asyncWith(c, "hello")
		if status.Code(err) != codes.Unavailable {
			t.Errorf("an execution while Redis is unreachable: %v, want Unavailable", err)
		}
		if took := time.Since(callStart); took > 5*time.Second {
			t.Errorf("a refused execution took %s", took)
		}
		time.Sleep(time.Second) // Flux's pace, not a synchronisation
	}
	rs.Restart()
	reachable := time.Now()
	rec := waitRecord(t, c, id, 20*time.Second, "settled", isFinal)
	t.Logf("the earlier run's execution settled %s after Redis became reachable", time.Since(reachable).Round(time.Millisecond))
	if rec.Status != "failed" || !strings.Contains(rec.Error, "agent stopped") || rec.Output != "up\n" {
		t.Errorf("record: %+v", rec)
	}
	resp, _ := execSync(t, c, "hello")
	if resp.GetError() != "" || string(resp.GetOutput()) != "hello\n" {
		t.Errorf("an execution once Redis is reachable: %v", resp)
	}
	async := execAsync(t, c, "hello")
	if rec := waitRecord(t, c, async, 10*time.Second, "final", isFinal); rec.Status != "success" {
		t.Errorf("async: %+v", rec)
	}
	if n, err := rs.Client.SCard(context.Background(), "flux:agent:{"+agentID+"}:running").Result(); err != nil || n != 0 {
		t.Errorf("running set: %d, %v", n, err)
	}
}

// clusterNode is one redis-server of a test Cluster.
type clusterNode struct {
	*testredis.Server
	id string // the Cluster's node id
}

// startReplicatedCluster runs a real Redis Cluster of three masters with a
// replica each on loopback; nodeTimeout is cluster-node-timeout.
func startReplicatedCluster(t *testing.T, nodeTimeout time.Duration) []*clusterNode {
	t.Helper()
	if _, err := exec.LookPath("redis-cli"); err != nil {
		t.Fatalf("redis-cli is needed (apt-get install redis-tools): %v", err)
	}
	var nodes []*clusterNode
	var addrs []string
	for range 6 {
		r := testredis.Start(t, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
			"--cluster-node-timeout", strconv.Itoa(int(nodeTimeout.Milliseconds())))
		nodes = append(nodes, &clusterNode{Server: r})
		addrs = append(addrs, r.Addr)
	}
	out, err := exec.Command("redis-cli", append(append([]string{"--cluster", "create"}, addrs...),
		"--cluster-replicas", "1", "--cluster-yes")...).CombinedOutput()
	if err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	ctx := context.Background()
	if !waitUntil(30*time.Second, func() bool {
		for _, n := range nodes {
			info, err := n.Client.ClusterInfo(ctx).Result()
			if err != nil || !strings.Contains(info, "cluster_state:ok") {
				return false
			}
			repl, err := n.Client.Info(ctx, "replication").Result()
			if err != nil || strings.Contains(repl, "role:slave") && !strings.Contains(repl, "master_link_status:up") {
				return false
			}
		}
		return true
	}) {
		t.Fatal("the cluster never became ok with its replicas in sync")
	}
	for _, n := range nodes {
		id, err := n.Client.Do(ctx, "CLUSTER", "MYID").Text()
		if err != nil {
			t.Fatal(err)
		}
		n.id = id
	}
	return nodes
}

// masterOf finds the master serving key and its replica, once the
// cluster's slot map lists them (gossip takes a moment).
func masterOf(t *testing.T, nodes []*clusterNode, key string) (master, replica *clusterNode) {
	t.Helper()
	ctx := context.Background()
	slot, err := nodes[0].Client.ClusterKeySlot(ctx, key).Result()
	if err != nil {
		t.Fatal(err)
	}
	byAddr := map[string]*clusterNode{}
	for _, n := range nodes {
		byAddr[n.Addr] = n
	}
	if !waitUntil(20*time.Second, func() bool {
		slots, err := nodes[0].Client.ClusterSlots(ctx).Result()
		if err != nil {
			return false
		}
		for _, s := range slots {
			if int64(s.Start) <= slot && slot <= int64(s.End) && len(s.Nodes) >= 2 {
				master, replica = byAddr[s.Nodes[0].Addr], byAddr[s.Nodes[1].Addr]
				return master != nil && replica != nil
			}
		}
		return false
	}) {
		t.Fatalf("no master with a replica serves slot %d", slot)
	}
	return master, replica
}

// writeCalls sums the server's counts of the commands the agent writes with.
func writeCalls(ctx context.Context, c *redis.Client) (int, error) {
	info, err := c.Info(ctx, "commandstats").Result()
	if err != nil {
		return 0, err
	}
	writes := []string{"set", "sadd", "srem", "eval", "setrange", "expire", "pexpire", "hset", "hsetnx"}
	total := 0
	for line := range strings.Lines(info) {
		name, rest, ok := strings.Cut(strings.TrimSpace(line), ":calls=")
		if !ok || !slices.Contains(writes, strings.TrimPrefix(name, "cmdstat_")) {
			continue
		}
		n, _, _ := strings.Cut(rest, ",")
		calls, _ := strconv.Atoi(n)
		total += calls
	}
	return total, nil
}

// A master of a real Cluster (three masters, a replica each, a 2 s
// cluster-node-timeout) is killed under a load of sync and async
// executions: the agent writes to the promoted replica within 2 s of its
// promotion, and afterwards every record is final and no record says
// running, whatever failed half-way meanwhile.
func TestRedisClusterFailover(t *testing.T) {
	t.Parallel()
	const agentID = "agent-failover"
	nodes := startReplicatedCluster(t, 2*time.Second)
	var seeds []string
	for _, n := range nodes {
		seeds = append(seeds, n.Addr)
	}
	a := startAgent(t, &redisServer{Addr: nodes[0].Addr}, agentOptions{
		AgentID: agentID,
		YAML:    fmt.Sprintf("redis_addr: %q\nlog:\n  level: info\n", strings.Join(seeds, ",")),
	})
	c := a.client(t)
	install(t, c, fn{Name: "quick", Script: "echo quick $1\n", Config: &fluxpb.FunctionConfig{MaxConcurrency: 100}})
	install(t, c, fn{Name: "slow", Script: "echo start\nsleep 0.3\necho end\n", Config: &fluxpb.FunctionConfig{MaxConcurrency: 100}})

	// The master of the running set: claims that fail half-way are the
	// ones the agent must settle.
	victim, promoted := masterOf(t, nodes, "flux:agent:{"+agentID+"}:running")
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: seeds})
	defer cc.Close()

	var mu sync.Mutex
	var ids []string
	var failures, calls int
	var slowest time.Duration
	stop := make(chan struct{})
	var load sync.WaitGroup
	worker := func(async bool) {
		defer load.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			id := newID()
			start := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			name := "quick"
			if async {
				name = "slow"
			}
			resp, err := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: name, ExecutionId: id, Async: async, Args: []string{id}})
			cancel()
			took := time.Since(start)
			mu.Lock()
			ids = append(ids, id)
			calls++
			slowest = max(slowest, took)
			if err != nil || resp.GetError() != "" {
				failures++
			}
			mu.Unlock()
			if err != nil {
				time.Sleep(50 * time.Millisecond) // a client's back-off, not a synchronisation
			}
		}
	}
	for i := range 6 {
		load.Add(1)
		go worker(i%2 == 1)
	}
	if !waitUntil(30*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return calls >= 100 }) {
		t.Fatal("the load did not get going")
	}

	ctx := context.Background()
	victim.Kill()
	killed := time.Now()
	var promotedAt, wroteAt time.Time
	baseline := -1
	if !waitUntil(60*time.Second, func() bool {
		if promotedAt.IsZero() {
			role, err := promoted.Client.Do(ctx, "ROLE").Slice()
			if err != nil || len(role) == 0 || role[0] != "master" {
				return false
			}
			promotedAt = time.Now()
		}
		n, err := writeCalls(ctx, promoted.Client)
		if err != nil {
			return false
		}
		if baseline < 0 {
			baseline = n
			return false
		}
		if n > baseline {
			wroteAt = time.Now()
			return true
		}
		return false
	}) {
		t.Fatalf("no write reached the promoted replica (promoted at %v)", promotedAt)
	}
	followed := wroteAt.Sub(promotedAt)
	t.Logf("master killed; replica promoted %s later; the agent's first write on it %s after the promotion",
		promotedAt.Sub(killed).Round(time.Millisecond), followed.Round(time.Millisecond))
	if followed > 2*time.Second {
		t.Errorf("the agent followed the new master %s after its promotion, want at most 2s", followed)
	}
	// The load goes on against the new layout, then stops.
	mu.Lock()
	callsAtFollow := calls
	mu.Unlock()
	if !waitUntil(30*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return calls >= callsAtFollow+100 }) {
		t.Error("executions did not go on after the failover")
	}
	close(stop)
	load.Wait()
	mu.Lock()
	t.Logf("%d executions, %d failed or refused during the failover; slowest call %s", calls, failures, slowest.Round(time.Millisecond))
	all := slices.Clone(ids)
	mu.Unlock()

	// Every record is final (or was never written), and none says running
	// anywhere in the cluster, once the agent settled what failed half-way.
	running := func() []string {
		var left []string
		var lmu sync.Mutex
		cc.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
			iter := m.Scan(ctx, 0, "flux:agent:"+agentID+":exec:{*}", 1000).Iterator()
			for iter.Next(ctx) {
				key := iter.Val()
				if strings.HasSuffix(key, ":output") {
					continue
				}
				data, err := m.Get(ctx, key).Bytes()
				if err == nil && bytes.Contains(data, []byte(`"status":"running"`)) {
					lmu.Lock()
					left = append(left, key)
					lmu.Unlock()
				}
			}
			return iter.Err()
		})
		return left
	}
	var left []string
	if !waitUntil(60*time.Second, func() bool { left = running(); return len(left) == 0 }) {
		t.Errorf("%d records still say running: %v", len(left), left[:min(len(left), 5)])
	}
	for _, id := range all {
		if rec := getRecord(t, c, id); rec != nil && !isFinal(rec) {
			t.Errorf("%s: %+v", id, rec)
		}
	}
	if !waitUntil(30*time.Second, func() bool {
		n, err := cc.SCard(ctx, "flux:agent:{"+agentID+"}:running").Result()
		return err == nil && n == 0
	}) {
		t.Error("the running set is not empty")
	}
	if n := activeTasks(t, c); n != 0 {
		t.Errorf("active_tasks = %d after the load", n)
	}
}

// isHealthy is whether the agent answers HealthCheck healthy.
func isHealthy(c fluxpb.AgentServiceClient) bool {
	ok, err := healthy(c)
	return err == nil && ok
}
