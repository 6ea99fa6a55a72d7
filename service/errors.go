package service

import (
	"context"
	"errors"

	"go.opentelemetry.io/otel/attribute"

	"github.com/serverless-fabric/flux-agent/telemetry"
)

// Domain errors. toStatus and the execution's error field are the only
// places that turn them into what Flux sees.
var (
	ErrInvalidRequest     = errors.New("invalid request")
	ErrNotRegistered      = errors.New("not registered")
	ErrDuplicateExecution = errors.New("execution id already used")
	ErrShuttingDown       = errors.New("the agent is shutting down")
)

// tracerName names the tracer of the service's own spans.
const tracerName = "github.com/serverless-fabric/flux-agent/service"

// Spans of the steps of an execution that wait on something (Redis, a
// slot), so that a slow execution's trace says where its time went.
const (
	spanQueueWait    = "flux.queue.wait"
	spanRecordClaim  = "flux.record.claim"
	spanRecordUpdate = "flux.record.update"
	spanRecordFinal  = "flux.record.final"
	spanOutputFlush  = "flux.output.flush"
	spanReplyWait    = "flux.reply.wait"
)

// attrFlushBytes is the size of one write of live output.
const attrFlushBytes = attribute.Key("flux.output.flush_bytes")

// Metrics receives what the service counts; telemetry.Metrics implements
// it. Labels stay bounded: function names and statuses, never ids.
type Metrics interface {
	ExecutionStarted(ctx context.Context, function string, async bool)
	ExecutionFinished(ctx context.Context, function string, outcome telemetry.ExecutionOutcome)
	RunningAdd(ctx context.Context, function string, delta int64)
	QueuedAdd(ctx context.Context, function string, delta int64)
	Deployed(ctx context.Context, function string, bytes int64, err error)
	RedisError(ctx context.Context, op string)
}

type noMetrics struct{}

func (noMetrics) ExecutionStarted(context.Context, string, bool)                        {}
func (noMetrics) ExecutionFinished(context.Context, string, telemetry.ExecutionOutcome) {}
func (noMetrics) RunningAdd(context.Context, string, int64)                             {}
func (noMetrics) QueuedAdd(context.Context, string, int64)                              {}
func (noMetrics) Deployed(context.Context, string, int64, error)                        {}
func (noMetrics) RedisError(context.Context, string)                                    {}
