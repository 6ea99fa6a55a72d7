package service

import (
	"bytes"
	"encoding/json"
	"flag"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// golden compares got with testdata/name, or rewrites it with -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(string(want), string(got)); diff != "" {
		t.Errorf("%s (-want +got):\n%s", name, diff)
	}
}

func TestRecordJSON(t *testing.T) {
	started := time.Date(2026, 11, 28, 9, 30, 0, 123456789, time.UTC)
	ended := started.Add(1500 * time.Millisecond)
	exit0, exit137 := 0, 137
	tests := []struct {
		name   string
		rec    Record
		output string
	}{
		{"running.json", Record{
			ExecutionID: "exc-3b241101-e2bb-4255-8caf-4136c566a962", AgentID: "agent-7f3a", FunctionName: "resize",
			Status: StatusRunning, StartedAt: started, Async: true,
		}, "first line\n"},
		{"queued.json", Record{
			ExecutionID: "exc-1", AgentID: "agent-7f3a", FunctionName: "resize",
			Status: StatusRunning, StartedAt: started, Async: true, Queued: true,
		}, ""},
		{"success.json", Record{
			ExecutionID: "exc-2", AgentID: "agent-7f3a", FunctionName: "resize", Status: StatusSuccess,
			DurationMS: 1500, StartedAt: started, StatusAt: &ended, ExitCode: &exit0, PeakMemoryBytes: 48234496,
			CPUTimeMS: 320, OutputBytes: 12, CodeVersion: "000003-5f2c9a1b7e40", TraceID: "4bf92f3577b34da6a3ce929d0e0e4736",
			QueuedMS: 250,
		}, "hello \"json\" <b>&</b>\n"},
		{"oom.json", Record{
			ExecutionID: "exc-3", AgentID: "agent-7f3a", FunctionName: "hog", Status: StatusFailed,
			Error: "out of memory: exceeded the 64 MiB limit", DurationMS: 812, StartedAt: started, StatusAt: &ended,
			ExitCode: &exit137, Signal: 9, OOMKilled: true, PeakMemoryBytes: 67112960, OutputBytes: 20 << 20,
			OutputTruncated: true,
		}, "\xff not utf-8"},
		{"cancelled-before-start.json", Record{
			ExecutionID: "exc-4", AgentID: "agent-7f3a", FunctionName: "resize", Status: StatusCancelled,
			Error: "cancelled by request", StartedAt: started, StatusAt: &ended, Async: true,
		}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.rec.marshalWithOutput([]byte(tt.output), maxRecordBytes)
			if err != nil {
				t.Fatal(err)
			}
			golden(t, tt.name, append(got, '\n'))
			// What Flux reads: the contract's keys with their types.
			var m map[string]any
			if err := json.Unmarshal(got, &m); err != nil {
				t.Fatal(err)
			}
			for _, k := range []string{"execution_id", "agent_id", "function_name", "status", "started_at"} {
				if _, ok := m[k].(string); !ok {
					t.Errorf("%s missing or not a string: %v", k, m[k])
				}
			}
			if _, err := time.Parse(time.RFC3339, m["started_at"].(string)); err != nil {
				t.Errorf("started_at is not RFC 3339: %v", err)
			}
			if _, has := m["status_at"]; has != tt.rec.Final() {
				t.Errorf("status_at present = %v, want %v (omitted while running)", has, tt.rec.Final())
			}
			for _, k := range []string{"output", "error", "duration_ms"} {
				if v, has := m[k]; has && (v == "" || v == float64(0)) {
					t.Errorf("%s present but empty; the contract omits it", k)
				}
			}
		})
	}
}

// Output that JSON inflates (control bytes, invalid UTF-8) is cut so the
// whole record fits the reply Flux accepts; plain output is not touched.
func TestRecordFitsTheBudget(t *testing.T) {
	rec := Record{ExecutionID: "exc-1", AgentID: "a", FunctionName: "f", Status: StatusSuccess}
	const budget = 64 << 10
	for name, output := range map[string][]byte{
		"control bytes": bytes.Repeat([]byte{1}, budget),
		"invalid utf-8": bytes.Repeat([]byte{0xff}, budget),
		"html":          bytes.Repeat([]byte("<td>&</td>"), budget/20),
	} {
		got, err := rec.marshalWithOutput(output, budget)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) > budget {
			t.Errorf("%s: %d bytes, budget %d", name, len(got), budget)
		}
		var back Record
		if err := json.Unmarshal(got, &back); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if name == "html" && back.Output != string(output) {
			t.Errorf("html output was cut or escaped: %d bytes of JSON", len(got))
		}
		if name != "html" && !strings.HasSuffix(back.Output, outputCutMarker) {
			t.Errorf("%s: no cut marker", name)
		}
	}
}

// The record's output is escaped by the agent's own encoder (so its size is
// known before it is built); it must write exactly what encoding/json
// writes, or the record Flux reads changes.
func TestAppendJSONMatchesEncodingJSON(t *testing.T) {
	cases := []string{
		"", "plain", "quote \" backslash \\ slash /", "<html>&amp;</html>",
		"\b\f\n\r\t\x00\x01\x1f\x7f", "é ü 日本語 🙂", "\u2028\u2029", "\xff\xfe", "\xe2\x82", "a\xe2\x82\xacb",
		"\xed\xa0\x80", "\xf4\x90\x80\x80", string([]byte{0xc0, 0xaf}),
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		b := make([]byte, rng.IntN(64))
		for i := range b {
			b[i] = byte(rng.IntN(256))
		}
		cases = append(cases, string(b))
	}
	for _, s := range cases {
		want, err := encodeJSON(s)
		if err != nil {
			t.Fatal(err)
		}
		got := append(appendJSON([]byte{'"'}, []byte(s)), '"')
		if !bytes.Equal(got, want) {
			t.Errorf("%q: got %s, want %s", s, got, want)
		}
		if n := jsonLen(s) + 2; n != len(want) {
			t.Errorf("%q: jsonLen %d, encoded %d", s, n, len(want))
		}
	}
}

// The reply is built once: what marshalWithOutput allocates is the record
// it returns, whatever the output inflates to.
func TestRecordEncodesWithoutCopies(t *testing.T) {
	rec := Record{ExecutionID: "exc-1", AgentID: "a", FunctionName: "f", Status: StatusSuccess, Error: "x"}
	const budget = 4 << 20
	output := bytes.Repeat([]byte{1}, 1<<20) // 6 MiB once escaped
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	got, err := rec.marshalWithOutput(output, budget)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) > budget || len(got) < budget-8 {
		t.Errorf("%d bytes, want just under %d", len(got), budget)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > uint64(len(got))+64<<10 {
		t.Errorf("allocated %d bytes for a %d-byte record", alloc, len(got))
	}
	var back Record
	if err := json.Unmarshal(got, &back); err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(back.Output, outputCutMarker) || back.Error != "x" {
		t.Errorf("cut record: error %q, output ends %q", back.Error, back.Output[len(back.Output)-50:])
	}
}
