package service

import (
	"strings"
	"testing"
)

func TestOutputSinkLimit(t *testing.T) {
	o := newOutputSink(10, true)
	for _, chunk := range []string{"12345", "67890", "abc", "def"} {
		if n, err := o.Write([]byte(chunk)); n != len(chunk) || err != nil {
			t.Fatalf("Write = %d, %v: a function must never see its output fail", n, err)
		}
	}
	st := o.stats()
	if st.total != 16 || !st.truncated {
		t.Errorf("stats: %+v", st)
	}
	all := string(st.all)
	if !strings.HasPrefix(all, "1234567890\n[flux-agent: output truncated") || strings.Contains(all, "abc") {
		t.Errorf("kept output: %q", all)
	}
	if strings.Count(all, "truncated") != 1 {
		t.Errorf("the marker must appear once: %q", all)
	}
	if pending := string(o.take()); pending != all {
		t.Errorf("pending %q != kept %q", pending, all)
	}
	if len(o.take()) != 0 {
		t.Error("take must forget what it returned")
	}
}

func TestOutputSinkPutBackKeepsOrder(t *testing.T) {
	o := newOutputSink(1<<20, false)
	o.Write([]byte("one "))
	chunk := o.take()
	o.Write([]byte("three"))
	o.putBack(append(chunk, "two "...))
	if got := string(o.take()); got != "one two three" {
		t.Errorf("after putBack: %q", got)
	}
	if o.stats().all != nil {
		t.Error("an async sink must not keep the whole output in memory")
	}
}
