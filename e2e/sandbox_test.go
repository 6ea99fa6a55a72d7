package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// requiredEnv lists what a CI run insists on ("root", "runner", ...), as
// for the sandbox's tests: there a test that would skip for want of it
// fails instead, so that isolation tests cannot pass as skipped.
const requiredEnv = "FLUX_SANDBOX_TEST_REQUIRE"

// skipUnlessRequired skips, or fails when the run requires need.
func skipUnlessRequired(t testing.TB, need, format string, args ...any) {
	t.Helper()
	if slices.Contains(strings.Split(os.Getenv(requiredEnv), ","), need) {
		t.Fatalf("%s=%s, but: %s", requiredEnv, os.Getenv(requiredEnv), fmt.Sprintf(format, args...))
	}
	t.Skipf(format, args...)
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		skipUnlessRequired(t, "root", "needs root: the agent isolates functions with cgroups and the flux-runner user only as root")
	}
}

func requireRunner(t *testing.T) {
	t.Helper()
	if _, err := user.Lookup("flux-runner"); err != nil {
		skipUnlessRequired(t, "runner", "needs the flux-runner user (sandbox/vmtest/setup-runner.sh creates it)")
	}
}

// Through the whole agent: functions run unprivileged, inside limits that
// hold, and cannot read what is the agent's.
func TestSandboxedExecution(t *testing.T) {
	requireRoot(t)
	requireRunner(t)
	rs := startRedis(t)
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("top secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	inherited, err := os.Open(secret)
	if err != nil {
		t.Fatal(err)
	}
	defer inherited.Close()
	a := startAgent(t, rs, agentOptions{Env: []string{"FLUX_TEST_AGENT_ONLY=agent-env-value"}, ExtraFiles: []*os.File{inherited, inherited}})
	c := a.client(t)

	install(t, c, fn{Name: "whoami", Script: fmt.Sprintf(`echo "uid:$(id -u) groups:$(id -G)"
cat %s 2>/dev/null && echo READ-SECRET
for fd in 3 4 5; do cat <&$fd 2>/dev/null && echo READ-INHERITED-FD; done
cat /proc/1/environ 2>/dev/null | tr '\0' '\n' | grep -c FLUX_TEST_AGENT_ONLY
cat /proc/$PPID/environ 2>/dev/null | tr '\0' '\n' | grep FLUX_TEST_AGENT_ONLY
touch handler.sh 2>/dev/null && echo WROTE-CODE
echo tmp:$TMPDIR; touch "$TMPDIR/scratch" && echo tmp-ok
grep NoNewPrivs /proc/self/status
`, secret)})
	resp, _ := execSync(t, c, "whoami")
	out := string(resp.GetOutput())
	if strings.Contains(out, "uid:0 ") || !strings.Contains(out, "uid:") {
		t.Errorf("function runs as root or not at all:\n%s", out)
	}
	for _, leak := range []string{"READ-SECRET", "top secret", "READ-INHERITED-FD", "agent-env-value", "WROTE-CODE"} {
		if strings.Contains(out, leak) {
			t.Errorf("isolation broken (%s):\n%s", leak, out)
		}
	}
	if !strings.Contains(out, "tmp-ok") || !strings.Contains(out, "NoNewPrivs:\t1") {
		t.Errorf("scratch dir or no_new_privs missing:\n%s", out)
	}

	t.Run("out of memory", func(t *testing.T) {
		install(t, c, fn{Name: "hog", Script: "dd if=/dev/zero of=/dev/null bs=200M count=1 2>/dev/null\necho survived\n",
			Config: &fluxpb.FunctionConfig{MemoryMb: 32}})
		resp, id := execSync(t, c, "hog")
		if resp.GetError() != "out of memory: exceeded the 32 MiB limit" {
			t.Errorf("error %q, output %q", resp.GetError(), resp.GetOutput())
		}
		if rec := getRecord(t, c, id); !rec.OOMKilled || rec.Status != "failed" {
			t.Errorf("record: %+v", rec)
		}
	})
	t.Run("setsid escapee dies on cancel", func(t *testing.T) {
		mark := filepath.Join(filepath.Dir(string(newTrigger(t))), "alive")
		install(t, c, fn{Name: "escape", Script: fmt.Sprintf("setsid sh -c 'while true; do touch %s; sleep 0.05; done' &\necho forked\nsleep 60\n", mark)})
		id := execAsync(t, c, "escape")
		waitRecord(t, c, id, 5*time.Second, "forked", func(r *record) bool { return strings.Contains(r.Output, "forked") })
		if !waitUntil(5*time.Second, func() bool { _, err := os.Stat(mark); return err == nil }) {
			t.Fatal("the escapee never ran")
		}
		if resp, err := c.CancelExecution(context.Background(), &fluxpb.CancelExecutionRequest{ExecutionId: id}); err != nil || !resp.GetSuccess() {
			t.Fatal(resp, err)
		}
		os.Remove(mark)
		// Nothing touches the mark any more: the escapee is dead. The check
		// waits well beyond its 50 ms loop.
		deadline := time.Now().Add(500 * time.Millisecond)
		for time.Now().Before(deadline) {
			if _, err := os.Stat(mark); err == nil {
				t.Fatal("the setsid escapee survived the cancel")
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// The public IP comes from public_ip_url (here a loopback stand-in for the
// real service) and reaches functions; the lookup never delays start-up.
func TestPublicIPLookup(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "198.51.100.77")
	})}
	go srv.Serve(lis)
	t.Cleanup(func() { srv.Close() })

	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{Env: []string{"FLUX_AGENT_NETWORK_PUBLIC_IP_URL=http://" + lis.Addr().String() + "/"}})
	c := a.client(t)
	install(t, c, fn{Name: "ip", Script: "echo $FLUX_NODE_PUBLIC_IP\n"})
	if !waitUntil(10*time.Second, func() bool {
		resp, _ := execSync(t, c, "ip")
		return string(resp.GetOutput()) == "198.51.100.77\n"
	}) {
		t.Errorf("FLUX_NODE_PUBLIC_IP never became the looked-up address")
	}
}

// BenchmarkNodeStatus is the ReportNodeStatus round trip over loopback
// gRPC: the figures are in memory, so this is gRPC's own cost.
func BenchmarkNodeStatus(b *testing.B) {
	rs := startRedis(b)
	a := benchAgent(b, rs, "")
	c := a.client(b)
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.ReportNodeStatus(ctx, &fluxpb.NodeStatusRequest{}); err != nil {
			b.Fatal(err)
		}
	}
}

// With sandbox.uid_range, functions run as uids of their own.
func TestPerExecutionUIDs(t *testing.T) {
	requireRoot(t)
	requireRunner(t)
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{YAML: "sandbox:\n  uid_range: 2900100-2900199\n"})
	c := a.client(t)
	install(t, c, fn{Name: "uid", Script: "id -u\n"})
	resp, _ := execSync(t, c, "uid")
	if out := string(resp.GetOutput()); !strings.HasPrefix(out, "29001") || resp.GetError() != "" {
		t.Errorf("uid %q, error %q; want one from 2900100-2900199", out, resp.GetError())
	}
}

// An agent killed outright leaves nothing behind once it starts again:
// its functions are dead, its cgroups are gone, its network table is
// there once.
func TestAgentCrashLeavesNothingBehind(t *testing.T) {
	requireRoot(t)
	requireRunner(t)
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{AgentID: "agent-crash-leftovers"})
	c := a.client(t)
	install(t, c, fn{Name: "stay", Script: "sleep 600 &\necho \"pids $$ $!\"\nwait\n"})
	var ids []string
	for range 3 {
		ids = append(ids, execAsync(t, c, "stay"))
	}
	var pids []int
	for _, id := range ids {
		rec := waitRecord(t, c, id, 10*time.Second, "pids", func(r *record) bool { return strings.HasPrefix(r.Output, "pids ") })
		var sh, child int
		fmt.Sscanf(rec.Output, "pids %d %d", &sh, &child)
		pids = append(pids, sh, child)
	}
	crashed := a.cmd.Process.Pid
	a.cmd.Process.Kill()
	<-a.exited
	a.start(nil)
	c = a.client(t)
	for _, pid := range pids {
		if !waitUntil(10*time.Second, func() bool { return processGone(pid) }) {
			t.Errorf("process %d of the crashed agent still alive", pid)
		}
	}
	dirs, _ := filepath.Glob(fmt.Sprintf("/sys/fs/cgroup/*/flux-agent/%d-*", crashed))
	if len(dirs) > 0 {
		t.Errorf("the crashed agent's cgroups are left: %v", dirs)
	}
	if out, err := exec.Command("nft", "list", "tables").CombinedOutput(); err == nil {
		if n := strings.Count(string(out), "flux-agent-agent-crash-leftovers\n"); n != 1 {
			t.Errorf("%d copies of the agent's table after its restart:\n%s", n, out)
		}
	}
	// And the restarted agent works.
	install(t, c, fn{Name: "after", Script: "echo fine\n"})
	if resp, _ := execSync(t, c, "after"); string(resp.GetOutput()) != "fine\n" || resp.GetError() != "" {
		t.Errorf("after the restart: %q %q", resp.GetOutput(), resp.GetError())
	}
}

// processGone says whether pid is dead (gone, or a zombie).
func processGone(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	return len(fields) > 0 && (fields[0] == "Z" || fields[0] == "X")
}
