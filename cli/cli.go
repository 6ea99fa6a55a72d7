// Package cli is the operator's client, in the agent's own binary:
// `flux-agent deploy`, `invoke`, `logs`, `ps`, `cancel`, `functions`,
// `status`, `drain`, `undrain` and `doctor`. It talks to the agent's local
// admin endpoint (a root-only Unix socket; a loopback port with a token on
// Windows), where the agent serves Flux's AgentService and its own
// AdminService, or with --addr to the agent's gRPC port as Flux does (mTLS
// with --tls-*), where only AgentService is served.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/serverless-fabric/flux-agent/doctor"
)

// Env is what the client takes from the agent's binary: where the admin
// endpoint is by the agent's configuration, and how doctor reads it.
type Env struct {
	Stdout, Stderr io.Writer
	// AdminSocket is admin.socket (Linux); AdminAddress and
	// AdminTokenFile are admin.address and admin.token_file (Windows).
	AdminSocket    string
	AdminAddress   string
	AdminTokenFile string
	// Doctor returns the doctor's view of the agent's configuration, or
	// why the configuration cannot be read.
	Doctor func() (doctor.Config, error)
}

// command is one subcommand.
type command struct {
	name, args, summary string
	// admin: it needs the AdminService, so the admin endpoint, not --addr.
	admin bool
	run   func(ctx context.Context, c *invocation) error
}

var commands = []command{
	{"deploy", "DIR --name N --handler H [--env K=V]…", "zip DIR, register and deploy it as function N", false, runDeploy},
	{"invoke", "N [--async] [--follow] [-- ARGS…]", "run function N, print its output as it comes, exit with its exit code", false, runInvoke},
	{"logs", "[-f] ID", "print an execution's output (-f: follow it to its end)", false, runLogs},
	{"ps", "", "list running and queued executions", true, runPS},
	{"cancel", "ID", "cancel an execution", false, runCancel},
	{"functions", "", "list registered functions and their deployed versions", true, runFunctions},
	{"status", "", "health, version, isolation, load, Redis round trip", false, runStatus},
	{"drain", "[--wait]", "refuse new executions, let running ones finish", true, runDrain},
	{"undrain", "", "take new executions again", true, runUndrain},
	{"doctor", "", "check this host and the config; exits 1 when executions cannot run", false, runDoctor},
}

// IsCommand says whether name is one of the client's subcommands.
func IsCommand(name string) bool {
	return slices.ContainsFunc(commands, func(c command) bool { return c.name == name })
}

// Usage lists the subcommands, for the binary's --help.
func Usage(w io.Writer) {
	fmt.Fprintln(w, "Operator commands (to the agent's admin socket, as root; or --addr HOST:PORT with --tls-ca/--tls-cert/--tls-key):")
	for _, c := range commands {
		line := "flux-agent " + c.name
		if c.args != "" {
			line += " " + c.args
		}
		note := ""
		if c.admin {
			note = " [socket only]"
		}
		fmt.Fprintf(w, "  %-57s %s%s\n", line, c.summary, note)
	}
	fmt.Fprintln(w, `
  Every command takes --json (output for scripts), --socket PATH (default: admin.socket of
  the config AGENT_CONFIG names), or --addr HOST:PORT [--tls-ca F --tls-cert F --tls-key F]
  to reach the agent's gRPC port as Flux does: there only deploy, invoke, logs, cancel and
  status work. "flux-agent COMMAND --help" shows a command's flags. invoke exits with the
  function's exit code, 125 when it did not run, 130 when interrupted.`)
}

// Run runs the subcommand args[0] and returns the exit code. ctx ends on
// an interrupt (Ctrl-C).
func Run(ctx context.Context, env Env, args []string) int {
	i := slices.IndexFunc(commands, func(c command) bool { return c.name == args[0] })
	if i < 0 {
		fmt.Fprintf(env.Stderr, "flux-agent: unknown command %q\n", args[0])
		return 2
	}
	cmd := commands[i]
	inv := &invocation{env: env, cmd: cmd}
	fs := flag.NewFlagSet("flux-agent "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	inv.flags(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: flux-agent %s %s\n  %s\n\nFlags:\n", cmd.name, cmd.args, cmd.summary)
		fs.PrintDefaults()
	}
	var err error
	if inv.args, inv.passthrough, err = parseInterleaved(fs, args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	err = cmd.run(ctx, inv)
	var exit exitCode
	switch {
	case err == nil:
		return 0
	case errors.As(err, &exit):
		return int(exit)
	case errors.Is(err, errUsage):
		fmt.Fprintf(env.Stderr, "flux-agent %s: %v\n", cmd.name, err)
		fs.Usage()
		return 2
	}
	fmt.Fprintf(env.Stderr, "flux-agent %s: %v\n", cmd.name, err)
	var withCode codedError
	if errors.As(err, &withCode) {
		return withCode.code
	}
	return 1
}

// exitCode ends a command with a code and no message (the command said
// what it had to).
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit %d", int(e)) }

// codedError is a message and the exit code that goes with it.
type codedError struct {
	err  error
	code int
}

func (e codedError) Error() string { return e.err.Error() }
func (e codedError) Unwrap() error { return e.err }

// errUsage marks a mistake in the command line.
var errUsage = errors.New("usage")

func usageError(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
}

// invocation is one run of a subcommand: its flags, arguments and
// connection.
type invocation struct {
	env         Env
	cmd         command
	args        []string
	passthrough []string // after "--"

	json       bool
	socket     string
	addr       string
	tlsCA      string
	tlsCert    string
	tlsKey     string
	serverName string

	// command flags
	name, handler string
	memory, cpu   int64
	timeout       int
	concurrency   int
	behavior      string
	fnEnv         envFlags
	async, follow bool
	id            string
	wait          bool
}

func (inv *invocation) flags(fs *flag.FlagSet) {
	fs.BoolVar(&inv.json, "json", false, "print JSON for scripts")
	fs.StringVar(&inv.socket, "socket", inv.env.AdminSocket, "the agent's admin socket")
	fs.StringVar(&inv.addr, "addr", "", "reach the agent's gRPC port at HOST:PORT instead (AgentService only)")
	fs.StringVar(&inv.tlsCA, "tls-ca", "", "with --addr: the CA that signed the agent's certificate (Flux's ca.pem)")
	fs.StringVar(&inv.tlsCert, "tls-cert", "", "with --addr: a client certificate the agent's CA signed")
	fs.StringVar(&inv.tlsKey, "tls-key", "", "with --addr: the client certificate's key")
	fs.StringVar(&inv.serverName, "tls-server-name", "flux-agent", "with --addr: the name the agent's certificate must carry")
	switch inv.cmd.name {
	case "deploy":
		fs.StringVar(&inv.name, "name", "", "the function's name (required)")
		fs.StringVar(&inv.handler, "handler", "", "the executable to run, relative to DIR (required)")
		fs.Int64Var(&inv.memory, "memory", 128, "memory limit in MiB (0: the agent's default_memory)")
		fs.Int64Var(&inv.cpu, "cpu", 0, "CPU limit in millicores (0: none)")
		fs.IntVar(&inv.timeout, "timeout", 30, "timeout in seconds (0: the agent's default_timeout)")
		fs.IntVar(&inv.concurrency, "max-concurrency", 5, "executions of the function at once (0: unlimited)")
		fs.StringVar(&inv.behavior, "behavior", "exit", "beyond max-concurrency: exit (refuse) or wait (queue async calls)")
		fs.Var(&inv.fnEnv, "env", "K=V in the function's environment (repeatable)")
	case "invoke":
		fs.BoolVar(&inv.async, "async", false, "return once started, printing the execution id")
		fs.BoolVar(&inv.follow, "follow", false, "with --async: follow the output; Ctrl-C then detaches instead of cancelling")
		fs.StringVar(&inv.id, "id", "", "execution id (default: exc- and a random UUID)")
	case "logs":
		fs.BoolVar(&inv.follow, "f", false, "follow the output until the execution ends")
	case "drain":
		fs.BoolVar(&inv.wait, "wait", false, "wait until nothing runs or waits")
	}
}

// envFlags collects repeated --env K=V.
type envFlags map[string]string

func (e *envFlags) String() string { return "" }

func (e *envFlags) Set(v string) error {
	k, val, ok := strings.Cut(v, "=")
	if !ok || k == "" {
		return fmt.Errorf("%q is not K=V", v)
	}
	if *e == nil {
		*e = envFlags{}
	}
	(*e)[k] = val
	return nil
}

// parseInterleaved parses flags wherever they are among the positional
// arguments (flux-agent deploy DIR --name N); everything after "--" is
// passed through untouched.
func parseInterleaved(fs *flag.FlagSet, args []string) (positional, passthrough []string, err error) {
	if i := slices.Index(args, "--"); i >= 0 {
		args, passthrough = args[:i], slices.Clone(args[i+1:])
	}
	for {
		if err := fs.Parse(args); err != nil {
			return nil, nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return positional, passthrough, nil
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
}

// arg returns the command's only positional argument, named what.
func (inv *invocation) arg(what string) (string, error) {
	switch len(inv.args) {
	case 1:
		return inv.args[0], nil
	case 0:
		return "", usageError("missing %s", what)
	}
	return "", usageError("one %s expected, got %q", what, inv.args)
}
