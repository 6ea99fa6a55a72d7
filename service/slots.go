package service

import (
	"container/list"
	"errors"
	"fmt"
	"sync"
)

// ErrAtCapacity is a refusal because a function or the node runs as many
// executions as it may. Its text contains "at capacity": Flux looks for
// those words to answer 503 or retry.
var ErrAtCapacity = errors.New("at capacity")

// slots counts running executions per function and per node and hands
// freed slots to queued executions in FIFO order.
type slots struct {
	maxTasks   int // 0 = unlimited
	queueLimit int

	mu          sync.Mutex
	running     int
	perFunction map[string]int
	queue       list.List // of *waiter
}

// waiter is one execution's claim on a slot: queued for one, holding
// one, or done with it. ready is closed once the slot is its own.
type waiter struct {
	function string
	limit    int
	ready    chan struct{}
	elem     *list.Element // in the queue while non-nil
	held     bool          // holds a slot not yet given back
}

func newSlots(maxTasks, queueLimit int) *slots {
	return &slots{maxTasks: maxTasks, queueLimit: queueLimit, perFunction: map[string]int{}}
}

// fits reports whether one more execution of function may run; mu held.
func (s *slots) fits(function string, limit int) error {
	if limit > 0 && s.perFunction[function] >= limit {
		return fmt.Errorf("function %s is %w (max_concurrency %d)", function, ErrAtCapacity, limit)
	}
	if s.maxTasks > 0 && s.running >= s.maxTasks {
		return fmt.Errorf("agent is %w (max_tasks %d)", ErrAtCapacity, s.maxTasks)
	}
	return nil
}

// acquire takes a slot for function, limited to limit concurrent
// executions (0 = unlimited), or says why it cannot.
func (s *slots) acquire(function string, limit int) (*waiter, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.fits(function, limit); err != nil {
		return nil, err
	}
	w := &waiter{function: function, limit: limit, ready: make(chan struct{})}
	s.grant(w)
	return w, nil
}

// grant gives w a slot; mu held.
func (s *slots) grant(w *waiter) {
	s.running++
	s.perFunction[w.function]++
	w.held = true
	close(w.ready)
}

// enqueue takes a slot at once if one is free (ready already closed), or
// queues for one; it fails when the queue is full.
func (s *slots) enqueue(function string, limit int) (*waiter, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := &waiter{function: function, limit: limit, ready: make(chan struct{})}
	if s.fits(function, limit) == nil {
		s.grant(w)
		return w, nil
	}
	if s.queue.Len() >= s.queueLimit {
		return nil, fmt.Errorf("function %s is %w and the agent's queue is full (queue_limit %d)", function, ErrAtCapacity, s.queueLimit)
	}
	w.elem = s.queue.PushBack(w)
	return w, nil
}

// waiting reports whether w is still queued.
func (s *slots) waiting(w *waiter) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return w.elem != nil
}

// leave takes a waiter out of the queue. It returns false when the waiter
// is not queued (it holds a slot, or is done).
func (s *slots) leave(w *waiter) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if w.elem == nil {
		return false
	}
	s.queue.Remove(w.elem)
	w.elem = nil
	return true
}

// giveBack ends w's claim: it leaves the queue, or its slot goes to what
// waits for one. Calling it again does nothing.
func (s *slots) giveBack(w *waiter) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case w.elem != nil:
		s.queue.Remove(w.elem)
		w.elem = nil
	case w.held:
		w.held = false
		s.running--
		if s.perFunction[w.function]--; s.perFunction[w.function] <= 0 {
			delete(s.perFunction, w.function)
		}
		s.dispatch()
	}
}

// setLimit applies a function's new max_concurrency to the executions
// already queued for it, and starts those a raised limit lets run.
func (s *slots) setLimit(function string, limit int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for e := s.queue.Front(); e != nil; e = e.Next() {
		if w := e.Value.(*waiter); w.function == function {
			w.limit = limit
		}
	}
	s.dispatch()
}

// dispatch hands free slots to waiters in FIFO order; mu held.
func (s *slots) dispatch() {
	for e := s.queue.Front(); e != nil; {
		next := e.Next()
		w := e.Value.(*waiter)
		if s.fits(w.function, w.limit) == nil {
			s.queue.Remove(e)
			w.elem = nil
			s.grant(w)
		} else if s.maxTasks > 0 && s.running >= s.maxTasks {
			break
		}
		e = next
	}
}

// counts reports running and queued executions.
func (s *slots) counts() (running, queued int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.running, s.queue.Len()
}
