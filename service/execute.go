package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
	"github.com/serverless-fabric/flux-agent/sandbox"
	"github.com/serverless-fabric/flux-agent/telemetry"
)

// execution is one accepted ExecuteFunction, from the claim of its id to
// its final record.
type execution struct {
	id     string
	fn     *fluxpb.FunctionConfig
	args   []string
	async  bool
	logger *slog.Logger

	// rec and resp belong to the goroutine that runs the execution; others
	// read them only after done is closed.
	rec  Record
	resp *fluxpb.ExecutionResponse
	done chan struct{}

	mu        sync.Mutex
	queued    bool
	proc      *sandbox.Process
	cancelled bool
	cancelMsg string
	cancelCh  chan struct{} // closed on the first cancel
}

// cancel asks the execution to end now: a queued one leaves the queue, a
// running one has its whole process tree killed.
func (e *execution) cancel(msg string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.cancelled {
		e.cancelled, e.cancelMsg = true, msg
		close(e.cancelCh)
	}
	if e.proc != nil {
		e.proc.Cancel()
	}
}

// cancelIfQueued cancels the execution only if it has not started.
func (e *execution) cancelIfQueued(msg string) {
	e.mu.Lock()
	queued := e.queued
	e.mu.Unlock()
	if queued {
		e.cancel(msg)
	}
}

// cancelReason returns why the execution was cancelled, if it was.
func (e *execution) cancelReason() (string, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cancelMsg, e.cancelled
}

// ExecuteFunction runs a function: sync calls return its output, async
// calls return once the running record exists.
func (s *Service) ExecuteFunction(ctx context.Context, req *fluxpb.ExecutionRequest) (*fluxpb.ExecutionResponse, error) {
	if err := validateExecution(req); err != nil {
		return nil, toStatus(err)
	}
	fn, err := s.function(ctx, req.GetFunctionName())
	if errors.Is(err, ErrNotRegistered) {
		return s.refuse(ctx, req, err)
	}
	if err != nil {
		return nil, toStatus(err)
	}
	// A slot (or a place in the queue) first: an execution is active only
	// once it can run or wait, and Shutdown sees a queued one as queued.
	name, limit := fn.GetName(), int(fn.GetMaxConcurrency())
	var w *waiter
	if req.GetAsync() && fn.GetMaxConcurrencyBehavior() == BehaviorWait {
		w, err = s.slots.enqueue(name, limit)
	} else {
		err = s.slots.tryAcquire(name, limit)
	}
	if err != nil {
		return s.refuse(ctx, req, err)
	}
	e := &execution{
		id:       req.GetExecutionId(),
		fn:       fn,
		args:     slices.Clone(req.GetArgs()),
		async:    req.GetAsync(),
		logger:   s.logger.With("execution_id", req.GetExecutionId(), "function", name),
		queued:   w != nil && !isClosed(w.ready),
		done:     make(chan struct{}),
		cancelCh: make(chan struct{}),
	}
	if err := s.admit(e); err != nil {
		s.giveBack(name, w)
		return nil, toStatus(err)
	}
	// From here every path ends in s.retire(e).
	e.rec = Record{
		ExecutionID:  e.id,
		AgentID:      s.opts.AgentID,
		FunctionName: name,
		Status:       StatusRunning,
		StartedAt:    time.Now().UTC(),
		Async:        e.async,
		Queued:       e.queued,
	}
	ctx, span := s.tracer.Start(ctx, telemetry.SpanExecution, trace.WithAttributes(
		telemetry.AttrFunction.String(name),
		telemetry.AttrExecutionID.String(e.id),
		telemetry.AttrAsync.Bool(e.async),
	))
	if sc := span.SpanContext(); sc.HasTraceID() {
		e.rec.TraceID = sc.TraceID().String()
	}
	created, err := s.state.createRecord(ctx, &e.rec)
	if err != nil || !created {
		s.giveBack(name, w)
		s.retire(e)
		if err == nil {
			err = fmt.Errorf("%w: %s", ErrDuplicateExecution, e.id)
		} else {
			s.metrics.RedisError(ctx, "create_record")
		}
		span.SetStatus(codes.Error, err.Error())
		span.End()
		return nil, toStatus(err)
	}
	s.metrics.ExecutionStarted(ctx, name, e.async)
	if e.async {
		go s.run(context.WithoutCancel(ctx), span, e, w)
		return &fluxpb.ExecutionResponse{}, nil
	}
	// A sync caller that goes away (Flux's HTTP deadline) takes its
	// execution with it.
	stop := context.AfterFunc(ctx, func() { e.cancel("the caller gave up: " + context.Cause(ctx).Error()) })
	defer stop()
	s.run(context.WithoutCancel(ctx), span, e, w)
	return e.resp, nil
}

// admit registers an execution as active, unless its id is running or the
// agent is shutting down.
func (s *Service) admit(e *execution) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		return ErrShuttingDown
	}
	if _, running := s.active[e.id]; running {
		return fmt.Errorf("%w: %s is running", ErrDuplicateExecution, e.id)
	}
	s.active[e.id] = e
	s.wg.Add(1)
	return nil
}

// retire ends an admitted execution: whoever waits on done (a cancel) may
// read its record, and it no longer counts as active.
func (s *Service) retire(e *execution) {
	close(e.done)
	s.mu.Lock()
	delete(s.active, e.id)
	s.mu.Unlock()
	s.wg.Done()
}

// giveBack returns a slot, or a place in the queue, never used.
func (s *Service) giveBack(function string, w *waiter) {
	if w == nil || !s.slots.leave(w) {
		s.slots.release(function)
	}
}

// refuse answers an execution that cannot start. Flux ignores the error of
// an async response, so an async one also leaves a failed record.
func (s *Service) refuse(ctx context.Context, req *fluxpb.ExecutionRequest, cause error) (*fluxpb.ExecutionResponse, error) {
	if req.GetAsync() {
		now := time.Now().UTC()
		rec := &Record{
			ExecutionID:  req.GetExecutionId(),
			AgentID:      s.opts.AgentID,
			FunctionName: req.GetFunctionName(),
			Status:       StatusFailed,
			Error:        cause.Error(),
			StartedAt:    now,
			StatusAt:     &now,
			Async:        true,
		}
		created, err := s.state.createRecord(ctx, rec)
		if err != nil {
			s.metrics.RedisError(ctx, "create_record")
			return nil, toStatus(err)
		}
		if !created {
			return nil, toStatus(fmt.Errorf("%w: %s", ErrDuplicateExecution, rec.ExecutionID))
		}
	}
	s.logger.InfoContext(ctx, "execution refused", "execution_id", req.GetExecutionId(),
		"function", req.GetFunctionName(), "async", req.GetAsync(), "reason", cause)
	return &fluxpb.ExecutionResponse{Error: cause.Error()}, nil
}

// run takes an admitted execution from its queue (if any) to its final
// record. It owns e.rec and the slot.
func (s *Service) run(ctx context.Context, span trace.Span, e *execution, w *waiter) {
	defer s.retire(e)
	defer span.End()
	name := e.fn.GetName()

	if e.queued {
		s.metrics.QueuedAdd(ctx, name, 1)
		select {
		case <-w.ready:
		case <-e.cancelCh:
			if s.slots.leave(w) {
				s.metrics.QueuedAdd(ctx, name, -1)
				s.finish(ctx, span, e, nil, outputStats{}, nil, 0, nil)
				return
			}
		}
		s.metrics.QueuedAdd(ctx, name, -1)
		e.mu.Lock()
		e.queued = false
		e.mu.Unlock()
		e.rec.Queued = false
		e.rec.QueuedMS = time.Since(e.rec.StartedAt).Milliseconds()
		span.SetAttributes(telemetry.AttrQueuedMS.Int64(e.rec.QueuedMS))
		if err := s.state.updateRecord(ctx, &e.rec); err != nil {
			s.metrics.RedisError(ctx, "update_record")
			e.logger.WarnContext(ctx, "record not updated", "error", err)
		}
	}
	defer s.slots.release(name)
	s.metrics.RunningAdd(ctx, name, 1)
	defer s.metrics.RunningAdd(ctx, name, -1)

	if _, cancelled := e.cancelReason(); cancelled {
		s.finish(ctx, span, e, nil, outputStats{}, nil, 0, nil)
		return
	}
	lease, err := s.opts.Deployments.Acquire(name)
	if err != nil {
		s.finish(ctx, span, e, nil, outputStats{}, fmt.Errorf("function %s has no deployed code: %w", name, err), 0, nil)
		return
	}
	defer lease.Release()
	e.rec.CodeVersion = lease.Version
	path, err := lease.Handler(e.fn.GetHandler())
	if err != nil {
		s.finish(ctx, span, e, nil, outputStats{}, fmt.Errorf("handler: %w", err), 0, nil)
		return
	}

	sink := newOutputSink(s.opts.OutputLimit, !e.async)
	flusher := startOutputFlusher(ctx, &outputFlusher{
		sink: sink, state: s.state, id: e.id, logger: e.logger,
		onErr: func(ctx context.Context) { s.metrics.RedisError(ctx, "write_output") },
	})
	startCtx, startSpan := s.tracer.Start(ctx, telemetry.SpanSandboxStart)
	proc, err := s.opts.Sandbox.Start(startCtx, sandbox.Spec{
		ID:        e.id,
		Path:      path,
		Args:      e.args,
		Dir:       lease.Dir,
		Env:       s.environment(e),
		Limits:    limits(e.fn),
		Timeout:   time.Duration(e.fn.GetTimeoutSeconds()) * time.Second,
		KillGrace: s.opts.KillGrace,
		Output:    sink,
	})
	if err != nil {
		startSpan.SetStatus(codes.Error, err.Error())
		startSpan.End()
		offset := flusher.stop()
		s.finish(ctx, span, e, nil, sink.stats(), fmt.Errorf("start: %w", err), offset, sink.take())
		return
	}
	startSpan.SetAttributes(telemetry.AttrPID.Int(proc.Pid()))
	startSpan.End()
	_, waitSpan := s.tracer.Start(ctx, telemetry.SpanSandboxWait)
	e.mu.Lock()
	e.proc = proc
	if e.cancelled {
		proc.Cancel()
	}
	e.mu.Unlock()
	e.logger.DebugContext(ctx, "execution started", "pid", proc.Pid(), "version", lease.Version)

	<-proc.Done()
	res := proc.Result()
	waitSpan.SetAttributes(telemetry.AttrExitCode.Int(res.ExitCode), telemetry.AttrOOMKilled.Bool(res.OOMKilled),
		telemetry.AttrTimedOut.Bool(res.TimedOut), telemetry.AttrCancelled.Bool(res.Cancelled))
	waitSpan.End()
	offset := flusher.stop()
	s.finish(ctx, span, e, &res, sink.stats(), nil, offset, sink.take())
}

// finish turns how an execution ended into its final record, response,
// span status and metrics. res is nil when no process ran; the output not
// yet in Redis (lastChunk) goes at offset.
func (s *Service) finish(ctx context.Context, span trace.Span, e *execution, res *sandbox.Result, out outputStats, startErr error, offset int64, lastChunk []byte) {
	now := time.Now().UTC()
	rec := &e.rec
	rec.StatusAt = &now
	rec.Queued = false
	rec.OutputBytes = out.total
	rec.OutputTruncated = out.truncated
	cancelMsg, cancelled := e.cancelReason()
	switch {
	case startErr != nil:
		rec.Status, rec.Error = StatusFailed, startErr.Error()
	case res == nil && cancelled:
		rec.Status, rec.Error = StatusCancelled, cancelMsg
	case res == nil:
		rec.Status, rec.Error = StatusFailed, "the execution did not start"
	default:
		rec.ExitCode = &res.ExitCode
		rec.Signal = res.Signal
		rec.OOMKilled = res.OOMKilled
		rec.TimedOut = res.TimedOut
		rec.PeakMemoryBytes = res.PeakMemoryBytes
		rec.CPUTimeMS = res.CPUTime.Milliseconds()
		rec.DurationMS = res.WallTime.Milliseconds()
		rec.Status, rec.Error = outcome(res, e.fn, cancelMsg)
		if res.OutputErr != nil {
			// The sink never fails, so the end of the output was abandoned
			// (a process escaped the group without a cgroup to hold it).
			rec.OutputTruncated = true
			e.logger.WarnContext(ctx, "output cut short", "error", res.OutputErr)
		}
	}
	s.writeFinal(ctx, e, offset, lastChunk)
	if !e.async {
		e.resp = &fluxpb.ExecutionResponse{Output: out.all, Error: rec.Error, DurationMs: rec.DurationMS}
	}

	span.SetAttributes(
		telemetry.AttrStatus.String(rec.Status),
		telemetry.AttrOutputBytes.Int64(rec.OutputBytes),
		telemetry.AttrOutputTruncated.Bool(rec.OutputTruncated),
		telemetry.AttrOOMKilled.Bool(rec.OOMKilled),
		telemetry.AttrTimedOut.Bool(rec.TimedOut),
		telemetry.AttrCancelled.Bool(rec.Status == StatusCancelled),
		telemetry.AttrPeakMemoryBytes.Int64(int64(rec.PeakMemoryBytes)),
		telemetry.AttrCPUTimeMS.Int64(rec.CPUTimeMS),
	)
	if rec.ExitCode != nil {
		span.SetAttributes(telemetry.AttrExitCode.Int(*rec.ExitCode))
	}
	if rec.Status != StatusSuccess {
		span.SetStatus(codes.Error, rec.Error)
	}
	s.metrics.ExecutionFinished(ctx, e.fn.GetName(), telemetry.ExecutionOutcome{
		Status:      rec.Status,
		Duration:    time.Duration(rec.DurationMS) * time.Millisecond,
		OutputBytes: rec.OutputBytes,
		OOMKilled:   rec.OOMKilled,
		TimedOut:    rec.TimedOut,
		Cancelled:   rec.Status == StatusCancelled,
	})
	level := slog.LevelInfo
	if rec.Status == StatusFailed {
		level = slog.LevelWarn
	}
	e.logger.Log(ctx, level, "execution finished", "status", rec.Status, "error", rec.Error,
		"duration_ms", rec.DurationMS, "output_bytes", rec.OutputBytes, "async", e.async)
}

// finalWriteRetry is the first pause between tries of a final write; it
// doubles up to finalWriteTimeout in all.
const finalWriteRetry = 100 * time.Millisecond

// writeFinal stores the final record, retrying through a short Redis
// outage: a record left "running" would mislead Flux until its TTL. What
// still fails is settled as failed at the agent's next start.
func (s *Service) writeFinal(ctx context.Context, e *execution, offset int64, lastChunk []byte) {
	ctx, cancel := context.WithTimeout(ctx, finalWriteTimeout)
	defer cancel()
	pause := finalWriteRetry
	for {
		err := s.state.finishRecord(ctx, &e.rec, offset, lastChunk)
		if err == nil {
			return
		}
		s.metrics.RedisError(ctx, "finish_record")
		retry := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			retry.Stop()
			e.logger.ErrorContext(ctx, "final record not written", "status", e.rec.Status, "error", err)
			return
		case <-retry.C:
			pause *= 2
		}
	}
}

// outcome names the status and error of a process that ran. The sandbox
// words what it measured (OOM against the limit it applied, signals, exit
// codes); the service words what it decided (timeouts, cancels).
func outcome(res *sandbox.Result, fn *fluxpb.FunctionConfig, cancelMsg string) (status, errText string) {
	switch {
	case res.Cancelled:
		if cancelMsg == "" {
			cancelMsg = "cancelled"
		}
		return StatusCancelled, cancelMsg
	case res.TimedOut && !res.OOMKilled:
		return StatusFailed, fmt.Sprintf("execution timed out after %ds", fn.GetTimeoutSeconds())
	}
	if err := res.Err(); err != nil {
		return StatusFailed, err.Error()
	}
	return StatusSuccess, ""
}

// limits maps a function's config to sandbox limits; 0 means none.
func limits(fn *fluxpb.FunctionConfig) sandbox.Limits {
	var l sandbox.Limits
	if mb := fn.GetMemoryMb(); mb > 0 {
		b := mb << 20
		l.MemoryBytes = &b
	}
	if mc := int64(fn.GetCpuMillicores()); mc > 0 {
		l.CPUMillicores = &mc
	}
	return l
}

// environment is all a function sees: a minimal base, its own env, and
// the FLUX_* values, which its env cannot override. Nothing comes from the
// agent's own environment.
func (s *Service) environment(e *execution) []string {
	env := baseEnv()
	maps.Copy(env, e.fn.GetEnv())
	env["FLUX_EXECUTION_ID"] = e.id
	env["FLUX_NODE_PRIVATE_IP"] = s.opts.IPs.PrivateIP()
	env["FLUX_NODE_PUBLIC_IP"] = s.opts.IPs.PublicIP()
	out := make([]string, 0, len(env))
	for _, k := range slices.Sorted(maps.Keys(env)) {
		out = append(out, k+"="+env[k])
	}
	return out
}

// CancelExecution kills a running execution's whole tree, or takes a queued
// one out of the queue, and returns once its final record is written.
func (s *Service) CancelExecution(ctx context.Context, req *fluxpb.CancelExecutionRequest) (*fluxpb.CancelExecutionResponse, error) {
	id := req.GetExecutionId()
	if id == "" {
		return &fluxpb.CancelExecutionResponse{Message: "execution_id is empty"}, nil
	}
	s.mu.Lock()
	e := s.active[id]
	s.mu.Unlock()
	if e == nil {
		return &fluxpb.CancelExecutionResponse{Message: s.notRunning(ctx, id)}, nil
	}
	e.cancel("cancelled by request")
	select {
	case <-e.done:
	case <-ctx.Done():
		return &fluxpb.CancelExecutionResponse{Success: true, Message: "execution " + id + " is being cancelled"}, nil
	}
	switch e.rec.Status {
	case StatusCancelled:
	case "":
		return &fluxpb.CancelExecutionResponse{Message: "execution " + id + " did not start"}, nil
	default:
		return &fluxpb.CancelExecutionResponse{Message: fmt.Sprintf("execution %s finished before it could be cancelled (status %s)", id, e.rec.Status)}, nil
	}
	return &fluxpb.CancelExecutionResponse{Success: true, Message: "execution " + id + " cancelled"}, nil
}

// notRunning explains why there is nothing to cancel.
func (s *Service) notRunning(ctx context.Context, id string) string {
	if !executionIDPattern.MatchString(id) {
		return fmt.Sprintf("execution %q is not running on this agent", id)
	}
	if rec, err := s.state.record(ctx, id); err == nil && rec != nil && rec.Final() {
		return fmt.Sprintf("execution %s already finished (status %s)", id, rec.Status)
	}
	return fmt.Sprintf("execution %s is not running on this agent", id)
}

// GetExecution returns an execution's record, with its output so far.
func (s *Service) GetExecution(ctx context.Context, req *fluxpb.GetExecutionRequest) (*fluxpb.GetExecutionResponse, error) {
	id := req.GetExecutionId()
	if !executionIDPattern.MatchString(id) {
		return &fluxpb.GetExecutionResponse{Found: false}, nil
	}
	data, found, err := s.state.recordJSON(ctx, id)
	if err != nil {
		s.metrics.RedisError(ctx, "get_record")
		return nil, toStatus(err)
	}
	return &fluxpb.GetExecutionResponse{Found: found, Data: data}, nil
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
