package service

import (
	"bytes"
	"encoding/json"
	"errors"
	"time"
	"unicode/utf8"

	"github.com/serverless-fabric/flux-agent/telemetry"
)

// Execution statuses, as Flux reads them in a record; spans and metrics
// spell the outcomes the same (telemetry names them once for both).
const (
	StatusRunning   = telemetry.StatusRunning
	StatusSuccess   = telemetry.StatusSuccess
	StatusFailed    = telemetry.StatusFailed
	StatusCancelled = telemetry.StatusCancelled
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
	// TimeoutMS is the timeout in force: the function's, or the node's
	// default when the function sets none.
	TimeoutMS int64 `json:"timeout_ms,omitempty"`
	// MemoryLimitBytes is the memory limit the sandbox applied (the
	// function's or the node's default); absent when none was.
	MemoryLimitBytes int64 `json:"memory_limit_bytes,omitempty"`
	// NetworkBlocked counts the connections the network policy refused.
	NetworkBlocked int `json:"network_blocked,omitempty"`
}

// Final reports whether the record holds a final status.
func (r *Record) Final() bool { return r.Status != StatusRunning }

// maxRecordBytes bounds a rendered record so a GetExecution reply stays
// under the 50 MiB Flux accepts: JSON turns each control or invalid UTF-8
// byte of output into six.
const maxRecordBytes = 48 << 20

// outputCutMarker ends output that was cut to fit the record's budget.
const outputCutMarker = "\n[flux-agent: output cut to fit the reply]\n"

// outputPlaceholder stands for the output while the rest of the record is
// encoded; its encoding, found by placeholderMember, marks where the output
// goes. An unescaped `"` cannot occur inside an encoded value, so the first
// match is the member itself.
const outputPlaceholder = "\x00"

var placeholderMember = []byte(`"output":"\u0000"`)

// marshalWithOutput renders the record as Flux reads it, with the output
// that is stored apart from it, in at most budget bytes: output that does
// not fit is cut with a marker. The size is computed before anything is
// encoded, so the record is built once, in one allocation of its final
// size, whatever the output holds. HTML is not escaped (a function printing
// HTML would otherwise pay six bytes for each '<'); the bytes are those
// encoding/json writes with SetEscapeHTML(false).
func (r Record) marshalWithOutput(output []byte, budget int) ([]byte, error) {
	if len(output) == 0 {
		r.Output = ""
		return encodeJSON(r)
	}
	r.Output = outputPlaceholder
	frame, err := encodeJSON(r)
	if err != nil {
		return nil, err
	}
	at := bytes.Index(frame, placeholderMember)
	if at < 0 {
		return nil, errors.New("record: output member not found")
	}
	head := frame[:at+len(`"output":`)]
	tail := frame[at+len(placeholderMember):]
	room := budget - len(head) - len(tail) - 2 // the output's quotes
	cut, size := fitJSON(output, room, jsonLen(outputCutMarker))
	out := make([]byte, 0, len(head)+2+size+len(tail))
	out = append(out, head...)
	out = append(out, '"')
	out = appendJSON(out, output[:cut])
	if cut < len(output) {
		out = appendJSON(out, []byte(outputCutMarker))
	}
	out = append(out, '"')
	return append(out, tail...), nil
}

// encodeJSON is json.Marshal without HTML escaping.
func encodeJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// fitJSON says how much of s goes into a JSON string of at most room bytes
// (quotes apart): all of it, or, when it does not fit, the longest prefix
// that leaves markerLen bytes for a marker. size is the encoded length of
// what goes in, marker included. Cuts fall between the units encoding/json
// decodes, so the prefix encodes as the start of the whole.
func fitJSON(s []byte, room, markerLen int) (cut, size int) {
	total, cut := 0, -1
	for i := 0; i < len(s); {
		n, escaped := jsonUnit(s[i:])
		if cut < 0 && total+escaped > room-markerLen {
			cut, size = i, total
		}
		if total += escaped; total > room {
			return cut, size + markerLen
		}
		i += n
	}
	return len(s), total
}

// jsonUnit is the length of the unit at the start of s (an ASCII byte, a
// rune, or one invalid byte) and the length of its JSON encoding.
func jsonUnit(s []byte) (n, escaped int) {
	if b := s[0]; b < utf8.RuneSelf {
		return 1, int(asciiJSONLen[b])
	}
	c, size := utf8.DecodeRune(s)
	switch {
	case c == utf8.RuneError && size == 1:
		return 1, len(`\ufffd`)
	case c == '\u2028' || c == '\u2029':
		return size, len(`\u2028`)
	}
	return size, size
}

// jsonLen is the encoded length of s inside a JSON string.
func jsonLen(s string) int {
	_, size := fitJSON([]byte(s), len(s)*6, 0)
	return size
}

// asciiJSONLen is the encoded length of each ASCII byte.
var asciiJSONLen = func() (t [utf8.RuneSelf]uint8) {
	for b := range t {
		switch {
		case b == '"' || b == '\\' || b == '\b' || b == '\f' || b == '\n' || b == '\r' || b == '\t':
			t[b] = 2
		case b < 0x20:
			t[b] = 6
		default:
			t[b] = 1
		}
	}
	return t
}()

// appendJSON appends s escaped as encoding/json escapes a string's content
// without HTML escaping: invalid UTF-8 becomes U+FFFD, U+2028 and U+2029
// are escaped.
func appendJSON(dst, s []byte) []byte {
	const hex = "0123456789abcdef"
	start := 0
	for i := 0; i < len(s); {
		b := s[i]
		if b < utf8.RuneSelf {
			if asciiJSONLen[b] == 1 {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch b {
			case '"', '\\':
				dst = append(dst, '\\', b)
			case '\b':
				dst = append(dst, '\\', 'b')
			case '\f':
				dst = append(dst, '\\', 'f')
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hex[b>>4], hex[b&0xF])
			}
			i++
			start = i
			continue
		}
		c, size := utf8.DecodeRune(s[i:])
		switch {
		case c == utf8.RuneError && size == 1:
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
		case c == '\u2028' || c == '\u2029':
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hex[c&0xF])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	return append(dst, s[start:]...)
}
