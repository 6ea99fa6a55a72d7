package service

import (
	"encoding/json"
	"time"
)

// Execution statuses, as Flux reads them.
const (
	StatusRunning   = "running"
	StatusSuccess   = "success"
	StatusFailed    = "failed"
	StatusCancelled = "cancelled"
)

// Record is the execution record GetExecution returns as JSON. The first
// block of fields is Flux's contract; the rest is what the agent measures
// beyond it (Flux ignores unknown keys).
type Record struct {
	ExecutionID  string     `json:"execution_id"`
	AgentID      string     `json:"agent_id"`
	FunctionName string     `json:"function_name"`
	Status       string     `json:"status"`
	Output       string     `json:"output,omitempty"`
	Error        string     `json:"error,omitempty"`
	DurationMS   int64      `json:"duration_ms,omitempty"`
	StartedAt    time.Time  `json:"started_at"`
	StatusAt     *time.Time `json:"status_at,omitempty"`

	Async bool `json:"async"`
	// Queued is true while the execution waits for a free slot.
	Queued bool `json:"queued,omitempty"`
	// QueuedMS is how long it waited for a slot before it ran.
	QueuedMS        int64  `json:"queued_ms,omitempty"`
	ExitCode        *int   `json:"exit_code,omitempty"`
	Signal          int    `json:"signal,omitempty"`
	OOMKilled       bool   `json:"oom_killed,omitempty"`
	TimedOut        bool   `json:"timed_out,omitempty"`
	PeakMemoryBytes uint64 `json:"peak_memory_bytes,omitempty"`
	CPUTimeMS       int64  `json:"cpu_time_ms,omitempty"`
	OutputBytes     int64  `json:"output_bytes,omitempty"`
	OutputTruncated bool   `json:"output_truncated,omitempty"`
	CodeVersion     string `json:"code_version,omitempty"`
	TraceID         string `json:"trace_id,omitempty"`
}

// Final reports whether the record holds a final status.
func (r *Record) Final() bool { return r.Status != StatusRunning }

// marshalWithOutput renders the record as Flux reads it, with the output
// that is stored apart from it.
func (r Record) marshalWithOutput(output []byte) ([]byte, error) {
	r.Output = string(output)
	return json.Marshal(r)
}
