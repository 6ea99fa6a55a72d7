package service

import (
	"bytes"
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

// maxRecordBytes bounds a rendered record so a GetExecution reply stays
// under the 50 MiB Flux accepts: JSON turns each control or invalid UTF-8
// byte of output into up to six.
const maxRecordBytes = 48 << 20

// outputCutMarker ends output that was cut to fit the record's budget.
const outputCutMarker = "\n[flux-agent: output cut to fit the reply]\n"

// marshalWithOutput renders the record as Flux reads it, with the output
// that is stored apart from it, in at most budget bytes. HTML is not
// escaped (a function printing HTML would otherwise pay six bytes for each
// '<').
func (r Record) marshalWithOutput(output []byte, budget int) ([]byte, error) {
	data, err := encodeRecord(r, output)
	for cut := len(output); err == nil && len(data) > budget && cut > 0; {
		// Shrink in proportion to the overshoot, with some slack, until it
		// fits; a few rounds at most.
		cut = int(int64(cut) * int64(budget) / int64(len(data)) * 9 / 10)
		data, err = encodeRecord(r, append(output[:cut:cut], outputCutMarker...))
	}
	return data, err
}

func encodeRecord(r Record, output []byte) ([]byte, error) {
	r.Output = string(output)
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(r); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}
