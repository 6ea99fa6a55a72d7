package service

import (
	"errors"
	"testing"
)

func TestSlotsLimits(t *testing.T) {
	s := newSlots(3, 10)
	for i := 0; i < 2; i++ {
		if _, err := s.acquire("a", 2); err != nil {
			t.Fatalf("a #%d: %v", i, err)
		}
	}
	_, err := s.acquire("a", 2)
	if !errors.Is(err, ErrAtCapacity) || err.Error() != "function a is at capacity (max_concurrency 2)" {
		t.Errorf("third a: %v", err)
	}
	b, err := s.acquire("b", 0)
	if err != nil {
		t.Fatalf("b: %v", err)
	}
	_, err = s.acquire("c", 0)
	if !errors.Is(err, ErrAtCapacity) || err.Error() != "agent is at capacity (max_tasks 3)" {
		t.Errorf("node full: %v", err)
	}
	s.giveBack(b)
	s.giveBack(b) // a second give-back frees nothing more
	if _, err := s.acquire("c", 0); err != nil {
		t.Errorf("after a release: %v", err)
	}
	if running, queued := s.counts(); running != 3 || queued != 0 {
		t.Errorf("counts = %d, %d", running, queued)
	}
}

func TestSlotsQueueFIFO(t *testing.T) {
	s := newSlots(0, 3)
	first, err := s.enqueue("f", 1)
	if err != nil || !isClosed(first.ready) {
		t.Fatalf("first should start at once: %v", err)
	}
	var waiting []*waiter
	for i := 0; i < 3; i++ {
		w, err := s.enqueue("f", 1)
		if err != nil || isClosed(w.ready) || !s.waiting(w) {
			t.Fatalf("#%d should queue: %v", i, err)
		}
		waiting = append(waiting, w)
	}
	if _, err := s.enqueue("f", 1); !errors.Is(err, ErrAtCapacity) {
		t.Errorf("beyond queue_limit: %v", err)
	}
	// Another function with room is not held up by f's queue.
	if other, err := s.enqueue("g", 1); err != nil || !isClosed(other.ready) {
		t.Errorf("g should start at once: %v", err)
	}
	if !s.leave(waiting[1]) {
		t.Fatal("leave of a queued waiter")
	}
	s.giveBack(first)
	if !isClosed(waiting[0].ready) || isClosed(waiting[2].ready) {
		t.Fatal("the oldest waiter must get the slot")
	}
	if s.leave(waiting[0]) {
		t.Error("leave of a waiter that holds a slot must say so")
	}
	s.giveBack(waiting[0])
	if !isClosed(waiting[2].ready) {
		t.Fatal("the next waiter must get the slot")
	}
	s.giveBack(waiting[1]) // left the queue already: nothing to give back
	if running, queued := s.counts(); running != 2 || queued != 0 {
		t.Errorf("counts = %d, %d", running, queued)
	}
}

func TestSlotsNoQueue(t *testing.T) {
	s := newSlots(1, 0)
	if _, err := s.enqueue("f", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.enqueue("f", 0); !errors.Is(err, ErrAtCapacity) {
		t.Errorf("queue_limit 0 must refuse: %v", err)
	}
}

func TestSlotsNodeLimitWakesOtherFunctions(t *testing.T) {
	s := newSlots(1, 10)
	a, err := s.acquire("a", 0)
	if err != nil {
		t.Fatal(err)
	}
	w, err := s.enqueue("b", 0)
	if err != nil || isClosed(w.ready) {
		t.Fatalf("b should wait for the node: %v", err)
	}
	s.giveBack(a)
	if !isClosed(w.ready) {
		t.Error("b should start once the node has room")
	}
}

// Re-registering a function applies its new limit to what is queued: a
// raised limit starts waiters at once.
func TestSlotsSetLimit(t *testing.T) {
	s := newSlots(0, 10)
	if _, err := s.enqueue("f", 1); err != nil {
		t.Fatal(err)
	}
	w1, _ := s.enqueue("f", 1)
	w2, _ := s.enqueue("f", 1)
	if isClosed(w1.ready) || isClosed(w2.ready) {
		t.Fatal("both should wait behind the first")
	}
	s.setLimit("f", 2)
	if !isClosed(w1.ready) || isClosed(w2.ready) {
		t.Error("a limit raised to 2 should start exactly the oldest waiter")
	}
	s.setLimit("other", 9) // another function's waiters are not touched
	if isClosed(w2.ready) {
		t.Error("w2 started on another function's limit")
	}
}
