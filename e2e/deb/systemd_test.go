//go:build linux

package deb

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// vmShutdownGrace is the shutdown_grace the VM's config sets: short, so
// that a stop under TCG stays quick, and still well inside TimeoutStopSec.
const vmShutdownGrace = 4 * time.Second

// TestUnderSystemd runs inside the VM that e2e/deb/vm/run.sh boots: Debian
// 12 with systemd as PID 1 on a cgroup v2 kernel. It installs the .deb,
// does what Flux's bootstrap does, and checks that the unit, with all its
// hardening, lets the agent do its job: delegated cgroups, functions as
// flux-runner, an OOM kill that leaves the agent running, a stop that lets
// the agent finish, a restart after a crash, and a purge under systemd.
func TestUnderSystemd(t *testing.T) {
	if os.Getenv("FLUX_AGENT_VM_TEST") != "1" {
		t.Skip("runs inside the systemd VM of e2e/deb/vm/run.sh")
	}
	requireRoot(t)
	if _, err := os.Stat("/run/systemd/system"); err != nil {
		t.Fatalf("systemd is not PID 1: %v", err)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs("/sys/fs/cgroup", &fs); err != nil || fs.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Fatalf("/sys/fs/cgroup is not cgroup v2 (%v)", err)
	}
	deb := os.Getenv("FLUX_AGENT_DEB")
	waitActive(t, "redis-server.service")

	// Install: daemon-reload runs, nothing is enabled or started.
	mustRun(t, "dpkg", "-i", deb)
	if out, _ := exec.Command("systemctl", "is-enabled", pkgName).Output(); strings.TrimSpace(string(out)) != "disabled" {
		t.Errorf("after dpkg -i the unit is %q, want disabled", out)
	}
	if out, _ := exec.Command("systemctl", "is-active", pkgName).Output(); strings.TrimSpace(string(out)) != "inactive" {
		t.Errorf("after dpkg -i the unit is %q, want inactive", out)
	}

	// Flux's bootstrap: config in the SSH user's home, a drop-in, then
	// daemon-reload, enable, restart.
	home := "/home/admin/flux-agent"
	if err := os.MkdirAll(home, 0o700); err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(home, "agent.yaml")
	writeFile(t, config, fmt.Sprintf(`agent_id: debvm
port: "50052"
redis_addr: "redis://127.0.0.1:6379"
shutdown_grace: %s
network:
  node_private_ip: 127.0.0.1
  node_public_ip: 127.0.0.1
  public_ip_url: ""
telemetry:
  metrics_address: ""
`, vmShutdownGrace), 0o600)
	if err := os.MkdirAll(dropInDir, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dropInDir, "flux.conf"), "[Service]\nEnvironment=AGENT_CONFIG="+config+"\n", 0o644)
	mustRun(t, "systemctl", "daemon-reload")
	mustRun(t, "systemctl", "enable", pkgName)
	mustRun(t, "systemctl", "restart", pkgName)

	conn := dialAgent(t, "127.0.0.1:50052")
	client := fluxpb.NewAgentServiceClient(conn)
	waitHealthy(t, client)
	mainPID := unitMainPID(t)

	// Delegate=yes: the agent moved itself into a leaf of the unit's cgroup.
	agentCgroup := procCgroup(t, strconv.Itoa(mainPID))
	t.Logf("agent pid %d in cgroup %s", mainPID, agentCgroup)
	if !strings.HasPrefix(agentCgroup, "/system.slice/flux-agent.service/") {
		t.Errorf("agent cgroup %q, want a leaf under /system.slice/flux-agent.service/", agentCgroup)
	}

	// A function: a user of its own (the per-execution passwd entry), its
	// own cgroup in the delegated subtree, its code readable, the agent's
	// config not.
	deployScript(t, client, "whoami", 0, "id -un\ncat /proc/self/cgroup\n"+
		"grep -q marker-line \"$0\" && echo code-readable # marker-line\n"+
		"cat "+config+" >/dev/null 2>&1 && echo config-readable || echo config-hidden\n")
	out := execute(t, client, "whoami")
	t.Logf("function output:\n%s", out)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 4 || lines[0] != "flux-fn" || lines[2] != "code-readable" || lines[3] != "config-hidden" {
		t.Errorf("function output:\n%s\nwant flux-fn, its cgroup, code-readable, config-hidden", out)
	} else if cg := strings.TrimPrefix(lines[1], "0::"); !strings.HasPrefix(cg, "/system.slice/flux-agent.service/") || cg == agentCgroup {
		t.Errorf("function cgroup %q, want its own under /system.slice/flux-agent.service/", cg)
	}

	// OOMPolicy=continue: a function killed by its memory limit leaves the
	// agent running, same process.
	deployScript(t, client, "hog", 32, "head -c 512m /dev/zero | tail\n")
	resp, err := client.ExecuteFunction(ctxTimeout(t, time.Minute), &fluxpb.ExecutionRequest{FunctionName: "hog", ExecutionId: "exc-" + uuid(t)})
	t.Logf("hog: error %q", resp.GetError())
	if err != nil || !strings.Contains(resp.GetError(), "out of memory") {
		t.Errorf("hog: %v error %q, want an out of memory error", err, resp.GetError())
	}
	if pid := unitMainPID(t); pid != mainPID || !isActive(pkgName) {
		t.Errorf("after the OOM kill: main pid %d (was %d), active %v: OOMPolicy must keep the agent", pid, mainPID, isActive(pkgName))
	}
	waitHealthy(t, client)

	// Stop with a function running: systemd sends SIGTERM to the agent
	// alone (KillMode=mixed); the agent waits shutdown_grace, kills the
	// function, records it and exits 0 well inside TimeoutStopSec.
	deployScript(t, client, "sleeper", 0, "echo started\nsleep 600\n")
	sleeperID := "exc-" + uuid(t)
	if resp, err := client.ExecuteFunction(ctxTimeout(t, 10*time.Second), &fluxpb.ExecutionRequest{FunctionName: "sleeper", ExecutionId: sleeperID, Async: true}); err != nil || resp.GetError() != "" {
		t.Fatalf("async sleeper: %v %q", err, resp.GetError())
	}
	waitRunnerProcesses(t, true)
	start := time.Now()
	mustRun(t, "systemctl", "stop", pkgName)
	took := time.Since(start)
	t.Logf("systemctl stop with a function running took %s", took.Round(100*time.Millisecond))
	if took < vmShutdownGrace || took > unitDuration(t, "Service.TimeoutStopSec") {
		t.Errorf("systemctl stop took %s, want between shutdown_grace %s and TimeoutStopSec", took, vmShutdownGrace)
	}
	if got := unitProperty(t, "Result"); got != "success" {
		t.Errorf("unit Result=%s after stop, want success (not a timeout or a kill)", got)
	}
	if got := unitProperty(t, "ExecMainStatus"); got != "0" {
		t.Errorf("agent exit status %s after SIGTERM, want 0", got)
	}
	waitRunnerProcesses(t, false)
	if _, err := os.Stat("/sys/fs/cgroup/system.slice/flux-agent.service"); err == nil {
		t.Error("the unit's cgroup outlived the stop")
	}

	// The sleeper's final status was written before the agent exited.
	mustRun(t, "systemctl", "start", pkgName)
	waitHealthy(t, client)
	got, err := client.GetExecution(ctxTimeout(t, 5*time.Second), &fluxpb.GetExecutionRequest{ExecutionId: sleeperID})
	if err != nil || !got.GetFound() {
		t.Fatalf("GetExecution(sleeper): %v found=%v", err, got.GetFound())
	}
	var rec struct {
		Status string `json:"status"`
	}
	t.Logf("sleeper record after the stop: %s", got.GetData())
	if err := json.Unmarshal(got.GetData(), &rec); err != nil || rec.Status == "running" || rec.Status == "" {
		t.Errorf("sleeper record after the stop: %s (%v), want a final status", got.GetData(), err)
	}

	// Restart=on-failure: a crashed agent comes back by itself.
	crashedPID := unitMainPID(t)
	mustRun(t, "systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", pkgName)
	deadline := time.Now().Add(60 * time.Second)
	for {
		if pid := unitMainPID(t); pid != 0 && pid != crashedPID && isActive(pkgName) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent not restarted within 60s of SIGKILL (Restart=on-failure)")
		}
		time.Sleep(200 * time.Millisecond) // polling systemd's state; no event to wait on
	}
	waitHealthy(t, client)
	t.Logf("restarted after SIGKILL: pid %d → %d", crashedPID, unitMainPID(t))

	// The start-path benchmark (e2e's BenchmarkStartLatency, built into the
	// VM by run.sh) against this agent: the figures of cgroup v2 under
	// systemd.
	if _, err := os.Stat("/debvm/e2e.test"); err == nil {
		bench := exec.Command("/debvm/e2e.test", "-test.run", "^$", "-test.bench", "StartLatency", "-test.benchtime", "100x")
		bench.Env = append(os.Environ(), "FLUX_E2E_AGENT_ADDR=127.0.0.1:50052",
			"FLUX_E2E_AGENT_PID="+strconv.Itoa(unitMainPID(t)), "FLUX_E2E_REDIS_ADDR=127.0.0.1:6379")
		out, err := bench.CombinedOutput()
		t.Logf("start latency under systemd on cgroup v2:\n%s", out)
		if err != nil {
			t.Errorf("start latency benchmark: %v", err)
		}
	}

	// Purge under systemd: prerm stops and disables, postrm reloads.
	conn.Close()
	mustRun(t, "dpkg", "--purge", pkgName)
	if isActive(pkgName) {
		t.Error("agent still active after purge")
	}
	if out, err := exec.Command("systemctl", "is-enabled", pkgName).CombinedOutput(); err == nil {
		t.Errorf("unit still known after purge: %s", out)
	}
	for _, p := range []string{binPath, unitPath, configDir, stateDir, dropInDir, wantsLink} {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("%s left after purge", p)
		}
	}
	if err := exec.Command("getent", "passwd", runnerUser).Run(); err == nil {
		t.Errorf("%s left after purge", runnerUser)
	}
}

func dialAgent(t *testing.T, addr string) *grpc.ClientConn {
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.5, MaxDelay: time.Second},
			MinConnectTimeout: 2 * time.Second,
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// waitHealthy blocks until HealthCheck answers healthy (WaitForReady
// waits for the listener) or a minute passes.
func waitHealthy(t *testing.T, client fluxpb.AgentServiceClient) {
	t.Helper()
	h, err := client.HealthCheck(ctxTimeout(t, time.Minute), &fluxpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	if err != nil || !h.GetHealthy() {
		out, _ := exec.Command("journalctl", "-u", pkgName, "--no-pager", "-n", "50").CombinedOutput()
		t.Fatalf("HealthCheck: %v healthy=%v\n%s", err, h.GetHealthy(), out)
	}
}

func deployScript(t *testing.T, client fluxpb.AgentServiceClient, name string, memoryMB int64, body string) {
	t.Helper()
	ack, err := client.RegisterFunction(ctxTimeout(t, 10*time.Second), &fluxpb.FunctionConfig{
		Name: name, Handler: "handler.sh", MemoryMb: memoryMB, TimeoutSeconds: 600,
		MaxConcurrency: 5, MaxConcurrencyBehavior: "exit",
	})
	if err != nil || !ack.GetSuccess() {
		t.Fatalf("RegisterFunction %s: %v %v", name, ack, err)
	}
	dack, err := client.DeployFunction(ctxTimeout(t, 30*time.Second), &fluxpb.DeploymentPackage{FunctionName: name, CodeArchive: handlerZip(t, "#!/bin/sh\n"+body)})
	if err != nil || !dack.GetSuccess() {
		t.Fatalf("DeployFunction %s: %v %v", name, dack, err)
	}
}

func execute(t *testing.T, client fluxpb.AgentServiceClient, name string) string {
	t.Helper()
	resp, err := client.ExecuteFunction(ctxTimeout(t, time.Minute), &fluxpb.ExecutionRequest{FunctionName: name, ExecutionId: "exc-" + uuid(t)})
	if err != nil || resp.GetError() != "" {
		t.Fatalf("ExecuteFunction %s: %v %q\n%s", name, err, resp.GetError(), resp.GetOutput())
	}
	return string(resp.GetOutput())
}

// waitRunnerProcesses waits until flux-runner has processes (want) or none.
// waitRunnerProcesses waits until processes of functions (uids of the
// range the package reserved) are there, or are gone.
func waitRunnerProcesses(t *testing.T, want bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := exec.Command("ps", "-eo", "uid=").Output()
		if err != nil {
			t.Fatal(err)
		}
		has := false
		for _, f := range strings.Fields(string(out)) {
			if uid, err := strconv.ParseUint(f, 10, 32); err == nil && uid >= 1879048192 && uid < 1879048192+65536 {
				has = true
			}
		}
		if has == want {
			return
		}
		if time.Now().After(deadline) {
			out, _ := exec.Command("ps", "-eo", "uid,pid,cgroup,args").CombinedOutput()
			t.Fatalf("function processes present=%v after 30s, want %v\n%s", has, want, out)
		}
		time.Sleep(100 * time.Millisecond) // polling the process table; no event to wait on
	}
}

func waitActive(t *testing.T, unit string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !isActive(unit) {
		if time.Now().After(deadline) {
			t.Fatalf("%s not active after 60s", unit)
		}
		time.Sleep(200 * time.Millisecond) // polling systemd's state; no event to wait on
	}
}

func isActive(unit string) bool {
	return exec.Command("systemctl", "is-active", "--quiet", unit).Run() == nil
}

func unitProperty(t *testing.T, name string) string {
	t.Helper()
	return strings.TrimSpace(mustRun(t, "systemctl", "show", "--value", "-p", name, pkgName))
}

func unitMainPID(t *testing.T) int {
	t.Helper()
	pid, err := strconv.Atoi(unitProperty(t, "MainPID"))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// procCgroup is a process's cgroup v2 path.
func procCgroup(t *testing.T, pid string) string {
	t.Helper()
	data := readFile(t, "/proc/"+pid+"/cgroup")
	return strings.TrimPrefix(strings.TrimSpace(string(data)), "0::")
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
