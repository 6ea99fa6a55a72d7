package cli

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// Exit codes of invoke beside the function's own.
const (
	// exitNotRun: the function did not run (refused, not found, failed to
	// start, the agent unreachable), as docker run's 125.
	exitNotRun = 125
	// exitInterrupted: Ctrl-C (128 + SIGINT).
	exitInterrupted = 130
)

// pollInterval paces following an execution over --addr, where only
// GetExecution is served: Flux's own pace.
const pollInterval = 500 * time.Millisecond

// record is what the client reads of an execution record.
type record struct {
	ExecutionID  string `json:"execution_id"`
	FunctionName string `json:"function_name"`
	Status       string `json:"status"`
	Output       string `json:"output"`
	Error        string `json:"error"`
	DurationMS   int64  `json:"duration_ms"`
	Queued       bool   `json:"queued"`
	ExitCode     *int   `json:"exit_code"`
}

func (r *record) final() bool { return r.Status != "" && r.Status != "running" }

// exitCode is the code invoke ends with for a finished execution.
func (r *record) exitCode() int {
	switch {
	case r.ExitCode != nil:
		return *r.ExitCode
	case r.Status == "success":
		return 0
	case r.Status == "cancelled":
		return exitInterrupted
	}
	return exitNotRun
}

// summary says how an execution ended, for stderr.
func (r *record) summary() string {
	s := r.Status
	if r.Error != "" {
		s += ": " + r.Error
	}
	if r.DurationMS > 0 {
		s += fmt.Sprintf(" (%s)", time.Duration(r.DurationMS)*time.Millisecond)
	}
	return s
}

// newExecutionID makes an id shaped like Flux's: exc- and a random UUID.
func newExecutionID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("exc-%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// runInvoke runs a function. Over the admin socket it starts it async and
// follows its output live; Ctrl-C cancels it (or, with --async --follow,
// leaves it running). Over --addr without --async it is a sync call, as
// Flux makes them.
func runInvoke(ctx context.Context, inv *invocation) error {
	name, err := inv.arg("function name")
	if err != nil {
		return err
	}
	if inv.follow && !inv.async {
		return usageError("--follow goes with --async (without it, invoke follows anyway)")
	}
	id := inv.id
	if id == "" {
		id = newExecutionID()
	}
	c, err := inv.connect(ctx)
	if err != nil {
		return codedError{err, exitNotRun}
	}
	defer c.Close()
	req := &fluxpb.ExecutionRequest{FunctionName: name, Args: inv.passthrough, ExecutionId: id}
	if !inv.async && !c.hasAdmin() {
		return inv.invokeSync(ctx, c, req)
	}
	req.Async = true
	callCtx, cancel := unary(ctx)
	resp, err := c.agent.ExecuteFunction(callCtx, req)
	cancel()
	if err != nil {
		return codedError{c.explain(err), exitNotRun}
	}
	if resp.GetError() != "" {
		return codedError{fmt.Errorf("%s did not start: %s", name, resp.GetError()), exitNotRun}
	}
	if inv.async && !inv.follow {
		if inv.json {
			return writeJSON(inv.env.Stdout, map[string]string{"execution_id": id})
		}
		fmt.Fprintln(inv.env.Stdout, id)
		return nil
	}
	rec, err := inv.followOutput(ctx, c, id, true)
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return inv.interrupted(c, id)
	}
	if err != nil {
		return codedError{err, exitNotRun}
	}
	return inv.finished(c, rec)
}

// interrupted handles Ctrl-C while following: the execution is cancelled,
// unless it was started with --async (then it goes on).
func (inv *invocation) interrupted(c *conn, id string) error {
	if inv.async {
		fmt.Fprintf(inv.env.Stderr, "\nflux-agent: detached; %s goes on: flux-agent logs -f %s\n", id, id)
		return exitCode(exitInterrupted)
	}
	ctx, cancel := unary(context.Background())
	defer cancel()
	resp, err := c.agent.CancelExecution(ctx, &fluxpb.CancelExecutionRequest{ExecutionId: id})
	switch {
	case err != nil:
		fmt.Fprintf(inv.env.Stderr, "\nflux-agent: interrupted, but %s could not be cancelled: %v\n", id, c.explain(err))
	case !resp.GetSuccess():
		fmt.Fprintf(inv.env.Stderr, "\nflux-agent: interrupted: %s\n", resp.GetMessage())
	default:
		fmt.Fprintf(inv.env.Stderr, "\nflux-agent: interrupted: %s cancelled\n", id)
	}
	return exitCode(exitInterrupted)
}

// finished reports a followed execution's end: with --json its record
// (output included), else its status on stderr when it did not succeed;
// the exit code is the function's.
func (inv *invocation) finished(c *conn, rec *record) error {
	if inv.json {
		data, err := getRecord(context.Background(), c, rec.ExecutionID)
		if err != nil {
			return codedError{err, exitNotRun}
		}
		if _, err := inv.env.Stdout.Write(append(data, '\n')); err != nil {
			return err
		}
	} else if rec.Status != "success" {
		fmt.Fprintf(inv.env.Stderr, "flux-agent: %s %s\n", rec.ExecutionID, rec.summary())
	}
	return exitCode(rec.exitCode())
}

// invokeSync is a sync ExecuteFunction, as Flux makes it: the output comes
// at the end. The exit code is read from the record after.
func (inv *invocation) invokeSync(ctx context.Context, c *conn, req *fluxpb.ExecutionRequest) error {
	resp, err := c.agent.ExecuteFunction(ctx, req)
	if status.Code(err) == codes.Canceled && ctx.Err() != nil {
		// The agent cancels a sync execution whose caller went away.
		fmt.Fprintf(inv.env.Stderr, "\nflux-agent: interrupted: %s cancelled\n", req.GetExecutionId())
		return exitCode(exitInterrupted)
	}
	if err != nil {
		return codedError{c.explain(err), exitNotRun}
	}
	if strings.Contains(resp.GetError(), "at capacity") {
		return codedError{fmt.Errorf("%s did not start: %s", req.GetFunctionName(), resp.GetError()), exitNotRun}
	}
	data, err := getRecord(ctx, c, req.GetExecutionId())
	if err != nil {
		return codedError{err, exitNotRun}
	}
	var rec record
	if err := json.Unmarshal(data, &rec); err != nil {
		return codedError{fmt.Errorf("record of %s: %w", req.GetExecutionId(), err), exitNotRun}
	}
	if inv.json {
		inv.env.Stdout.Write(append(data, '\n'))
		return exitCode(rec.exitCode())
	}
	inv.env.Stdout.Write(resp.GetOutput())
	return inv.finished(c, &rec)
}

// runLogs prints an execution's output, following it with -f.
func runLogs(ctx context.Context, inv *invocation) error {
	id, err := inv.arg("execution id")
	if err != nil {
		return err
	}
	c, err := inv.connect(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	if inv.json {
		if inv.follow { // to its end, then the whole record
			if _, err := inv.followOutput(ctx, c, id, false); err != nil {
				return err
			}
		}
		data, err := getRecord(ctx, c, id)
		if err != nil {
			return err
		}
		_, err = inv.env.Stdout.Write(append(data, '\n'))
		return err
	}
	rec, err := inv.followOutput(ctx, c, id, true)
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return exitCode(exitInterrupted)
	}
	if err != nil {
		return err
	}
	if !rec.final() {
		fmt.Fprintf(inv.env.Stderr, "flux-agent: %s is still running (flux-agent logs -f %s follows it)\n", id, id)
	} else if rec.Status != "success" {
		fmt.Fprintf(inv.env.Stderr, "flux-agent: %s %s\n", id, rec.summary())
	}
	return nil
}

// followOutput writes an execution's output to stdout (when print) until its
// end with --follow/-f or invoke, else as far as it goes now, and returns
// its record. Over the admin socket it tails, reconnecting from the bytes
// it has after a broken stream; over --addr it polls GetExecution.
func (inv *invocation) followOutput(ctx context.Context, c *conn, id string, print bool) (*record, error) {
	out := inv.env.Stdout
	if !print {
		out = io.Discard
	}
	follow := inv.follow || inv.cmd.name == "invoke"
	if !c.hasAdmin() {
		return poll(ctx, c, id, follow, out)
	}
	var offset int64
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		rec, err := tail(ctx, c, id, follow, &offset, out)
		if err == nil || ctx.Err() != nil {
			return rec, err
		}
		if status.Code(err) != codes.Unavailable && status.Code(err) != codes.Internal {
			return nil, c.explain(err)
		}
		lastErr = err
		select { // the stream broke: take it up again where it was
		case <-time.After(time.Duration(attempt+1) * 200 * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return nil, c.explain(lastErr)
}

// tail reads one TailExecution stream, advancing offset by what it wrote.
func tail(ctx context.Context, c *conn, id string, follow bool, offset *int64, out io.Writer) (*record, error) {
	stream, err := c.admin.TailExecution(ctx, &fluxpb.TailExecutionRequest{ExecutionId: id, Offset: *offset, Follow: follow})
	if err != nil {
		return nil, err
	}
	for {
		msg, err := stream.Recv()
		if err != nil {
			if status.Code(err) == codes.Canceled && ctx.Err() != nil {
				return nil, context.Canceled
			}
			return nil, err
		}
		switch ev := msg.GetEvent().(type) {
		case *fluxpb.TailExecutionResponse_Output:
			if ev.Output.GetOffset() != *offset {
				return nil, fmt.Errorf("output of %s came from offset %d, not %d", id, ev.Output.GetOffset(), *offset)
			}
			if _, err := out.Write(ev.Output.GetData()); err != nil {
				return nil, err
			}
			*offset += int64(len(ev.Output.GetData()))
		case *fluxpb.TailExecutionResponse_End:
			var rec record
			if err := json.Unmarshal(ev.End.GetRecord(), &rec); err != nil {
				return nil, fmt.Errorf("record of %s: %w", id, err)
			}
			return &rec, nil
		}
	}
}

// poll follows an execution with GetExecution alone, printing what each
// read adds to the output.
func poll(ctx context.Context, c *conn, id string, follow bool, out io.Writer) (*record, error) {
	printed := 0
	for {
		data, err := getRecord(ctx, c, id)
		if err != nil {
			return nil, err
		}
		var rec record
		if err := json.Unmarshal(data, &rec); err != nil {
			return nil, fmt.Errorf("record of %s: %w", id, err)
		}
		if len(rec.Output) > printed {
			if _, err := io.WriteString(out, rec.Output[printed:]); err != nil {
				return nil, err
			}
			printed = len(rec.Output)
		}
		if rec.final() || !follow {
			return &rec, nil
		}
		select {
		case <-time.After(pollInterval):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// getRecord reads an execution's record as Flux does.
func getRecord(ctx context.Context, c *conn, id string) ([]byte, error) {
	callCtx, cancel := unary(ctx)
	defer cancel()
	resp, err := c.agent.GetExecution(callCtx, &fluxpb.GetExecutionRequest{ExecutionId: id})
	if err != nil {
		return nil, c.explain(err)
	}
	if !resp.GetFound() {
		return nil, fmt.Errorf("execution %s is not known to this agent (records are kept for execution_ttl)", id)
	}
	return resp.GetData(), nil
}
