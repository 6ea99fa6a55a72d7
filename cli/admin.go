package cli

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// drainPoll paces drain --wait.
const drainPoll = 500 * time.Millisecond

func runPS(ctx context.Context, inv *invocation) error {
	if len(inv.args) > 0 {
		return usageError("ps takes no argument")
	}
	c, err := inv.connect(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	callCtx, cancel := unary(ctx)
	defer cancel()
	list, err := c.admin.ListExecutions(callCtx, &fluxpb.ListExecutionsRequest{})
	if err != nil {
		return c.explain(err)
	}
	if inv.json {
		return writeProtoJSON(inv.env.Stdout, list)
	}
	if len(list.GetExecutions()) == 0 {
		fmt.Fprintln(inv.env.Stdout, "no execution is running or queued")
		return nil
	}
	tw := tabwriter.NewWriter(inv.env.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "EXECUTION\tFUNCTION\tSTATE\tAGE\tUID\tMEMORY\tCPU\tOUTPUT")
	for _, e := range list.GetExecutions() {
		state := "running"
		if e.GetQueued() {
			state = "queued"
		}
		if e.GetAsync() {
			state += " (async)"
		}
		uid, mem, cpu := "-", "-", "-"
		if e.GetPid() != 0 {
			uid = fmt.Sprint(e.GetUid())
			mem = formatBytes(int64(e.GetMemoryBytes()))
			if l := e.GetMemoryLimitBytes(); l > 0 {
				mem += "/" + formatBytes(l)
			}
			cpu = formatDuration(time.Duration(e.GetCpuTimeMs()) * time.Millisecond)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", e.GetExecutionId(), e.GetFunctionName(), state,
			formatDuration(time.Duration(e.GetAgeMs())*time.Millisecond), uid, mem, cpu, formatBytes(e.GetOutputBytes()))
	}
	return tw.Flush()
}

func runFunctions(ctx context.Context, inv *invocation) error {
	if len(inv.args) > 0 {
		return usageError("functions takes no argument")
	}
	c, err := inv.connect(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	callCtx, cancel := unary(ctx)
	defer cancel()
	list, err := c.admin.ListFunctions(callCtx, &fluxpb.ListFunctionsRequest{})
	if err != nil {
		return c.explain(err)
	}
	if inv.json {
		return writeProtoJSON(inv.env.Stdout, list)
	}
	if len(list.GetFunctions()) == 0 {
		fmt.Fprintln(inv.env.Stdout, "no function is registered (flux-agent deploy DIR --name N --handler H registers one)")
		return nil
	}
	tw := tabwriter.NewWriter(inv.env.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "FUNCTION\tHANDLER\tVERSION\tMEMORY\tTIMEOUT\tCONCURRENCY\tACTIVE\tENV")
	for _, f := range list.GetFunctions() {
		cfg := f.GetConfig()
		version := f.GetVersion()
		if version == "" {
			version = "(not deployed)"
		}
		mem, timeout, conc := "default", "default", "unlimited"
		if cfg.GetMemoryMb() > 0 {
			mem = formatBytes(cfg.GetMemoryMb() << 20)
		}
		if cfg.GetTimeoutSeconds() > 0 {
			timeout = formatDuration(time.Duration(cfg.GetTimeoutSeconds()) * time.Second)
		}
		if cfg.GetMaxConcurrency() > 0 {
			conc = fmt.Sprintf("%d, %s", cfg.GetMaxConcurrency(), cfg.GetMaxConcurrencyBehavior())
		}
		keys := make([]string, 0, len(cfg.GetEnv()))
		for k := range cfg.GetEnv() {
			keys = append(keys, k) // values may be secrets: keys only
		}
		sort.Strings(keys)
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", cfg.GetName(), cfg.GetHandler(), version, mem, timeout, conc, f.GetRunning(), strings.Join(keys, ","))
	}
	return tw.Flush()
}

func runCancel(ctx context.Context, inv *invocation) error {
	id, err := inv.arg("execution id")
	if err != nil {
		return err
	}
	c, err := inv.connect(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	callCtx, cancel := unary(ctx)
	defer cancel()
	resp, err := c.agent.CancelExecution(callCtx, &fluxpb.CancelExecutionRequest{ExecutionId: id})
	if err != nil {
		return c.explain(err)
	}
	if inv.json {
		if err := writeProtoJSON(inv.env.Stdout, resp); err != nil {
			return err
		}
		if !resp.GetSuccess() {
			return exitCode(1)
		}
		return nil
	}
	if !resp.GetSuccess() {
		return errors.New(resp.GetMessage())
	}
	fmt.Fprintln(inv.env.Stdout, resp.GetMessage())
	return nil
}

// runStatus shows the agent as `systemctl status` would want to: over
// --addr, what AgentService tells (health and node status).
func runStatus(ctx context.Context, inv *invocation) error {
	if len(inv.args) > 0 {
		return usageError("status takes no argument")
	}
	c, err := inv.connect(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	callCtx, cancel := unary(ctx)
	defer cancel()
	var st *fluxpb.StatusResponse
	if c.hasAdmin() {
		if st, err = c.admin.Status(callCtx, &fluxpb.StatusRequest{}); err != nil {
			return c.explain(err)
		}
	} else {
		hc, err := c.agent.HealthCheck(callCtx, &fluxpb.HealthCheckRequest{})
		if err != nil {
			return c.explain(err)
		}
		node, err := c.agent.ReportNodeStatus(callCtx, &fluxpb.NodeStatusRequest{})
		if err != nil {
			return c.explain(err)
		}
		st = &fluxpb.StatusResponse{AgentId: node.GetAgentId(), Version: hc.GetVersion(), Healthy: hc.GetHealthy(), Node: node, Running: node.GetActiveTasks()}
	}
	if inv.json {
		return writeProtoJSON(inv.env.Stdout, st)
	}
	writeStatus(inv.env.Stdout, st, c.hasAdmin(), c.where)
	if !st.GetHealthy() {
		return exitCode(1)
	}
	return nil
}

func runDrain(ctx context.Context, inv *invocation) error {
	if len(inv.args) > 0 {
		return usageError("drain takes no argument")
	}
	c, err := inv.connect(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	callCtx, cancel := unary(ctx)
	resp, err := c.admin.Drain(callCtx, &fluxpb.DrainRequest{})
	cancel()
	if err != nil {
		return c.explain(err)
	}
	if inv.json && !inv.wait {
		return writeProtoJSON(inv.env.Stdout, resp)
	}
	if !inv.json {
		fmt.Fprintf(inv.env.Stdout, "draining: %d running, %d queued go on to their end.\n"+
			"New executions are refused with \"at capacity\": Flux answers 503 for functions with behaviour exit\n"+
			"and retries those with behaviour wait every 500 ms; HealthCheck says unhealthy. Undo: flux-agent undrain\n",
			resp.GetRunning(), resp.GetQueued())
	}
	if !inv.wait {
		return nil
	}
	for running, queued := resp.GetRunning(), resp.GetQueued(); running+queued > 0; {
		select {
		case <-time.After(drainPoll):
		case <-ctx.Done():
			return exitCode(exitInterrupted)
		}
		callCtx, cancel := unary(ctx)
		st, err := c.admin.Status(callCtx, &fluxpb.StatusRequest{})
		cancel()
		if err != nil {
			return c.explain(err)
		}
		if st.GetRunning() != running || st.GetQueued() != queued {
			running, queued = st.GetRunning(), st.GetQueued()
			if !inv.json {
				fmt.Fprintf(inv.env.Stdout, "%d running, %d queued\n", running, queued)
			}
		}
	}
	if inv.json {
		return writeProtoJSON(inv.env.Stdout, &fluxpb.DrainResponse{})
	}
	fmt.Fprintln(inv.env.Stdout, "drained: nothing runs or waits")
	return nil
}

func runUndrain(ctx context.Context, inv *invocation) error {
	if len(inv.args) > 0 {
		return usageError("undrain takes no argument")
	}
	c, err := inv.connect(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	callCtx, cancel := unary(ctx)
	defer cancel()
	if _, err := c.admin.Undrain(callCtx, &fluxpb.UndrainRequest{}); err != nil {
		return c.explain(err)
	}
	if inv.json {
		return writeJSON(inv.env.Stdout, map[string]bool{"draining": false})
	}
	fmt.Fprintln(inv.env.Stdout, "undrained: new executions are taken again")
	return nil
}

// writeProtoJSON prints a reply as JSON with the proto's own field names.
func writeProtoJSON(w interface{ Write([]byte) (int, error) }, m proto.Message) error {
	data, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = w.Write(append(data, '\n'))
	return err
}
