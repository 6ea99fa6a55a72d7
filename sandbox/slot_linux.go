package sandbox

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// A slot is the isolation one execution at a time runs in, prepared ahead
// and reused: a uid of its own from the range (and a passwd file naming
// it), an OS thread of the agent locked to the slot that forks the slot's
// functions, a mount namespace holding the private tmpfs and /proc view
// (the thread's, inherited by every process it forks), a network
// namespace in "none" mode, and on cgroup v1 a set of cgroups the thread
// itself sits in, so that a function is born inside them: v1 has no
// CLONE_INTO_CGROUP, and moving a process in costs an RCU grace period
// (milliseconds) on the start path. The thread's kernel state (namespaces,
// no_new_privs, cgroups, and for a moment the function's real ids) never
// reaches the rest of the agent: a locked thread runs no other goroutine,
// the runtime clones no thread from it, and it ends with the slot.
type slot struct {
	id int
	// uid is the slot's own uid from the range, 0 when there is none.
	uid uint32
	// cred is what functions run as; nil runs them as the agent.
	cred *slotCred
	tid  int

	jobs  chan func()
	ended chan struct{} // closed when the thread is done
	// evfd is an eventfd that wakes the thread while it follows an
	// execution; buf is where it reads the execution's output.
	evfd int
	buf  [32 << 10]byte

	v1 *slotCgroupV1 // cgroup v1 only

	// tmpFD is the slot's tmpfs (O_PATH; -1 without namespaces);
	// tmpInodes and tmpBlocks are what the empty layout uses of it: more
	// after an execution means it left something.
	tmpFD                int
	tmpInodes, tmpBlocks uint64
	// scoped says the slot's thread, and so its functions, are in a
	// Landlock domain of their own (abstract sockets and signals).
	scoped    bool
	idleSince time.Time
}

type slotCred struct{ uid, gid uint32 }

// runsAs is the uid the slot's functions run as.
func (s *slot) runsAs() int {
	if s.cred == nil {
		return os.Geteuid()
	}
	return int(s.cred.uid)
}

// do runs f on the slot's thread.
func (s *slot) do(f func() error) error {
	errc := make(chan error, 1)
	s.jobs <- func() { errc <- f() }
	return <-errc
}

// run has the slot's thread fork and exec req for b, then follow it to
// its end (box.follow); it returns once the process is forked (or could
// not be). The thread closes the pipe's write end: only the child holds it
// then, so EOF means every writer is gone.
func (s *slot) run(b *box, req spawnRequest) error {
	errc := make(chan error, 1)
	s.jobs <- func() {
		c, err := s.forkExec(req)
		unix.Close(req.output)
		if err != nil {
			errc <- err
			return
		}
		b.proc = c
		if s.uid != 0 && b.h.filter != nil {
			b.h.mu.Lock()
			b.h.byUID[s.uid] = b
			b.h.mu.Unlock()
		}
		errc <- nil
		b.follow()
	}
	return <-errc
}

// wake interrupts the slot thread's poll (a request for it, such as
// resuming a held process).
func (s *slot) wake() error {
	one := [8]byte{1}
	if _, err := unix.Write(s.evfd, one[:]); err != nil && !errors.Is(err, unix.EAGAIN) {
		return fmt.Errorf("waking the slot's thread: %w", err)
	}
	return nil
}

// drainWake consumes the wakes so far.
func (s *slot) drainWake() {
	var buf [8]byte
	_, _ = unix.Read(s.evfd, buf[:])
}

// Pool sizing: spare slots kept ready beyond the ones in use, in
// proportion to the recent peak of concurrent executions (a burst takes
// warm slots), and no fewer than minSpareSlots; idle slots beyond twice
// that are ended after slotIdleTimeout.
const (
	minSpareSlots   = 2
	spareShare      = 4 // spare = peak in use / spareShare
	slotIdleTimeout = time.Minute
	peakWindow      = time.Minute
	fillInterval    = time.Second
	maxSlots        = 1 << 16
)

// slotPool makes, hands out, cleans and ends slots.
type slotPool struct {
	h      *host
	uids   *uidPool // nil: every slot runs as the runner (or the agent)
	passwd []byte   // the host's /etc/passwd, read once

	mu    sync.Mutex
	free  []*slot // most recently used last
	live  int     // slots made and not ended
	inUse int
	// returned is closed (and replaced) whenever a slot comes back, for
	// takers that cannot make one (every uid is held by a slot) and wait.
	returned    chan struct{}
	peaks       [2]int // highest inUse in this window and the one before
	windowStart time.Time
	nextID      int
	closed      bool

	wake chan struct{}
	quit chan struct{}
	wg   sync.WaitGroup // the filler and every slot's thread
}

func newSlotPool(h *host, uids UIDRange) *slotPool {
	return &slotPool{h: h, wake: make(chan struct{}, 1), quit: make(chan struct{}), returned: make(chan struct{}), windowStart: time.Now()}
}

// start makes the first spare slots, so a host that cannot make them fails
// at start with the reason, and starts the filler.
func (p *slotPool) start() error {
	if r := p.h.iso.UIDRange; r.Count > 0 {
		pool, err := newUIDPool(r)
		if err != nil {
			return err
		}
		p.uids = pool
	}
	if p.h.namespaces && p.uids != nil {
		passwd, err := os.ReadFile("/etc/passwd")
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("reading /etc/passwd: %w", err)
		}
		p.passwd = passwd
	}
	slots, err := p.make(minSpareSlots)
	if err != nil {
		return fmt.Errorf("preparing slots: %w", err)
	}
	p.mu.Lock()
	p.free = append(p.free, slots...)
	p.mu.Unlock()
	p.wg.Add(1)
	go p.fill()
	return nil
}

// take hands out a free slot, or makes one when none is (cold). When no
// slot can be made because every uid belongs to a slot, it waits for one
// of those still in use to come back.
func (p *slotPool) take() (s *slot, cold bool, err error) {
	p.mu.Lock()
	for {
		if p.closed {
			p.mu.Unlock()
			return nil, false, ErrClosed
		}
		if n := len(p.free); n > 0 {
			s = p.free[n-1]
			p.free = p.free[:n-1]
			p.inUse++
			p.notePeak()
			low := len(p.free) < p.spare()
			p.mu.Unlock()
			if low {
				p.signal()
			}
			return s, cold, nil
		}
		returned := p.returned
		if p.uids == nil || p.uids.available() > 0 || p.live == 0 {
			p.inUse++
			p.notePeak()
			p.mu.Unlock()
			p.signal()
			slots, err := p.make(1)
			if err == nil {
				return slots[0], true, nil
			}
			p.mu.Lock()
			p.inUse--
			if !errors.Is(err, ErrNoFreeUID) || p.live == 0 {
				p.mu.Unlock()
				return nil, true, err
			}
			// The filler took the last free uid meanwhile: its slot, or
			// one coming back, is ours.
		}
		// Every uid is a slot's, and every slot is in use: the one that
		// comes back first is ours.
		cold = true
		p.mu.Unlock()
		<-returned
		p.mu.Lock()
	}
}

// put takes a slot back after its execution. What the execution may have
// left is cleaned first; a slot whose processes could not be proven gone,
// or that cannot be cleaned, is ended instead, and its uid never handed out
// again.
func (p *slotPool) put(s *slot, cg execCgroup, gone, onThread bool) {
	ok := gone
	if cg != nil {
		if err := cg.release(gone); err != nil {
			p.h.log.Error("resetting an execution's cgroup", "slot", s.id, "err", err)
			ok = false
		}
	}
	if ok && p.h.namespaces {
		if err := p.clean(s, onThread); err != nil {
			p.h.log.Error("cleaning a slot's temporary dirs", "slot", s.id, "err", err)
			ok = false
		}
	}
	p.mu.Lock()
	p.inUse--
	defer p.wakeTakers()
	if ok && !p.closed {
		s.idleSince = time.Now()
		p.free = append(p.free, s)
		p.mu.Unlock()
		return
	}
	p.live--
	p.mu.Unlock()
	if onThread {
		// The slot's own thread cannot wait for itself to end.
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.end(s, gone)
		}()
		return
	}
	p.end(s, gone)
}

// wakeTakers tells takers waiting for a slot that one came back (or that
// its uid did).
func (p *slotPool) wakeTakers() {
	p.mu.Lock()
	close(p.returned)
	p.returned = make(chan struct{})
	p.mu.Unlock()
}

// clean empties the slot's temporary dirs when the execution left
// anything there. The usual execution leaves nothing: one fstatfs, from
// any thread; the scrub runs on the slot's thread, in its namespace.
func (p *slotPool) clean(s *slot, onThread bool) error {
	inodes, blocks, err := tmpUsage(s.tmpFD)
	if err != nil || (inodes <= s.tmpInodes && blocks <= s.tmpBlocks) {
		return err
	}
	scrub := scrubTmp
	if !onThread {
		scrub = func() error { return s.do(scrubTmp) }
	}
	if err := scrub(); err != nil {
		return err
	}
	if inodes, blocks, err = tmpUsage(s.tmpFD); err != nil {
		return err
	}
	if inodes > s.tmpInodes || blocks > s.tmpBlocks {
		return fmt.Errorf("%d inodes and %d blocks still in use after the scrub", inodes-s.tmpInodes, blocks-s.tmpBlocks)
	}
	return nil
}

// notePeak records the number in use for the sizing; p.mu held.
func (p *slotPool) notePeak() {
	if now := time.Now(); now.Sub(p.windowStart) > peakWindow {
		p.peaks[1], p.peaks[0], p.windowStart = p.peaks[0], p.inUse, now
	}
	p.peaks[0] = max(p.peaks[0], p.inUse)
}

// spare is how many free slots to keep; p.mu held.
func (p *slotPool) spare() int {
	return max(minSpareSlots, (max(p.peaks[0], p.peaks[1])+spareShare-1)/spareShare)
}

func (p *slotPool) signal() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// fill keeps the spare slots ready and ends the ones idle too long.
func (p *slotPool) fill() {
	defer p.wg.Done()
	tick := time.NewTicker(fillInterval)
	defer tick.Stop()
	for {
		select {
		case <-p.quit:
			return
		case <-p.wake:
		case <-tick.C:
		}
		p.mu.Lock()
		p.notePeak()
		missing := p.spare() - len(p.free)
		if p.uids != nil {
			missing = min(missing, p.uids.available())
		}
		p.mu.Unlock()
		if missing > 0 {
			slots, err := p.make(missing)
			if err != nil {
				p.h.log.Warn("preparing spare slots", "err", err)
			}
			p.mu.Lock()
			closed := p.closed
			if !closed {
				p.free = append(p.free, slots...)
			}
			p.mu.Unlock()
			if len(slots) > 0 {
				p.wakeTakers()
			}
			if closed {
				for _, s := range slots {
					p.mu.Lock()
					p.live--
					p.mu.Unlock()
					p.end(s, true)
				}
			}
		}
		p.shrink()
	}
}

// shrink ends the slots idle longer than slotIdleTimeout beyond twice the
// spare count, oldest first.
func (p *slotPool) shrink() {
	p.mu.Lock()
	var idle []*slot
	keep := 2 * p.spare()
	for len(p.free) > keep && time.Since(p.free[0].idleSince) > slotIdleTimeout {
		idle = append(idle, p.free[0])
		p.free = p.free[1:]
		p.live--
	}
	p.mu.Unlock()
	for _, s := range idle {
		p.end(s, true)
	}
}

// make prepares n slots: their threads set up side by side, then (cgroup
// v1) moved into their cgroups one right after the other, so the moves
// share the kernel's grace periods.
func (p *slotPool) make(n int) ([]*slot, error) {
	p.mu.Lock()
	n = min(n, maxSlots-p.live)
	first := p.nextID
	p.nextID += n
	p.live += n
	p.mu.Unlock()

	slots := make([]*slot, 0, n)
	var errs []error
	failed := 0
	for i := range n {
		s, err := p.newSlot(first + i)
		if err != nil {
			errs = append(errs, err)
			failed++
			continue
		}
		slots = append(slots, s)
	}
	if p.h.cgroups != nil && len(slots) > 0 {
		if err := p.h.cgroups.attach(slots); err != nil {
			errs = append(errs, err)
			for _, s := range slots {
				p.end(s, true)
			}
			failed += len(slots)
			slots = nil
		}
	}
	if failed > 0 {
		p.mu.Lock()
		p.live -= failed
		p.mu.Unlock()
	}
	if len(slots) == 0 && n > 0 {
		return nil, errors.Join(errs...)
	}
	if len(errs) > 0 {
		p.h.log.Warn("some slots could not be prepared", "err", errors.Join(errs...))
	}
	return slots, nil
}

// newSlot starts a slot's thread and sets up its isolation.
func (p *slotPool) newSlot(id int) (*slot, error) {
	evfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("slot %d: %w", id, err)
	}
	s := &slot{id: id, jobs: make(chan func()), ended: make(chan struct{}), tmpFD: -1, evfd: evfd}
	if r := p.h.runner; r != nil {
		s.cred = &slotCred{uid: r.uid, gid: r.gid}
		if p.uids != nil {
			uid, err := p.uids.acquire()
			if err != nil {
				unix.Close(s.evfd)
				return nil, err
			}
			s.uid, s.cred.uid = uid, uid
		}
	}
	ready := make(chan error, 1)
	p.wg.Add(1)
	go p.runThread(s, ready)
	if err := <-ready; err != nil {
		<-s.ended
		unix.Close(s.evfd)
		if p.uids != nil && s.uid != 0 {
			p.uids.release(s.uid)
		}
		return nil, fmt.Errorf("slot %d: %w", id, err)
	}
	return s, nil
}

// runThread locks a thread that is not the process's main thread (on v1
// the main thread in a function's cgroup would put the agent itself there),
// sets up the slot on it and runs the slot's jobs until the slot ends. On
// failure the goroutine returns still locked, so the runtime ends the
// thread with whatever state the setup left on it.
func (p *slotPool) runThread(s *slot, ready chan<- error) {
	defer p.wg.Done()
	runtime.LockOSThread()
	if unix.Gettid() == p.h.self {
		// Keep the main thread busy until another goroutine has locked a
		// thread of its own, then give the main thread back.
		locked := make(chan struct{})
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			runtime.LockOSThread()
			close(locked)
			p.serve(s, ready)
		}()
		<-locked
		runtime.UnlockOSThread()
		return
	}
	p.serve(s, ready)
}

func (p *slotPool) serve(s *slot, ready chan<- error) {
	defer close(s.ended)
	if err := p.setup(s); err != nil {
		ready <- err
		return
	}
	s.tid = unix.Gettid()
	ready <- nil
	for f := range s.jobs {
		f()
	}
}

// setup gives the calling (slot) thread its namespaces and no_new_privs.
func (p *slotPool) setup(s *slot) error {
	if p.h.namespaces {
		flags := unix.CLONE_FS | unix.CLONE_NEWNS
		if p.h.cfg.Network.Mode == NetworkNone {
			flags |= unix.CLONE_NEWNET
		}
		if err := unix.Unshare(flags); err != nil {
			return fmt.Errorf("namespaces: %w", err)
		}
		if flags&unix.CLONE_NEWNET != 0 {
			if err := loopbackUp(); err != nil {
				return fmt.Errorf("network namespace: %w", err)
			}
		}
		plan := mountPlan{tmpSize: p.h.cfg.TmpSize, masks: p.h.cfg.MaskPaths}
		if s.uid != 0 {
			plan.passwd = passwdWith(p.passwd, s.cred.uid, s.cred.gid)
		}
		fd, err := setupMounts(plan)
		if err != nil {
			return err
		}
		s.tmpFD = fd
		if s.tmpInodes, s.tmpBlocks, err = tmpUsage(fd); err != nil {
			return err
		}
	}
	// Inherited by every process forked here, and impossible to clear: a
	// function can never gain privileges through a setuid binary.
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	if p.h.namespaces {
		scoped, err := scopeThread()
		if err != nil {
			return err
		}
		s.scoped = scoped
	}
	return nil
}

// loopbackUp brings up lo in the calling thread's fresh network namespace.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// end stops a slot's thread (with it go its namespaces and tmpfs) and
// removes its cgroups. keepUID says its uid may be handed out again: only
// when its processes were proven gone.
func (p *slotPool) end(s *slot, keepUID bool) {
	close(s.jobs)
	<-s.ended
	if s.tmpFD >= 0 {
		_ = unix.Close(s.tmpFD)
	}
	_ = unix.Close(s.evfd)
	if p.h.cgroups != nil && s.v1 != nil {
		if err := p.h.cgroups.detach(s); err != nil {
			p.h.log.Warn("removing a slot's cgroups", "slot", s.id, "err", err)
			keepUID = false
		}
	}
	if p.uids != nil && s.uid != 0 {
		if keepUID {
			p.uids.release(s.uid)
		} else {
			p.h.log.Warn("a slot's uid is retired: its processes could not be proven gone", "slot", s.id, "uid", s.uid)
		}
	}
}

// close ends every free slot and the filler; executions must be over.
func (p *slotPool) close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	free := p.free
	p.free = nil
	p.live -= len(free)
	p.mu.Unlock()
	close(p.quit)
	for _, s := range free {
		p.end(s, true)
	}
	p.wakeTakers()
	p.wg.Wait()
	return nil
}

// scoped says whether the slots are in Landlock domains of their own (all
// are, or none: it depends on the kernel).
func (p *slotPool) scoped() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.free) > 0 && p.free[0].scoped
}

// stats reports what the pool holds, for tests and the agent's status.
func (p *slotPool) stats() (live, free, inUse int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.live, len(p.free), p.inUse
}

// Counters that keep names unique within the process.
var (
	sandboxCount  atomic.Uint64
	scratchCount  atomic.Uint64
	clone3Refused atomic.Bool
)
