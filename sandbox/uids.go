package sandbox

import (
	"errors"
	"fmt"
	"sync"
)

// UIDRange is a block of uids set aside for executions, one each, so that
// concurrent functions cannot see or signal each other (same-uid processes
// can read each other's /proc/<pid>/environ and kill each other). The uids
// need no passwd entries; they must belong to nobody else on the host.
type UIDRange struct {
	First uint32
	Count uint32 // 0: every execution runs as the runner user's own uid
}

// ErrNoFreeUID says every uid of the range is in use by a running
// execution.
var ErrNoFreeUID = errors.New("no free uid in the sandbox's uid range")

// uidPool hands out the uids of a range, each to one execution at a time.
// It cycles through the range rather than reusing the uid just freed, so
// what one execution left in a shared place (/tmp) is rarely readable by
// the very next one.
type uidPool struct {
	first uint32

	mu   sync.Mutex
	used []bool
	next int
}

func newUIDPool(r UIDRange) (*uidPool, error) {
	if r.First == 0 || uint64(r.First)+uint64(r.Count) > 1<<32-1 {
		return nil, fmt.Errorf("uid range %d+%d: must start above 0 and end below 2^32-1", r.First, r.Count)
	}
	return &uidPool{first: r.First, used: make([]bool, r.Count)}, nil
}

func (p *uidPool) acquire() (uint32, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := range p.used {
		j := (p.next + i) % len(p.used)
		if !p.used[j] {
			p.used[j] = true
			p.next = (j + 1) % len(p.used)
			return p.first + uint32(j), nil
		}
	}
	return 0, ErrNoFreeUID
}

func (p *uidPool) release(uid uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if i := int(uid - p.first); uid >= p.first && i < len(p.used) {
		p.used[i] = false
	}
}
