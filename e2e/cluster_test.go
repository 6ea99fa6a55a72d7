package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// startRedisCluster runs a real three-master Redis Cluster on loopback.
func startRedisCluster(t *testing.T) []string {
	t.Helper()
	if _, err := exec.LookPath("redis-cli"); err != nil {
		t.Fatalf("redis-cli is needed (apt-get install redis-tools): %v", err)
	}
	var addrs []string
	for i := 0; i < 3; i++ {
		dir := t.TempDir()
		port := freePort(t)
		cmd := exec.Command("redis-server", "--port", strconv.Itoa(port), "--bind", "127.0.0.1",
			"--cluster-enabled", "yes", "--cluster-config-file", dir+"/nodes.conf",
			"--save", "", "--appendonly", "no", "--dir", dir)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		t.Cleanup(func() { cmd.Process.Kill(); <-exited })
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		c := redis.NewClient(&redis.Options{Addr: addr})
		if !waitUntil(10*time.Second, func() bool { return c.Ping(context.Background()).Err() == nil }) {
			t.Fatalf("cluster node %s did not answer", addr)
		}
		c.Close()
		addrs = append(addrs, addr)
	}
	out, err := exec.Command("redis-cli", append([]string{"--cluster", "create"}, append(addrs, "--cluster-yes")...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs})
	defer cc.Close()
	if !waitUntil(20*time.Second, func() bool {
		info, err := cc.ClusterInfo(context.Background()).Result()
		return err == nil && strings.Contains(info, "cluster_state:ok")
	}) {
		t.Fatal("the cluster never reached cluster_state:ok")
	}
	return addrs
}

// The agent on a Redis Cluster (redis_addr lists the seeds): one
// execution's record and output share a slot, so every RPC works, and
// function configs survive a restart.
func TestRedisCluster(t *testing.T) {
	addrs := startRedisCluster(t)
	rs := &redisServer{Addr: addrs[0]}
	a := startAgent(t, rs, agentOptions{
		AgentID: "agent-cluster",
		YAML:    fmt.Sprintf("redis_addr: %q\n", strings.Join(addrs, ",")),
	})
	c := a.client(t)
	tr := newTrigger(t)
	install(t, c, fn{Name: "hello", Script: "echo hello $1\n"})
	install(t, c, fn{Name: "live", Script: "echo first\n" + tr.waitScript() + "echo second\n"})

	resp, id := execSync(t, c, "hello", "cluster")
	if resp.GetError() != "" || string(resp.GetOutput()) != "hello cluster\n" {
		t.Fatalf("sync on the cluster: %v", resp)
	}
	if rec := getRecord(t, c, id); rec == nil || rec.Status != "success" || rec.Output != "hello cluster\n" {
		t.Errorf("record: %+v", rec)
	}
	async := execAsync(t, c, "live")
	waitRecord(t, c, async, 5*time.Second, "live output", func(r *record) bool { return r.Output == "first\n" })
	tr.fire(t)
	if rec := waitRecord(t, c, async, 10*time.Second, "final", isFinal); rec.Status != "success" || rec.Output != "first\nsecond\n" {
		t.Errorf("async record: %+v", rec)
	}
	a.restart(nil)
	c = a.client(t)
	if resp, _ := execSync(t, c, "hello", "again"); string(resp.GetOutput()) != "hello again\n" {
		t.Errorf("after a restart on the cluster: %v", resp)
	}
}

// The agent behind Redis Sentinel (redis_addr lists the Sentinels,
// redis_master_name names the master).
func TestRedisSentinel(t *testing.T) {
	master := startRedis(t)
	dir := t.TempDir()
	port := freePort(t)
	conf := fmt.Sprintf("port %d\nbind 127.0.0.1\ndir %s\nsentinel monitor fluxmaster %s 1\n",
		port, dir, strings.Replace(master.Addr, ":", " ", 1))
	confPath := dir + "/sentinel.conf"
	if err := writeFile(confPath, conf); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("redis-server", confPath, "--sentinel")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })
	sentinel := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	sc := redis.NewSentinelClient(&redis.Options{Addr: sentinel})
	defer sc.Close()
	if !waitUntil(10*time.Second, func() bool {
		addr, err := sc.GetMasterAddrByName(context.Background(), "fluxmaster").Result()
		return err == nil && net.JoinHostPort(addr[0], addr[1]) == master.Addr
	}) {
		t.Fatal("the sentinel never named the master")
	}
	a := startAgent(t, &redisServer{Addr: sentinel}, agentOptions{
		AgentID: "agent-sentinel",
		YAML:    fmt.Sprintf("redis_addr: %q\nredis_master_name: fluxmaster\n", sentinel),
	})
	c := a.client(t)
	install(t, c, fn{Name: "hello", Script: "echo via sentinel\n"})
	resp, id := execSync(t, c, "hello")
	if resp.GetError() != "" || string(resp.GetOutput()) != "via sentinel\n" {
		t.Fatalf("sync behind sentinel: %v", resp)
	}
	// The record is in the master the sentinel named.
	if n := master.Client.Exists(context.Background(), "flux:agent:agent-sentinel:exec:{"+id+"}").Val(); n != 1 {
		t.Errorf("record not in the master (EXISTS = %d)", n)
	}
}

func writeFile(path, body string) error { return os.WriteFile(path, []byte(body), 0o600) }
