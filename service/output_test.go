package service

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// storedOutput stands for the output key in Redis: writes land at their
// offset, as SETRANGE puts them.
type storedOutput struct {
	mu     sync.Mutex
	data   []byte
	writes int
	// gate, when set, holds each write until it can receive.
	gate chan struct{}
	// fail, when set, decides whether a write fails.
	fail func() bool
}

func (s *storedOutput) write(ctx context.Context, offset int64, chunk []byte) error {
	if s.gate != nil {
		select {
		case <-s.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writes++
	if s.fail != nil && s.fail() {
		return errors.New("redis is down")
	}
	s.setRange(offset, chunk)
	return nil
}

func (s *storedOutput) setRange(offset int64, chunk []byte) {
	if end := int(offset) + len(chunk); end > len(s.data) {
		s.data = append(s.data, make([]byte, end-len(s.data))...)
	}
	copy(s.data[offset:], chunk)
}

// finish applies what stop returned, as the final write does.
func (s *storedOutput) finish(rest []outputPiece) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range rest {
		s.setRange(p.offset, p.data)
	}
	return string(s.data)
}

func newTestStream(limit int64, budget *byteBudget, store *storedOutput) *outputStream {
	o := newOutputStream(context.Background(), limit, budget, slog.New(slog.DiscardHandler), "", store.write)
	o.open()
	return o
}

func TestOutputLimit(t *testing.T) {
	store := &storedOutput{}
	budget := newByteBudget(1 << 20)
	o := newTestStream(10, budget, store)
	for _, chunk := range []string{"12345", "67890", "abc", "def"} {
		if n, err := o.Write([]byte(chunk)); n != len(chunk) || err != nil {
			t.Fatalf("Write = %d, %v: a function must never see its output fail", n, err)
		}
	}
	st := o.stats()
	if st.total != 16 || !st.truncated {
		t.Errorf("stats: %+v", st)
	}
	reply := string(o.replyOutput())
	if !strings.HasPrefix(reply, "1234567890\n[flux-agent: output truncated") || strings.Contains(reply, "abc") {
		t.Errorf("reply: %q", reply)
	}
	if strings.Count(reply, "truncated") != 1 {
		t.Errorf("the marker must appear once: %q", reply)
	}
	if stored := store.finish(o.stop()); stored != reply {
		t.Errorf("stored %q != reply %q", stored, reply)
	}
	o.free()
	if budget.inUse() != 0 {
		t.Errorf("budget still holds %d bytes", budget.inUse())
	}
}

// A function that writes faster than Redis takes its output waits: the
// stream holds two buffers, never a backlog.
func TestOutputBackPressure(t *testing.T) {
	store := &storedOutput{gate: make(chan struct{})}
	o := newTestStream(1<<30, nil, store)
	input := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	var mu sync.Mutex
	accepted := 0
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		for rest := input; len(rest) > 0; {
			n := min(32<<10, len(rest)) // as the sandbox reads the pipe
			o.Write(rest[:n])
			rest = rest[n:]
			mu.Lock()
			accepted += n
			mu.Unlock()
		}
	}()
	if !waitFor(5*time.Second, func() bool {
		o.mu.Lock()
		defer o.mu.Unlock()
		return o.blocked
	}) {
		t.Fatal("the writer never waited for Redis")
	}
	mu.Lock()
	held := accepted
	mu.Unlock()
	if held > 2*outputChunkBytes {
		t.Errorf("%d bytes accepted while Redis took none: more than two buffers", held)
	}
	close(store.gate) // Redis takes writes again
	select {
	case <-wrote:
	case <-time.After(10 * time.Second):
		t.Fatal("the writer did not get through once Redis took writes")
	}
	if got := store.finish(o.stop()); got != string(input) {
		t.Errorf("stored %d bytes, want the %d written, in order", len(got), len(input))
	}
	if n := len(o.pooled); n > 2 {
		t.Errorf("%d buffers used, want at most 2", n)
	}
	o.free()
}

// A write Redis refused is retried at the same offset: nothing is lost or
// written twice.
func TestOutputRetriesAtTheSameOffset(t *testing.T) {
	failures := 1
	store := &storedOutput{}
	store.fail = func() bool { failures--; return failures >= 0 }
	o := newTestStream(1<<20, nil, store)
	o.Write([]byte("first "))
	if !waitFor(5*time.Second, func() bool {
		store.mu.Lock()
		defer store.mu.Unlock()
		return string(store.data) == "first "
	}) {
		t.Fatal("the refused write was not retried")
	}
	o.Write([]byte("second"))
	if got := store.finish(o.stop()); got != "first second" {
		t.Errorf("stored %q", got)
	}
	o.free()
}

// Past the node's budget for sync replies, the reply is cut with a marker
// and the whole output still goes to Redis.
func TestOutputReplyBudget(t *testing.T) {
	store := &storedOutput{}
	budget := newByteBudget(1 << 10)
	o := newTestStream(1<<20, budget, store)
	input := strings.Repeat("x", 4<<10)
	for i := 0; i < len(input); i += 512 {
		o.Write([]byte(input[i : i+512]))
	}
	reply := string(o.replyOutput())
	if !strings.Contains(reply, "reply cut after") || len(reply) > 1<<10+200 {
		t.Errorf("reply of %d bytes: %.80q…", len(reply), reply)
	}
	if budget.inUse() > 1<<10 {
		t.Errorf("budget overdrawn: %d", budget.inUse())
	}
	if got := store.finish(o.stop()); got != input {
		t.Errorf("stored %d bytes, want all %d", len(got), len(input))
	}
	if st := o.stats(); st.truncated {
		t.Error("the output is whole in Redis: not truncated")
	}
	o.free()
	if budget.inUse() != 0 {
		t.Errorf("budget still holds %d bytes", budget.inUse())
	}
}

// When the agent must end an execution whatever Redis does, a writer
// waiting for Redis is let go and what did not fit is counted as lost.
func TestOutputReleaseWriters(t *testing.T) {
	store := &storedOutput{fail: func() bool { return true }}
	o := newTestStream(1<<30, nil, store)
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		o.Write(make([]byte, 4*outputChunkBytes))
	}()
	if !waitFor(5*time.Second, func() bool {
		o.mu.Lock()
		defer o.mu.Unlock()
		return o.blocked
	}) {
		t.Fatal("the writer never waited")
	}
	o.releaseWriters()
	select {
	case <-wrote:
	case <-time.After(5 * time.Second):
		t.Fatal("a released writer still waits")
	}
	rest := o.stop()
	var last outputPiece
	total := 0
	for _, p := range rest {
		total += len(p.data)
		last = p
	}
	if !strings.Contains(string(last.data), "bytes of output lost") || !o.stats().truncated {
		t.Errorf("no lost-output marker: %d pieces", len(rest))
	}
	if total > 3*outputChunkBytes {
		t.Errorf("%d bytes held for the final write", total)
	}
	o.free()
}
