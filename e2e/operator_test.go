//go:build !windows

// The admin endpoint is a Unix socket here; Windows' (a loopback port with
// a token) is built, not run, by CI.

package e2e

// The operator's side: the flux-agent client subcommands run as separate
// processes of the real binary against a running agent, over its admin
// socket and over its gRPC port with mTLS; doctor on good and broken
// hosts; the admin socket refused to anyone but root.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// cliResult is one finished run of the client.
type cliResult struct {
	stdout, stderr string
	code           int
}

func (r cliResult) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// cliEnv is the client's environment: the agent's config (which names its
// admin socket) and nothing of the test's.
func (a *agent) cliEnv() []string {
	return []string{"AGENT_CONFIG=" + a.ConfigPath, "PATH=" + os.Getenv("PATH")}
}

// cli runs the client against a and waits for it.
func (a *agent) cli(t *testing.T, args ...string) cliResult {
	t.Helper()
	return runCLI(t, a.cliEnv(), nil, args...)
}

// runCLI runs the binary as a client with env, as cred's user when set.
func runCLI(t *testing.T, env []string, cred *syscall.Credential, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, agentBinary, args...)
	cmd.Env = env
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		cmd.Dir = "/"
	}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("flux-agent %v still running after 60s:\n%s", args, errOut.String())
	}
	res := cliResult{stdout: out.String(), stderr: errOut.String()}
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		res.code = exit.ExitCode()
	case err != nil:
		t.Fatalf("flux-agent %v: %v", args, err)
	}
	return res
}

// expect checks a run's exit code and that its output holds each of
// words.
func expect(t *testing.T, r cliResult, code int, words ...string) {
	t.Helper()
	if r.code != code {
		t.Fatalf("exit code %d, want %d:\n%s", r.code, code, r)
	}
	for _, w := range words {
		if !strings.Contains(r.stdout+r.stderr, w) {
			t.Errorf("output lacks %q:\n%s", w, r)
		}
	}
}

// liveCLI is a client process whose stdout the test reads as it comes.
type liveCLI struct {
	cmd    *exec.Cmd
	lines  chan string  // closed once the process exited and its output is read
	stdout bytes.Buffer // the lines read so far
	stderr *syncBuffer
	exited chan struct{}
	code   int
}

// lineWriter hands each complete line written to it to a channel.
type lineWriter struct {
	partial []byte
	lines   chan<- string
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.partial = append(w.partial, p...)
	for {
		i := bytes.IndexByte(w.partial, '\n')
		if i < 0 {
			return len(p), nil
		}
		w.lines <- string(w.partial[:i])
		w.partial = w.partial[i+1:]
	}
}

func (a *agent) startCLI(t *testing.T, args ...string) *liveCLI {
	t.Helper()
	cmd := exec.Command(agentBinary, args...)
	cmd.Env = a.cliEnv()
	lines := make(chan string, 10000)
	l := &liveCLI{cmd: cmd, lines: lines, stderr: &syncBuffer{}, exited: make(chan struct{})}
	out := &lineWriter{lines: lines}
	cmd.Stdout, cmd.Stderr = out, l.stderr
	t.Cleanup(func() {
		if cmd.Process != nil {
			cmd.Process.Kill()
			<-l.exited
		}
	})
	return l
}

// start runs the process (after the test changed cmd, e.g. its Env).
func (l *liveCLI) start(t *testing.T) *liveCLI {
	t.Helper()
	if err := l.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		err := l.cmd.Wait() // returns once stdout is copied out
		if w := l.cmd.Stdout.(*lineWriter); len(w.partial) > 0 {
			l.lines <- string(w.partial)
		}
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			l.code = exit.ExitCode()
		} else if err != nil {
			l.code = -1
		}
		close(l.lines)
		close(l.exited)
	}()
	return l
}

// waitLine reads lines until one holds want, failing after timeout.
func (l *liveCLI) waitLine(t *testing.T, want string, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case line, ok := <-l.lines:
			if !ok {
				t.Fatalf("output ended before %q; stdout so far %q, stderr %q", want, l.stdout.String(), l.stderr.String())
			}
			l.stdout.WriteString(line + "\n")
			if strings.Contains(line, want) {
				return
			}
		case <-deadline:
			t.Fatalf("no %q within %s; stdout so far %q, stderr %q", want, timeout, l.stdout.String(), l.stderr.String())
		}
	}
}

// wait reads the rest of the output and waits for the exit code.
func (l *liveCLI) wait(t *testing.T) int {
	t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		select {
		case line, ok := <-l.lines:
			if !ok {
				<-l.exited
				return l.code
			}
			l.stdout.WriteString(line + "\n")
		case <-deadline:
			t.Fatalf("client did not end its output; stdout %q, stderr %q", l.stdout.String(), l.stderr.String())
		}
	}
}

// codeDir writes a function's code: handler.sh with body, executable.
func codeDir(t *testing.T, body string) string {
	t.Helper()
	dir := t.TempDir()
	os.Chmod(filepath.Dir(dir), 0o755)
	os.Chmod(dir, 0o755)
	if err := os.WriteFile(filepath.Join(dir, "handler.sh"), []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// liveScript prints a line, waits for the trigger file named by $1, then
// prints another and exits with 4.
const liveScript = `echo "first line"
while [ ! -e "$1" ]; do sleep 0.02; done
echo "second line"
exit 4
`

// codesScript exits with $1, or is killed by SIGKILL.
const codesScript = `case "$1" in
kill) kill -KILL $$ ;;
*) echo "exiting with $1"; exit "$1" ;;
esac
`

var whitespace = regexp.MustCompile(`\s+`)

// squeeze collapses runs of spaces (table columns) for matching.
func squeeze(s string) string { return whitespace.ReplaceAllString(s, " ") }

func TestOperatorClientOverSocket(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{})
	if a.AdminSocket == "" {
		t.Fatal("the agent reports no admin socket")
	}

	expect(t, a.cli(t, "status"), 0, "healthy", "answers in")
	expect(t, a.cli(t, "deploy", "../examples/hello-sh", "--name", "hello", "--handler", "handler.sh"), 0, "deployed as version")
	r := a.cli(t, "invoke", "hello", "--", "Ada")
	expect(t, r, 0, "hello, Ada", "step 3 of 3")
	expect(t, a.cli(t, "deploy", codeDir(t, codesScript), "--name", "codes", "--handler", "handler.sh", "--env", "A=1"), 0)
	expect(t, a.cli(t, "deploy", codeDir(t, liveScript), "--name", "live", "--handler", "handler.sh", "--timeout", "60"), 0)

	t.Run("exit codes", func(t *testing.T) {
		expect(t, a.cli(t, "invoke", "codes", "--", "0"), 0, "exiting with 0")
		expect(t, a.cli(t, "invoke", "codes", "--", "42"), 42, "exiting with 42", "failed: exit code 42")
		expect(t, a.cli(t, "invoke", "codes", "--", "kill"), 137, "killed by signal 9")
		expect(t, a.cli(t, "invoke", "nosuch"), 125, "not registered")
	})

	t.Run("functions", func(t *testing.T) {
		r := a.cli(t, "functions")
		expect(t, r, 0)
		if !strings.Contains(squeeze(r.stdout), "codes handler.sh 000001-") || !strings.Contains(r.stdout, "A") {
			t.Errorf("functions:\n%s", r.stdout)
		}
		var list struct {
			Functions []struct {
				Config  struct{ Name, Handler string } `json:"config"`
				Version string                         `json:"version"`
			} `json:"functions"`
		}
		r = a.cli(t, "functions", "--json")
		if err := json.Unmarshal([]byte(r.stdout), &list); err != nil || len(list.Functions) != 3 || list.Functions[0].Config.Name != "codes" || list.Functions[0].Version == "" {
			t.Errorf("functions --json: %v\n%s", err, r)
		}
	})

	t.Run("invoke prints output as it comes, ps lists it", func(t *testing.T) {
		tr := newTrigger(t)
		inv := a.startCLI(t, "invoke", "live", "--id", newID(), "--", string(tr)).start(t)
		inv.waitLine(t, "first line", 30*time.Second) // the function waits: it has not ended
		r := a.cli(t, "ps")
		expect(t, r, 0)
		if !strings.Contains(squeeze(r.stdout), "live running") {
			t.Errorf("ps while live runs:\n%s", r.stdout)
		}
		var list struct {
			Executions []struct {
				FunctionName string `json:"function_name"`
				UID          int    `json:"uid"`
				Pid          int    `json:"pid"`
				AgeMS        string `json:"age_ms"`
			} `json:"executions"`
		}
		r = a.cli(t, "ps", "--json")
		if err := json.Unmarshal([]byte(r.stdout), &list); err != nil || len(list.Executions) != 1 || list.Executions[0].FunctionName != "live" || list.Executions[0].Pid == 0 {
			t.Fatalf("ps --json: %v\n%s", err, r)
		}
		if os.Geteuid() == 0 && list.Executions[0].UID < 3_100_000 {
			t.Errorf("uid %d is not from the agent's range", list.Executions[0].UID)
		}
		tr.fire(t)
		if code := inv.wait(t); code != 4 {
			t.Errorf("invoke exit %d, want the function's 4; stderr %s", code, inv.stderr.String())
		}
		if !strings.Contains(inv.stdout.String(), "second line") {
			t.Errorf("stdout %q", inv.stdout.String())
		}
	})

	t.Run("logs -f sees output before the end", func(t *testing.T) {
		tr := newTrigger(t)
		r := a.cli(t, "invoke", "live", "--async", "--", string(tr))
		expect(t, r, 0)
		id := strings.TrimSpace(r.stdout)
		logs := a.startCLI(t, "logs", "-f", id).start(t)
		logs.waitLine(t, "first line", 30*time.Second)
		select {
		case <-logs.exited:
			t.Fatal("logs -f ended before the execution")
		default:
		}
		tr.fire(t)
		if code := logs.wait(t); code != 0 {
			t.Errorf("logs -f exit %d: %s", code, logs.stderr.String())
		}
		if !strings.Contains(logs.stdout.String(), "second line") || !strings.Contains(logs.stderr.String(), "failed: exit code 4") {
			t.Errorf("logs -f: %q %q", logs.stdout.String(), logs.stderr.String())
		}
		expect(t, a.cli(t, "logs", id), 0, "first line\nsecond line\n")
		r = a.cli(t, "logs", "--json", id)
		var rec record
		if err := json.Unmarshal([]byte(r.stdout), &rec); err != nil || rec.ExitCode == nil || *rec.ExitCode != 4 || rec.Output != "first line\nsecond line\n" {
			t.Errorf("logs --json: %v\n%s", err, r)
		}
		expect(t, a.cli(t, "logs", "exc-nobody"), 1, "not known to this agent")
	})

	t.Run("invoke --async --follow", func(t *testing.T) {
		expect(t, a.cli(t, "invoke", "codes", "--async", "--follow", "--", "5"), 5, "exiting with 5")
	})

	t.Run("cancel", func(t *testing.T) {
		r := a.cli(t, "invoke", "live", "--async", "--", string(newTrigger(t)))
		id := strings.TrimSpace(r.stdout)
		expect(t, a.cli(t, "cancel", id), 0, "cancelled")
		expect(t, a.cli(t, "cancel", id), 1, "already finished")
	})

	t.Run("Ctrl-C cancels the invoked execution", func(t *testing.T) {
		id := newID()
		inv := a.startCLI(t, "invoke", "live", "--id", id, "--", string(newTrigger(t))).start(t)
		inv.waitLine(t, "first line", 30*time.Second)
		inv.cmd.Process.Signal(os.Interrupt)
		if code := inv.wait(t); code != 130 {
			t.Errorf("exit %d after Ctrl-C, want 130; stderr %s", code, inv.stderr.String())
		}
		if rec := getRecord(t, a.client(t), id); rec == nil || rec.Status != "cancelled" {
			t.Errorf("record after Ctrl-C: %+v", rec)
		}
	})

	t.Run("drain and undrain", func(t *testing.T) {
		expect(t, a.cli(t, "drain"), 0, "draining", "at capacity")
		expect(t, a.cli(t, "invoke", "codes", "--", "0"), 125, "at capacity")
		r := a.cli(t, "status")
		expect(t, r, 1)
		if !strings.Contains(squeeze(r.stdout), "draining yes") || !strings.Contains(r.stdout, "unhealthy") {
			t.Errorf("status while draining:\n%s", r.stdout)
		}
		expect(t, a.cli(t, "drain", "--wait"), 0, "drained")
		expect(t, a.cli(t, "undrain"), 0, "undrained")
		expect(t, a.cli(t, "invoke", "codes", "--", "0"), 0)
	})

	t.Run("status --json", func(t *testing.T) {
		var st struct {
			Healthy    bool   `json:"healthy"`
			AgentID    string `json:"agent_id"`
			Version    string `json:"version"`
			RedisRttUs string `json:"redis_rtt_us"`
			Isolation  struct {
				Cgroup string `json:"cgroup"`
			} `json:"isolation"`
		}
		r := a.cli(t, "status", "--json")
		if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || !st.Healthy || st.Version != "e2e-test" || st.Isolation.Cgroup == "" {
			t.Errorf("status --json: %v\n%s", err, r)
		}
	})

	t.Run("doctor on a good host", func(t *testing.T) {
		r := a.cli(t, "doctor")
		expect(t, r, 0, "✓ redis_addr", "held by the running agent", "✓ apps_dir")
		if strings.Contains(r.stdout, "✗") {
			t.Errorf("a failed check on a good host:\n%s", r.stdout)
		}
	})
}

// TestTailReconnectOverSocket follows an execution over the real admin
// socket, drops the stream half-way and takes it up from the bytes it got:
// nothing is lost or repeated.
func TestTailReconnectOverSocket(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{})
	conn, err := grpc.NewClient("unix:"+a.AdminSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	admin, agent := fluxpb.NewAdminServiceClient(conn), fluxpb.NewAgentServiceClient(conn)
	tr := newTrigger(t)
	// 400 KB, a wait, 400 KB more: the tail's chunks split the parts.
	install(t, agent, fn{Name: "big", Script: fmt.Sprintf(`i=0; while [ $i -lt 10000 ]; do echo "first part line $i is forty bytes long.."; i=$((i+1)); done
%si=0; while [ $i -lt 10000 ]; do echo "second part line $i is forty bytes long."; i=$((i+1)); done
`, tr.waitScript())})
	id := execAsync(t, agent, "big")

	ctx1, cancel1 := context.WithCancel(context.Background())
	stream, err := admin.TailExecution(ctx1, &fluxpb.TailExecutionRequest{ExecutionId: id, Follow: true})
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	for !strings.Contains(got.String(), "first part line 9999") {
		msg, err := stream.Recv()
		if err != nil {
			t.Fatalf("tail: %v after %d bytes", err, got.Len())
		}
		chunk := msg.GetOutput()
		if chunk == nil || chunk.GetOffset() != int64(got.Len()) {
			t.Fatalf("message %v at %d", msg, got.Len())
		}
		got.Write(chunk.GetData())
	}
	cancel1() // the client goes away in the middle of the execution
	tr.fire(t)

	ctx2, cancel2 := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel2()
	stream, err = admin.TailExecution(ctx2, &fluxpb.TailExecutionRequest{ExecutionId: id, Offset: int64(got.Len()), Follow: true})
	if err != nil {
		t.Fatal(err)
	}
	var end *fluxpb.ExecutionEnd
	for end == nil {
		msg, err := stream.Recv()
		if err != nil {
			t.Fatalf("tail after the reconnect: %v after %d bytes", err, got.Len())
		}
		if chunk := msg.GetOutput(); chunk != nil {
			if chunk.GetOffset() != int64(got.Len()) {
				t.Fatalf("chunk at %d, want %d", chunk.GetOffset(), got.Len())
			}
			got.Write(chunk.GetData())
		}
		end = msg.GetEnd()
	}
	rec := getRecord(t, agent, id)
	if rec.Status != "success" || got.String() != rec.Output || !strings.HasPrefix(rec.Output, "first part line 0 ") ||
		!strings.HasSuffix(rec.Output, "second part line 9999 is forty bytes long.\n") || !end.GetFinal() {
		t.Fatalf("tail got %d bytes, the record holds %d (status %s); equal: %v", got.Len(), len(rec.Output), rec.Status, got.String() == rec.Output)
	}
}

// tlsClientFlags writes a client certificate of Flux's CA and returns the
// client's --addr and --tls-* flags.
func tlsClientFlags(t *testing.T, pki *fluxPKI, addr string) []string {
	dir := t.TempDir()
	files := map[string][]byte{"ca.pem": pki.CA.PEM, "client.pem": pki.Client.CertPEM, "client-key.pem": pki.Client.KeyPEM}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), body, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return []string{"--addr", addr, "--tls-ca", filepath.Join(dir, "ca.pem"),
		"--tls-cert", filepath.Join(dir, "client.pem"), "--tls-key", filepath.Join(dir, "client-key.pem")}
}

func TestOperatorClientOverMTLS(t *testing.T) {
	rs := startRedis(t)
	pki := newFluxPKI(t)
	certDir := t.TempDir()
	pki.writeAgentFiles(t, certDir)
	a := startAgent(t, rs, agentOptions{YAML: tlsYAML(filepath.Join(certDir, "ca.pem"),
		filepath.Join(certDir, "agent.pem"), filepath.Join(certDir, "agent-key.pem"))})
	flags := tlsClientFlags(t, pki, a.Addr)
	// No AGENT_CONFIG: a client on another host knows only the address.
	env := []string{"PATH=" + os.Getenv("PATH")}
	cli := func(args ...string) cliResult { // the flags before any "--"
		t.Helper()
		return runCLI(t, env, nil, append(append([]string{args[0]}, flags...), args[1:]...)...)
	}

	expect(t, cli("status"), 0, "healthy", "AgentService only")
	expect(t, cli("deploy", codeDir(t, codesScript), "--name", "codes", "--handler", "handler.sh"), 0, "deployed")
	expect(t, cli("deploy", codeDir(t, liveScript), "--name", "live", "--handler", "handler.sh"), 0, "deployed")
	expect(t, cli("invoke", "codes", "--", "7"), 7, "exiting with 7")
	expect(t, cli("invoke", "codes", "--", "kill"), 137)

	tr := newTrigger(t)
	args := append([]string{"invoke", "live", "--async", "--follow"}, flags...)
	follow := a.startCLI(t, append(args, "--", string(tr))...)
	follow.cmd.Env = env
	follow.start(t)
	follow.waitLine(t, "first line", 30*time.Second) // by polling GetExecution
	tr.fire(t)
	if code := follow.wait(t); code != 4 || !strings.Contains(follow.stdout.String(), "second line") {
		t.Errorf("invoke --async --follow over mTLS: exit %d, %q, %s", code, follow.stdout.String(), follow.stderr.String())
	}

	r := cli("invoke", "codes", "--async", "--", "0")
	id := strings.TrimSpace(r.stdout)
	expect(t, r, 0)
	flux := fluxpb.NewAgentServiceClient(a.dial(t, tlsCreds(pki.clientConfig(pki.Client.TLS))))
	waitRecord(t, flux, id, 30*time.Second, "final", isFinal)
	expect(t, cli("logs", id), 0, "exiting with 0")
	expect(t, cli("cancel", id), 1, "already finished")

	for _, cmd := range []string{"ps", "functions", "drain", "undrain"} {
		expect(t, cli(cmd), 1, "needs the agent's admin socket")
	}
	// Without a client certificate the agent refuses the connection.
	expect(t, runCLI(t, env, nil, "status", "--addr", a.Addr, "--tls-ca", flags[3]), 2, "needs all three")
	expect(t, runCLI(t, env, nil, "status", "--addr", a.Addr), 1, "did not answer")
}

// TestAdminSocketRefusedToOthers: only root gets in, whether the socket's
// directory or its own mode stands in the way, and a function, which runs
// as another uid on the same host, does not.
func TestAdminSocketRefusedToOthers(t *testing.T) {
	requireRoot(t)
	requireRunner(t)
	rs := startRedis(t)
	// The directory made by the agent (0700), and one that lets everyone
	// through, where the socket's own mode is the only guard.
	open := t.TempDir()
	os.Chmod(filepath.Dir(open), 0o755)
	os.Chmod(open, 0o755)
	for _, tc := range []struct {
		name, socket string
		dirMode      os.FileMode
	}{
		{"directory made by the agent", filepath.Join(t.TempDir(), "run", "admin.sock"), 0o700},
		{"directory open to all", filepath.Join(open, "admin.sock"), 0o755},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := startAgent(t, rs, agentOptions{YAML: "admin:\n  socket: " + tc.socket + "\n"})
			if a.AdminSocket != tc.socket {
				t.Fatalf("admin socket %q, want %q", a.AdminSocket, tc.socket)
			}
			fi, err := os.Stat(tc.socket)
			if err != nil {
				t.Fatal(err)
			}
			st := fi.Sys().(*syscall.Stat_t)
			if fi.Mode().Perm() != 0o600 || fi.Mode().Type() != os.ModeSocket || st.Uid != 0 {
				t.Errorf("socket mode %s, owner %d", fi.Mode(), st.Uid)
			}
			if di, _ := os.Stat(filepath.Dir(tc.socket)); di.Mode().Perm() != tc.dirMode {
				t.Errorf("directory mode %s, want %s", di.Mode().Perm(), tc.dirMode)
			}
			env := []string{"PATH=/usr/bin:/bin"}
			for _, name := range []string{"nobody", "flux-runner"} {
				u, err := user.Lookup(name)
				if err != nil {
					continue
				}
				uid, _ := strconv.Atoi(u.Uid)
				gid, _ := strconv.Atoi(u.Gid)
				r := runCLI(t, env, &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, "status", "--socket", tc.socket)
				expect(t, r, 1, "permission denied", "run this as root")
			}
			expect(t, runCLI(t, env, nil, "status", "--socket", tc.socket), 0, "healthy") // root

			// A function tries the same from inside its sandbox.
			c := a.client(t)
			install(t, c, fn{Name: "reach", Script: fmt.Sprintf("%s status --socket %s\necho \"exit $?\"\n", agentBinary, tc.socket)})
			resp, _ := execSync(t, c, "reach")
			out := string(resp.GetOutput())
			if !strings.Contains(out, "permission denied") || !strings.Contains(out, "exit 1") || strings.Contains(out, "healthy") {
				t.Errorf("a function reached the admin socket, or failed otherwise: %q %q", out, resp.GetError())
			}
		})
	}
}

// doctorConfig writes a config for doctor and for an agent that may not
// start.
func doctorConfig(t *testing.T, redisAddr, extra string) string {
	t.Helper()
	dir := t.TempDir()
	os.Chmod(filepath.Dir(dir), 0o755)
	os.Chmod(dir, 0o755)
	adminDir, err := os.MkdirTemp("", "adm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(adminDir) })
	cfg := mergeYAML(fmt.Sprintf(`agent_id: e2e-doctor-%d
listen_address: 127.0.0.1
port: 0
redis_addr: redis://%s
apps_dir: %s
telemetry:
  metrics_address: ""
sandbox:
  scratch_dir: %s
  uid_range: %s
  network: %s
network:
  public_ip_url: ""
admin:
  socket: %s
`, agentCount.Add(1), redisAddr, filepath.Join(dir, "apps"), dir, nextUIDRange(), testNetwork(), filepath.Join(adminDir, "admin.sock")), extra)
	path := filepath.Join(dir, "agent.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// failedLines are the ✗ lines of a doctor's output.
func failedLines(out string) []string {
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "✗ ") {
			lines = append(lines, l)
		}
	}
	return lines
}

// TestDoctorAndStartOnBrokenHosts: doctor names what is broken and the
// fix, and exits 1; where every execution would fail, the agent refuses to
// start with the same words.
func TestDoctorAndStartOnBrokenHosts(t *testing.T) {
	rs := startRedis(t)
	private := t.TempDir()
	os.Chmod(filepath.Dir(private), 0o755)
	os.Chmod(private, 0o700)
	cases := []struct {
		name, check, yaml string
		root              bool
		refusesStart      bool
		redis             string
		words             []string
	}{
		{name: "runner missing", check: "sandbox.run_as_user", root: true, refusesStart: true,
			yaml:  "sandbox:\n  run_as_user: nosuch-e2e-runner\n  network: host\n",
			words: []string{`user "nosuch-e2e-runner" does not exist`, "useradd --system"}},
		{name: "apps_dir unreachable", check: "apps_dir", root: true, refusesStart: true,
			yaml:  "apps_dir: " + filepath.Join(private, "apps") + "\n",
			words: []string{"cannot enter " + private, "permission denied", "chmod o+x " + private}},
		{name: "redis down", check: "redis_addr", redis: fmt.Sprintf("127.0.0.1:%d", freePort(t)),
			words: []string{"does not answer", "systemctl start redis-server"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.root {
				requireRoot(t)
				requireRunner(t)
			}
			redisAddr := rs.Addr
			if tc.redis != "" {
				redisAddr = tc.redis
			}
			path := doctorConfig(t, redisAddr, tc.yaml)
			env := []string{"AGENT_CONFIG=" + path, "PATH=" + os.Getenv("PATH")}
			r := runCLI(t, env, nil, "doctor")
			expect(t, r, 1, append([]string{"✗ " + tc.check + ": "}, tc.words...)...)
			failed := failedLines(r.stdout)
			if !tc.refusesStart {
				return
			}
			start := runCLI(t, env, nil) // the agent itself
			if start.code != 1 || strings.Contains(start.stderr, "flux-agent started") {
				t.Fatalf("the agent did not refuse to start:\n%s", start)
			}
			for _, line := range failed {
				if !strings.Contains(start.stderr, line) {
					t.Errorf("the agent's refusal lacks doctor's line\n%s\nstderr:\n%s", line, start.stderr)
				}
			}
		})
	}
}
