package sandbox

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
)

// UIDRange is a block of uids set aside for executions, one each, so that
// concurrent functions cannot see or signal each other (same-uid processes
// can read each other's /proc/<pid>/environ and kill each other). The uids
// need no passwd entries on the host; they must belong to nobody else,
// which is what recording them as the runner user's range in /etc/subuid
// says to every other tool of the host.
type UIDRange struct {
	First uint32
	Count uint32
}

// String shows the range as FIRST-LAST, or "" when it is empty.
func (r UIDRange) String() string {
	if r.Count == 0 {
		return ""
	}
	return strconv.FormatUint(uint64(r.First), 10) + "-" + strconv.FormatUint(uint64(r.First)+uint64(r.Count)-1, 10)
}

// Contains says whether uid is in the range.
func (r UIDRange) Contains(uid uint32) bool {
	return uid >= r.First && uint64(uid) < uint64(r.First)+uint64(r.Count)
}

// ErrNoFreeUID says every uid of the range is in use by a running
// execution (or was retired because its processes could not be proven gone).
var ErrNoFreeUID = errors.New("no free uid in the sandbox's uid range")

// ErrNoSubordinateRange says the runner user has no range in /etc/subuid.
var ErrNoSubordinateRange = errors.New("no subordinate uid range")

// parseSubordinateRange finds user's first range in a subuid(5) file:
// lines of NAME_OR_UID:FIRST:COUNT.
func parseSubordinateRange(r io.Reader, user string, uid uint32) (UIDRange, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		parts := strings.Split(line, ":")
		if len(parts) != 3 || (parts[0] != user && parts[0] != strconv.FormatUint(uint64(uid), 10)) {
			continue
		}
		first, err1 := strconv.ParseUint(parts[1], 10, 32)
		count, err2 := strconv.ParseUint(parts[2], 10, 32)
		if err1 != nil || err2 != nil || first == 0 || count == 0 || first+count > 1<<32-1 {
			return UIDRange{}, fmt.Errorf("malformed range %q", line)
		}
		return UIDRange{First: uint32(first), Count: uint32(count)}, nil
	}
	if err := sc.Err(); err != nil {
		return UIDRange{}, err
	}
	return UIDRange{}, fmt.Errorf("%w for %s", ErrNoSubordinateRange, user)
}

// uidPool hands out the uids of a range, each to one slot at a time. It
// cycles through the range rather than reusing the uid just freed.
type uidPool struct {
	first uint32

	mu   sync.Mutex
	used []bool
	next int
}

func newUIDPool(r UIDRange) (*uidPool, error) {
	if r.First == 0 || r.Count == 0 || uint64(r.First)+uint64(r.Count) > 1<<32-1 {
		return nil, fmt.Errorf("uid range %d+%d: must start above 0, hold a uid and end below 2^32-1", r.First, r.Count)
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

// available counts the uids no slot holds.
func (p *uidPool) available() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, used := range p.used {
		if !used {
			n++
		}
	}
	return n
}

func (p *uidPool) release(uid uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if i := int(uid - p.first); uid >= p.first && i < len(p.used) {
		p.used[i] = false
	}
}
