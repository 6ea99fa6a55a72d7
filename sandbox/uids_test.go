package sandbox

import (
	"errors"
	"testing"
)

func TestUIDPool(t *testing.T) {
	p, err := newUIDPool(UIDRange{First: 5000, Count: 3})
	if err != nil {
		t.Fatal(err)
	}
	var got []uint32
	for range 3 {
		uid, err := p.acquire()
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, uid)
	}
	if got[0] != 5000 || got[1] != 5001 || got[2] != 5002 {
		t.Errorf("uids %v", got)
	}
	if _, err := p.acquire(); !errors.Is(err, ErrNoFreeUID) {
		t.Errorf("a full range: %v", err)
	}
	p.release(5000)
	p.release(4999) // outside: ignored
	p.release(6000)
	if uid, err := p.acquire(); err != nil || uid != 5000 {
		t.Errorf("after a release: %d, %v", uid, err)
	}
	p.release(5001)
	p.release(5002)
	// Cycles on rather than reusing what was freed last.
	if uid, _ := p.acquire(); uid != 5001 {
		t.Errorf("next uid %d, want 5001", uid)
	}
	for _, r := range []UIDRange{{First: 0, Count: 10}, {First: 1<<32 - 5, Count: 10}} {
		if _, err := newUIDPool(r); err == nil {
			t.Errorf("range %+v accepted", r)
		}
	}
}
