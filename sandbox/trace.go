package sandbox

// tracerName names the tracer of the sandbox's own spans. The sandbox
// takes no tracer: it starts its spans from the provider of the span in the
// context given to Start, so they join the caller's trace.
const tracerName = "github.com/serverless-fabric/flux-agent/sandbox"

// Span names of the steps of a start and of the end of an execution, each
// of which can take a millisecond. Fixed strings, never an id.
const (
	// SpanSlot covers taking a slot: warm from the pool, or made on the
	// spot when the pool is empty (then with attribute flux.sandbox.slot.cold).
	SpanSlot = "flux.sandbox.slot"
	// SpanLimits covers writing the execution's limits into its cgroup.
	SpanLimits = "flux.sandbox.limits"
	// SpanSpawn covers the fork and exec up to the function's first
	// instruction, with its rlimits set.
	SpanSpawn = "flux.sandbox.spawn"
	// SpanCleanup covers what follows the exit: killing what is left,
	// proving the tree gone, draining the output, measuring.
	SpanCleanup = "flux.sandbox.cleanup"
)
