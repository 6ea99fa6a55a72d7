// Package service implements Flux's AgentService: function registration
// and deployment, the execution lifecycle (sync, async, queued, cancelled,
// timed out) with records in Redis, health and node status.
package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	grpccodes "google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/serverless-fabric/flux-agent/deployments"
	"github.com/serverless-fabric/flux-agent/nodeinfo"
	fluxpb "github.com/serverless-fabric/flux-agent/proto"
	"github.com/serverless-fabric/flux-agent/sandbox"
	"github.com/serverless-fabric/flux-agent/telemetry"
)

// healthCheckTimeout bounds the Redis ping behind HealthCheck, well inside
// the 3 s deadline Flux gives the call.
const healthCheckTimeout = time.Second

// finalWriteTimeout bounds the write of a final record, which must happen
// even when the RPC that started the execution is gone.
const finalWriteTimeout = 10 * time.Second

// NodeStats is what ReportNodeStatus reads: sampled in the background, read
// in nanoseconds.
type NodeStats interface {
	CPUPercent() float64
	Memory() nodeinfo.Memory
}

// NodeIPs gives the IPs injected into every execution.
type NodeIPs interface {
	PrivateIP() string
	PublicIP() string
}

// Options configure a Service.
type Options struct {
	AgentID      string
	Version      string
	Redis        redis.UniversalClient
	ExecutionTTL time.Duration
	OutputLimit  int64
	MaxTasks     int
	QueueLimit   int
	KillGrace    time.Duration
	Sandbox      *sandbox.Sandbox
	Deployments  *deployments.Store
	Node         NodeStats
	IPs          NodeIPs
	Metrics      Metrics
	Tracer       trace.TracerProvider
	Logger       *slog.Logger
}

// Service is the agent's gRPC AgentService.
type Service struct {
	fluxpb.UnimplementedAgentServiceServer

	opts      Options
	state     *state
	slots     *slots
	metrics   Metrics
	tracer    trace.Tracer
	logger    *slog.Logger
	startedAt time.Time

	mu        sync.Mutex
	functions map[string]*fluxpb.FunctionConfig
	active    map[string]*execution
	draining  bool
	wg        sync.WaitGroup // one per active execution

}

// New returns a Service. It starts nothing in the background.
func New(opts Options) (*Service, error) {
	switch {
	case opts.AgentID == "":
		return nil, errors.New("service: agent id is required")
	case opts.Redis == nil, opts.Sandbox == nil, opts.Deployments == nil, opts.Node == nil, opts.IPs == nil:
		return nil, errors.New("service: Redis, Sandbox, Deployments, Node and IPs are required")
	case opts.OutputLimit <= 0 || opts.ExecutionTTL <= 0:
		return nil, errors.New("service: output limit and execution TTL must be positive")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Metrics == nil {
		opts.Metrics = noMetrics{}
	}
	if opts.Tracer == nil {
		opts.Tracer = noop.NewTracerProvider()
	}
	return &Service{
		opts:      opts,
		state:     &state{rdb: opts.Redis, agentID: opts.AgentID, ttl: opts.ExecutionTTL},
		slots:     newSlots(opts.MaxTasks, opts.QueueLimit),
		metrics:   opts.Metrics,
		tracer:    opts.Tracer.Tracer(tracerName),
		logger:    opts.Logger,
		startedAt: time.Now(),
		functions: map[string]*fluxpb.FunctionConfig{},
		active:    map[string]*execution{},
	}, nil
}

// RegisterFunction stores a function's config; it survives agent restarts.
func (s *Service) RegisterFunction(ctx context.Context, fn *fluxpb.FunctionConfig) (*fluxpb.FunctionAck, error) {
	if err := validateFunction(fn); err != nil {
		return &fluxpb.FunctionAck{Success: false, Message: err.Error()}, nil
	}
	fn = proto.CloneOf(fn)
	if err := s.state.saveFunction(ctx, fn); err != nil {
		s.metrics.RedisError(ctx, "save_function")
		s.logger.ErrorContext(ctx, "register function", "function", fn.GetName(), "error", err)
		return &fluxpb.FunctionAck{Success: false, Message: "could not store the function: " + err.Error()}, nil
	}
	s.mu.Lock()
	s.functions[fn.GetName()] = fn
	s.mu.Unlock()
	s.slots.setLimit(fn.GetName(), int(fn.GetMaxConcurrency()))
	s.logger.InfoContext(ctx, "function registered", "function", fn.GetName(), "handler", fn.GetHandler(),
		"memory_mb", fn.GetMemoryMb(), "cpu_millicores", fn.GetCpuMillicores(), "timeout_seconds", fn.GetTimeoutSeconds(),
		"max_concurrency", fn.GetMaxConcurrency(), "max_concurrency_behavior", fn.GetMaxConcurrencyBehavior())
	return &fluxpb.FunctionAck{Success: true, Message: "function " + fn.GetName() + " registered"}, nil
}

// function returns a registered function's config, from memory or, after
// a restart, from Redis.
func (s *Service) function(ctx context.Context, name string) (*fluxpb.FunctionConfig, error) {
	s.mu.Lock()
	fn := s.functions[name]
	s.mu.Unlock()
	if fn != nil {
		return fn, nil
	}
	fn, err := s.state.loadFunction(ctx, name)
	if err != nil {
		s.metrics.RedisError(ctx, "load_function")
		return nil, err
	}
	if fn == nil {
		return nil, fmt.Errorf("function %s: %w", name, ErrNotRegistered)
	}
	s.mu.Lock()
	if cached := s.functions[name]; cached != nil {
		fn = cached // a RegisterFunction won the race
	} else {
		s.functions[name] = fn
	}
	s.mu.Unlock()
	return fn, nil
}

// DeployFunction installs a function's code as a new version; running
// executions keep the version they started with.
func (s *Service) DeployFunction(ctx context.Context, pkg *fluxpb.DeploymentPackage) (*fluxpb.DeploymentAck, error) {
	name := pkg.GetFunctionName()
	if err := deployments.ValidName(name); err != nil {
		return &fluxpb.DeploymentAck{Message: err.Error()}, nil
	}
	// Flux never sets config; a caller that does registers and deploys in
	// one step, and a failed deploy must leave the old registration too.
	fn := pkg.GetConfig()
	if fn != nil {
		fn = proto.CloneOf(fn)
		if fn.GetName() == "" {
			fn.Name = name
		}
		if fn.GetName() != name {
			return &fluxpb.DeploymentAck{Message: fmt.Sprintf("config.name %q does not match function_name %q", fn.GetName(), name)}, nil
		}
		if err := validateFunction(fn); err != nil {
			return &fluxpb.DeploymentAck{Message: err.Error()}, nil
		}
	} else {
		var err error
		if fn, err = s.function(ctx, name); err != nil {
			return &fluxpb.DeploymentAck{Message: err.Error()}, nil
		}
	}
	start := time.Now()
	ctx, span := s.tracer.Start(ctx, telemetry.SpanDeploy, trace.WithAttributes(
		telemetry.AttrFunction.String(name), telemetry.AttrDeployBytes.Int(len(pkg.GetCodeArchive()))))
	defer span.End()
	d, err := s.opts.Deployments.Deploy(ctx, name, fn.GetHandler(), pkg.GetCodeArchive())
	s.metrics.Deployed(ctx, name, int64(len(pkg.GetCodeArchive())), err)
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
		s.logger.WarnContext(ctx, "deploy refused", "function", name, "archive_bytes", len(pkg.GetCodeArchive()), "error", err)
		return &fluxpb.DeploymentAck{Message: "deploy of " + name + " failed: " + err.Error()}, nil
	}
	span.SetAttributes(telemetry.AttrFunctionVersion.String(d.Version), telemetry.AttrDeployFiles.Int(d.Files))
	if pkg.GetConfig() != nil {
		if ack, _ := s.RegisterFunction(ctx, fn); !ack.GetSuccess() {
			return &fluxpb.DeploymentAck{Message: "deployed, but " + ack.GetMessage()}, nil
		}
	}
	msg := fmt.Sprintf("function %s deployed as version %s (%d files, %d bytes)", name, d.Version, d.Files, d.Bytes)
	if d.Unchanged {
		msg = fmt.Sprintf("function %s already at version %s (same archive)", name, d.Version)
	}
	s.logger.InfoContext(ctx, "function deployed", "function", name, "version", d.Version, "files", d.Files,
		"bytes", d.Bytes, "unchanged", d.Unchanged, "duration", time.Since(start))
	return &fluxpb.DeploymentAck{Success: true, Message: msg}, nil
}

// HealthCheck says whether this agent can work: Redis answers.
func (s *Service) HealthCheck(ctx context.Context, _ *fluxpb.HealthCheckRequest) (*fluxpb.HealthCheckResponse, error) {
	return &fluxpb.HealthCheckResponse{Healthy: s.Ready(ctx) == nil, Version: s.opts.Version}, nil
}

// Ready reports why the agent cannot serve executions, or nil.
func (s *Service) Ready(ctx context.Context) error {
	s.mu.Lock()
	draining := s.draining
	s.mu.Unlock()
	if draining {
		return ErrShuttingDown
	}
	ctx, cancel := context.WithTimeout(ctx, healthCheckTimeout)
	defer cancel()
	if err := s.state.ping(ctx); err != nil {
		s.metrics.RedisError(ctx, "ping")
		return fmt.Errorf("redis: %w", err)
	}
	return nil
}

// ReportNodeStatus answers from memory: every figure is sampled in the
// background or counted as executions come and go.
func (s *Service) ReportNodeStatus(_ context.Context, _ *fluxpb.NodeStatusRequest) (*fluxpb.NodeStatusResponse, error) {
	mem := s.opts.Node.Memory()
	return &fluxpb.NodeStatusResponse{
		AgentId:       s.opts.AgentID,
		CpuPercent:    s.opts.Node.CPUPercent(),
		MemoryPercent: mem.Percent(),
		MemoryTotalMb: mem.TotalBytes >> 20,
		MemoryUsedMb:  mem.UsedBytes >> 20,
		ActiveTasks:   int32(s.ActiveTasks()),
		MaxTasks:      int32(s.opts.MaxTasks),
		UptimeSeconds: int64(time.Since(s.startedAt).Seconds()),
	}, nil
}

// ActiveTasks counts every execution this agent has accepted and not
// finished, sync or async, running or queued: Flux drains a node only when
// this is 0.
func (s *Service) ActiveTasks() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.active)
}

// Shutdown refuses new executions (HealthCheck then says unhealthy), lets
// running ones finish until ctx is done, then kills what remains; it
// returns once every final status is written (or could not be). The gRPC
// server keeps serving meanwhile, so Flux still reads live output and
// cancels.
func (s *Service) Shutdown(ctx context.Context) {
	s.mu.Lock()
	s.draining = true
	var queued []*execution
	for _, e := range s.active {
		queued = append(queued, e)
	}
	s.mu.Unlock()
	for _, e := range queued {
		e.cancelIfQueued("the agent shut down before the execution started")
	}
	finished := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(finished)
	}()
	select {
	case <-finished:
		return
	case <-ctx.Done():
	}
	s.mu.Lock()
	remaining := make([]*execution, 0, len(s.active))
	for _, e := range s.active {
		remaining = append(remaining, e)
	}
	s.mu.Unlock()
	s.logger.Warn("shutdown grace is over; killing remaining executions", "count", len(remaining))
	for _, e := range remaining {
		e.cancel("the agent shut down before the execution finished")
	}
	<-finished
}

// Settle marks the executions that a previous run of this agent left
// "running" (it crashed or was killed) as failed, so Flux does not wait on
// them until their records expire. Call it once at start.
func (s *Service) Settle(ctx context.Context) (int, error) {
	n, err := s.state.settle(ctx, "the agent stopped before the execution finished (crash or kill); it was not run to the end")
	if err != nil {
		s.metrics.RedisError(ctx, "settle")
	}
	return n, err
}

// toStatus maps domain errors of malformed requests to gRPC codes; domain
// failures of an execution go in the response's error field instead.
func toStatus(err error) error {
	switch {
	case errors.Is(err, ErrInvalidRequest), errors.Is(err, deployments.ErrInvalidName):
		return status.Error(grpccodes.InvalidArgument, err.Error())
	case errors.Is(err, ErrDuplicateExecution):
		return status.Error(grpccodes.AlreadyExists, err.Error())
	default:
		// The agent cannot work right now (shutting down, Redis down): Flux
		// shows it as a failure to reach the agent, which it is.
		return status.Error(grpccodes.Unavailable, err.Error())
	}
}
