package telemetry

import "go.opentelemetry.io/otel/attribute"

// ScopeName names the agent's own instrumentation scope, so spans and
// instruments the agent creates are told apart from otelgrpc's (the Redis
// spans use ScopeName + "/redis").
const ScopeName = "github.com/serverless-fabric/flux-agent"

// ServiceName is the resource's service.name unless OTEL_SERVICE_NAME says
// otherwise; Jaeger lists the agent's traces under it.
const ServiceName = "flux-agent"

// Span names the agent creates itself. They are fixed strings (never the
// function name or an execution id) so that tracing back ends can group them.
const (
	// SpanExecution covers one execution from its acceptance to its record
	// being written: queueing, sandbox start, wait, and output streaming.
	SpanExecution = "flux.execution"
	// SpanSandboxStart covers preparing the sandbox and starting the process.
	SpanSandboxStart = "flux.sandbox.start"
	// SpanSandboxWait covers the process running until it and its tree are gone.
	SpanSandboxWait = "flux.sandbox.wait"
	// SpanDeploy covers receiving, checking and unpacking a function's code.
	SpanDeploy = "flux.deploy"
	// SpanRedisDial covers opening one connection to a Redis server. Other
	// Redis spans are named after their command ("set", "hget") or, for a
	// pipeline, "redis.pipeline" and its commands ("redis.pipeline setrange
	// expire").
	SpanRedisDial = "redis.dial"
)

// EventNetworkBlocked is the span event of one connection the network
// policy refused.
const EventNetworkBlocked = "flux.network.blocked"

// Span attribute keys. Build values with the key's methods, for example
// AttrFunction.String(name) or AttrExitCode.Int(code).
const (
	// AttrAgentID is a resource attribute: the agent's id in the Flux fleet.
	AttrAgentID = attribute.Key("flux.agent.id")

	// AttrFunction is the function's name.
	AttrFunction = attribute.Key("flux.function.name")
	// AttrFunctionVersion is the deployed code's version.
	AttrFunctionVersion = attribute.Key("flux.function.version")

	// AttrExecutionID is the execution's id; it is a span attribute and a log
	// field, never a metric label.
	AttrExecutionID = attribute.Key("flux.execution.id")
	// AttrAsync tells an async execution (answered before it runs) from a sync one.
	AttrAsync = attribute.Key("flux.execution.async")
	// AttrStatus is the execution's outcome: one of the Status constants.
	AttrStatus = attribute.Key("flux.execution.status")
	// AttrExitCode is the process's exit code (the semantic-conventions key).
	AttrExitCode = attribute.Key("process.exit.code")
	// AttrPID is the process id of the function's main process.
	AttrPID = attribute.Key("process.pid")
	// AttrOOMKilled is true when the kernel killed the function for memory.
	AttrOOMKilled = attribute.Key("flux.execution.oom_killed")
	// AttrTimedOut is true when the agent killed the function at its timeout.
	AttrTimedOut = attribute.Key("flux.execution.timed_out")
	// AttrCancelled is true when the execution was cancelled by a caller.
	AttrCancelled = attribute.Key("flux.execution.cancelled")
	// AttrPeakMemoryBytes is the highest memory use of the function's tree.
	AttrPeakMemoryBytes = attribute.Key("flux.execution.peak_memory_bytes")
	// AttrCPUTimeMS is the user plus system CPU time of the function's tree,
	// in milliseconds (as in the execution record).
	AttrCPUTimeMS = attribute.Key("flux.execution.cpu_time_ms")
	// AttrOutputBytes is how many output bytes the function wrote.
	AttrOutputBytes = attribute.Key("flux.execution.output_bytes")
	// AttrOutputTruncated is true when output beyond the limit was dropped.
	AttrOutputTruncated = attribute.Key("flux.execution.output_truncated")
	// AttrQueuedMS is how long the execution waited for a slot, in
	// milliseconds (as in the execution record).
	AttrQueuedMS = attribute.Key("flux.execution.queued_ms")

	// AttrNetworkBlocked counts the connections of an execution the
	// network policy refused.
	AttrNetworkBlocked = attribute.Key("flux.execution.network.blocked")
	// AttrNetworkDestination and AttrNetworkProtocol describe one refused
	// connection (an EventNetworkBlocked).
	AttrNetworkDestination = attribute.Key("network.peer.address")
	AttrNetworkProtocol    = attribute.Key("network.transport")

	// AttrDeployBytes is the size of the received zip.
	AttrDeployBytes = attribute.Key("flux.deploy.bytes")
	// AttrDeployFiles is how many files the zip held.
	AttrDeployFiles = attribute.Key("flux.deploy.files")

	// AttrRedisKey is the key a Redis command works on. The agent's keys
	// hold only the agent id and an execution id or a fixed name, never a
	// value.
	AttrRedisKey = attribute.Key("flux.redis.key")
	// AttrRedisKeys lists the distinct keys of a pipeline's commands.
	AttrRedisKeys = attribute.Key("flux.redis.keys")
)

// Execution statuses as the execution record, the execution span's
// AttrStatus and the finished-executions metric's status label spell them.
// StatusRunning is only ever in a record: spans and metrics see outcomes.
const (
	StatusRunning   = "running"
	StatusSuccess   = "success"
	StatusFailed    = "failed"
	StatusCancelled = "cancelled"
)

// Log field names that tie a log line to its trace and its execution.
const (
	LogTraceID     = "trace_id"
	LogSpanID      = "span_id"
	LogExecutionID = "execution_id"
	LogFunction    = "function"
)
