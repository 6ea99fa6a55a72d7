package sandbox

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

const (
	// networkRetry is how soon a failed refresh is tried again.
	networkRetry = 2 * time.Second

	// reportRate and reportBurst bound, per uid and in the kernel, how many
	// refused attempts are reported one by one: a function that floods
	// costs the agent at most this much; the rest is only counted.
	reportRate  = 10 // per second
	reportBurst = 100

	// nflogGroupTries is how many NFLOG groups are tried before giving up.
	nflogGroupTries = 64
)

// errNetworkFilterClosed is returned by settle after Close.
var errNetworkFilterClosed = errors.New("network filter closed")

// networkFilterOptions configure openNetworkFilter.
type networkFilterOptions struct {
	// Table is the agent's own nftables table (family inet):
	// networkTableName(agent id), since several agents may share a host
	// and a restarted agent must find its own.
	Table string
	// UIDs are the uids functions run as; packets of every other uid are
	// never looked at beyond that check.
	UIDs   UIDRange
	Policy NetworkPolicy
	// Refresh is how often Policy.Protected and resolv.conf are re-read
	// (0: DefaultNetworkRefresh).
	Refresh time.Duration
	Logger  *slog.Logger
	// OnBlocked is called for each reported refusal, from the filter's own
	// goroutine, one call at a time; it must not block or call the filter.
	OnBlocked func(BlockedConnection)
	// netnsFD, for tests, is the network namespace to work in (0 or -1:
	// the caller's).
	netnsFD int
}

// networkFilter is the kernel's enforcement of a filtered NetworkPolicy: an
// nftables table of the agent's own that refuses, for sockets owned by the
// functions' uids, every packet to a forbidden destination, and reports it
// through an NFLOG group.
type networkFilter struct {
	opts   networkFilterOptions
	log    *slog.Logger
	table  *nftables.Table
	sets   filterSets
	prefix string // the NFLOG prefix of this table's reports

	nftMu sync.Mutex // the lasting netlink connection serves one caller at a time
	nft   *nftables.Conn

	nflog      *nflogSocket
	wake       int        // eventfd: settle and Close wake the report reader
	drainMu    sync.Mutex // held by the reader while it takes reports off the socket
	readerDone chan struct{}

	mu             sync.Mutex
	waiters        []chan struct{} // settle calls waiting for the reader to drain
	closing        bool
	reported       map[uint32]uint64 // reports per uid since its last settle
	suppressedSeen map[uint32]uint64 // the suppressed counter per uid at its last settle

	// What the refreshed sets hold, whether their sources are failing, and
	// what the table held after the last change of ours; owned by open,
	// then by the refresh goroutine.
	dns, protected            [2][]netip.Addr // v4, v6
	protectedDown, resolvDown bool
	installed                 tableState

	// monitor reports deletions in the namespace's nftables; tampered
	// tells the refresh goroutine that one concerned this table.
	monitor  *nftables.Monitor
	tampered chan struct{}

	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

// filterSets are the table's sets; the ruleset refers to them by name.
type filterSets struct {
	deny, protected, dns [2]*nftables.Set // v4, v6
	reportLimit          *nftables.Set    // per uid: the token bucket of reports
	suppressed           *nftables.Set    // per uid: attempts refused beyond it
}

// openNetworkFilter installs the policy, replacing the table atomically if
// an earlier run left it (a crash), and starts reporting refusals. The
// error, when the host cannot enforce the policy, names the cause and the
// fix.
func openNetworkFilter(ctx context.Context, opts networkFilterOptions) (_ *networkFilter, err error) {
	if opts.Table == "" || len(opts.Table) > unix.NFT_TABLE_MAXNAMELEN-1 {
		return nil, fmt.Errorf("network filter: table name %q: want 1-%d bytes", opts.Table, unix.NFT_TABLE_MAXNAMELEN-1)
	}
	if opts.UIDs.Count == 0 || opts.UIDs.First == 0 || uint64(opts.UIDs.First)+uint64(opts.UIDs.Count) > 1<<32-1 {
		return nil, fmt.Errorf("network filter: uid range %d+%d: needs at least one uid, above 0 and below 2^32-1", opts.UIDs.First, opts.UIDs.Count)
	}
	if opts.Policy.Mode != NetworkFiltered {
		return nil, fmt.Errorf("network filter: mode %q: only %q is enforced with a table", opts.Policy.Mode, NetworkFiltered)
	}
	if opts.Refresh <= 0 {
		opts.Refresh = DefaultNetworkRefresh
	}
	if opts.Policy.ResolvConf == "" {
		opts.Policy.ResolvConf = DefaultResolvConf
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	f := &networkFilter{
		opts:           opts,
		log:            log.With("table", opts.Table),
		table:          &nftables.Table{Family: nftables.TableFamilyINet, Name: opts.Table},
		prefix:         opts.Table[:min(len(opts.Table), 127)],
		wake:           -1,
		readerDone:     make(chan struct{}),
		reported:       map[uint32]uint64{},
		suppressedSeen: map[uint32]uint64{},
		tampered:       make(chan struct{}, 1),
	}
	f.sets = newFilterSets(f.table)

	connOpts := []nftables.ConnOption{nftables.AsLasting()}
	if opts.netnsFD > 0 {
		connOpts = append(connOpts, nftables.WithNetNSFd(opts.netnsFD))
	}
	if f.nft, err = nftables.New(connOpts...); err != nil {
		return nil, fmt.Errorf("network filter: %w", explainNFTablesError(err))
	}
	defer func() {
		if err != nil {
			f.release()
		}
	}()
	// A read first: it needs the same privilege as the install and tells a
	// missing capability from a missing kernel feature, before an NFLOG
	// group is taken (whose refusals cannot tell them apart).
	if _, err := f.nft.ListTablesOfFamily(nftables.TableFamilyINet); err != nil {
		return nil, fmt.Errorf("network filter: %w", explainNFTablesError(err))
	}
	if f.nflog, err = openNFLOG(opts.netnsFD, nflogGroupCandidates(opts.Table)); err != nil {
		return nil, fmt.Errorf("network filter: reports of refused connections: %w", err)
	}
	if f.wake, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return nil, fmt.Errorf("network filter: eventfd: %w", err)
	}

	f.readSources(ctx)
	counts, err := f.install()
	if err != nil {
		return nil, fmt.Errorf("network filter: install table %s: %w", opts.Table, f.diagnose(err))
	}
	defer func() {
		if err != nil {
			f.nft.DelTable(f.table)
			_ = f.nft.Flush()
		}
	}()
	if err := f.readBack(counts); err != nil {
		return nil, fmt.Errorf("network filter: table %s: %w", opts.Table, err)
	}
	events, err := f.watch()
	if err != nil {
		return nil, fmt.Errorf("network filter: watch for changes to table %s: %w", opts.Table, err)
	}
	f.log.Info("network policy installed", "uids", fmt.Sprintf("%d-%d", opts.UIDs.First, opts.UIDs.First+opts.UIDs.Count-1),
		"nflog_group", f.nflog.group, "protected", len(f.protected[0])+len(f.protected[1]))

	loopCtx, cancel := context.WithCancel(context.Background())
	f.cancel = cancel
	f.wg.Add(3)
	go f.readReports()
	go f.refreshLoop(loopCtx)
	go f.forwardTampering(events)
	return f, nil
}

// Close removes the table, stops the filter's goroutines and waits for
// them.
func (f *networkFilter) Close() error {
	f.closeOnce.Do(func() {
		f.cancel()
		f.mu.Lock()
		f.closing = true
		f.mu.Unlock()
		f.monitor.Close() // forwardTampering ends with its events
		f.poke()
		f.wg.Wait()

		f.nftMu.Lock()
		f.nft.DelTable(f.table)
		err := f.nft.Flush()
		f.nftMu.Unlock()
		if err != nil && !errors.Is(err, unix.ENOENT) {
			f.closeErr = fmt.Errorf("network filter: delete table %s: %w", f.opts.Table, err)
		}
		f.release()
	})
	return f.closeErr
}

// release closes the sockets; the table stays as it is.
func (f *networkFilter) release() {
	if f.monitor != nil {
		_ = f.monitor.Close()
	}
	if f.nft != nil {
		_ = f.nft.CloseLasting()
	}
	if f.nflog != nil {
		_ = f.nflog.close()
	}
	if f.wake >= 0 {
		_ = unix.Close(f.wake)
	}
}

// settle is called once uid's execution has ended (its cgroup is empty) and
// before the uid is used again. It returns when every report the kernel
// queued for it has gone through OnBlocked, and says how many further
// attempts the kernel refused without a report (the per-uid rate limit)
// since uid's last settle. It costs no netlink request unless uid had
// reports.
//
// The kernel queues each report on the socket before the refused send or
// connect returns to the function, so once the execution has ended, an
// empty socket and an idle reader mean every report of it went through.
func (f *networkFilter) settle(ctx context.Context, uid uint32) (suppressed uint64, err error) {
	f.drainMu.Lock()
	pending := f.nflog.pending()
	f.drainMu.Unlock()
	if pending {
		if err := f.drain(ctx); err != nil {
			return 0, err
		}
	}
	f.mu.Lock()
	n := f.reported[uid]
	delete(f.reported, uid)
	f.mu.Unlock()
	if n == 0 {
		return 0, nil
	}

	f.nftMu.Lock()
	elems, err := f.nft.GetSetElements(f.sets.suppressed)
	f.nftMu.Unlock()
	if err != nil {
		return 0, fmt.Errorf("network filter: read suppressed reports: %w", err)
	}
	key := uidKey(uid)
	for _, e := range elems {
		if e.Counter == nil || string(e.Key) != string(key) {
			continue
		}
		f.mu.Lock()
		suppressed = e.Counter.Packets - f.suppressedSeen[uid]
		if e.Counter.Packets < f.suppressedSeen[uid] {
			suppressed = e.Counter.Packets // the table was installed again since
		}
		f.suppressedSeen[uid] = e.Counter.Packets
		f.mu.Unlock()
	}
	return suppressed, nil
}

// drain returns once the reader has taken every report queued before the
// call.
func (f *networkFilter) drain(ctx context.Context) error {
	done := make(chan struct{})
	f.mu.Lock()
	if f.closing {
		f.mu.Unlock()
		return errNetworkFilterClosed
	}
	f.waiters = append(f.waiters, done)
	f.mu.Unlock()
	f.poke()
	select {
	case <-done:
		return nil
	case <-f.readerDone:
		return errNetworkFilterClosed
	case <-ctx.Done():
		return ctx.Err()
	}
}

// poke wakes the report reader.
func (f *networkFilter) poke() {
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	_, _ = unix.Write(f.wake, one[:]) // EAGAIN: it is awake already
}

// readReports is the filter's report goroutine: it waits for reports, and
// serves settle and Close.
func (f *networkFilter) readReports() {
	defer f.wg.Done()
	defer close(f.readerDone)
	var lost int
	var lostLogged time.Time
	for {
		fds := []unix.PollFd{{Fd: int32(f.nflog.fd), Events: unix.POLLIN}, {Fd: int32(f.wake), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, -1); err != nil && !errors.Is(err, unix.EINTR) {
			f.log.Error("network filter: reports of refused connections stopped", "err", err)
			return
		}
		var counter [8]byte
		_, _ = unix.Read(f.wake, counter[:])
		f.mu.Lock()
		waiters, closing := f.waiters, f.closing
		f.waiters = nil
		f.mu.Unlock()

		f.drainMu.Lock()
		n, err := f.nflog.receive(f.report)
		f.drainMu.Unlock()
		for _, w := range waiters {
			close(w)
		}
		if err != nil {
			f.log.Error("network filter: reports of refused connections stopped", "err", err)
			return
		}
		// Rate-limited in the kernel per uid, so only many uids at once
		// can fill the socket; say so, at most once a minute.
		if lost += n; lost > 0 && time.Since(lostLogged) > time.Minute {
			f.log.Warn("network filter: reports of refused connections were lost (receive buffer full); their attempts were still refused", "times", lost)
			lost, lostLogged = 0, time.Now()
		}
		if closing {
			return
		}
	}
}

// report takes one refusal from the kernel to OnBlocked.
func (f *networkFilter) report(uid uint32, prefix string, dst netip.AddrPort, proto uint8) {
	// A crashed agent's table may still log to a group this one took over.
	if prefix != f.prefix || uid < f.opts.UIDs.First || uid-f.opts.UIDs.First >= f.opts.UIDs.Count {
		return
	}
	f.mu.Lock()
	f.reported[uid]++
	f.mu.Unlock()
	if f.opts.OnBlocked != nil {
		f.opts.OnBlocked(BlockedConnection{UID: uid, Destination: dst, Protocol: protocolName(proto)})
	}
}

// refreshLoop re-reads the protected addresses and resolv.conf (sooner
// while they fail), and puts the table back when another program changed
// it: an nftables reload that flushes the ruleset would otherwise leave the
// functions unfiltered.
func (f *networkFilter) refreshLoop(ctx context.Context) {
	defer f.wg.Done()
	t := time.NewTimer(f.nextRefresh())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-f.tampered:
			f.repair()
			continue
		case <-t.C:
		}
		old := [2][2][]netip.Addr{f.dns, f.protected}
		f.readSources(ctx)
		if ctx.Err() != nil {
			return
		}
		if err := f.updateSets(old); err != nil {
			f.log.Error("network filter: refresh failed; the previous addresses stay", "err", err)
			f.dns, f.protected = old[0], old[1]
			t.Reset(min(networkRetry, f.opts.Refresh))
			continue
		}
		// Element deletions are not watched (they cannot be told apart
		// from the refreshes'): this periodic check finds them.
		if !f.repair() {
			t.Reset(min(networkRetry, f.opts.Refresh))
			continue
		}
		t.Reset(f.nextRefresh())
	}
}

// repair compares the table with what was installed and, if another
// program changed it, installs it again. It says whether the table is as
// installed now.
func (f *networkFilter) repair() bool {
	now, err := f.readState()
	if err == nil && now.equal(f.installed) {
		return true
	}
	f.log.Error("network filter: the table was changed by another program; installing it again",
		"err", errors.Join(err, f.installed.diff(now)))
	counts, err := f.install()
	if err == nil {
		err = f.readBack(counts)
	}
	if err != nil {
		f.log.Error("network filter: installing the table again failed; functions may be unfiltered", "err", err)
		return false
	}
	f.log.Info("network filter: table installed again")
	return true
}

// readBack reads the table just installed as the state later checks
// compare with, once it holds what counts says was installed (another
// program may change it in between).
func (f *networkFilter) readBack(counts tableCounts) error {
	st, err := f.readState()
	if err != nil {
		return fmt.Errorf("read back: %w", err)
	}
	if err := counts.diff(st); err != nil {
		return fmt.Errorf("changed as soon as installed: %w", err)
	}
	f.installed = st
	return nil
}

// tableCounts is how many rules each chain and elements each address set
// of the table has.
type tableCounts struct {
	rules, elements map[string]int
}

// diff describes how st differs from c.
func (c tableCounts) diff(st tableState) error {
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(c.rules)) {
		if n := len(st.rules[name]); n != c.rules[name] {
			errs = append(errs, fmt.Errorf("chain %s: %d rules, not %d", name, n, c.rules[name]))
		}
	}
	for _, name := range slices.Sorted(maps.Keys(c.elements)) {
		if n, ok := st.elements[name]; !ok || n != c.elements[name] {
			errs = append(errs, fmt.Errorf("set %s: %d elements, not %d", name, n, c.elements[name]))
		}
	}
	return errors.Join(errs...)
}

// tableState is what the table holds: the rules of each chain, the
// number of elements of each address set.
type tableState struct {
	rules    map[string][][]expr.Any
	elements map[string]int
}

func (s tableState) equal(o tableState) bool {
	return reflect.DeepEqual(s.rules, o.rules) && maps.Equal(s.elements, o.elements)
}

// diff describes how got differs from s.
func (s tableState) diff(got tableState) error {
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(s.rules)) {
		if rules, ok := got.rules[name]; !ok {
			errs = append(errs, fmt.Errorf("chain %s: missing", name))
		} else if len(rules) != len(s.rules[name]) {
			errs = append(errs, fmt.Errorf("chain %s: %d rules, not the %d installed", name, len(rules), len(s.rules[name])))
		} else if !reflect.DeepEqual(rules, s.rules[name]) {
			errs = append(errs, fmt.Errorf("chain %s: a rule changed", name))
		}
	}
	for _, name := range slices.Sorted(maps.Keys(s.elements)) {
		if n, ok := got.elements[name]; !ok {
			errs = append(errs, fmt.Errorf("set %s: missing", name))
		} else if n != s.elements[name] {
			errs = append(errs, fmt.Errorf("set %s: %d elements, not the %d installed", name, n, s.elements[name]))
		}
	}
	return errors.Join(errs...)
}

// filterChains are the table's chains.
var filterChains = []string{"output", "functions", "refuse", "reject"}

// readState reads the table's state; a missing chain or set is missing
// from the result.
func (f *networkFilter) readState() (tableState, error) {
	f.nftMu.Lock()
	defer f.nftMu.Unlock()
	st := tableState{rules: map[string][][]expr.Any{}, elements: map[string]int{}}
	if _, err := f.nft.ListTableOfFamily(f.table.Name, f.table.Family); errors.Is(err, unix.ENOENT) {
		return st, nil
	} else if err != nil {
		return st, err
	}
	for _, name := range filterChains {
		rules, err := f.nft.GetRules(f.table, &nftables.Chain{Name: name, Table: f.table})
		if errors.Is(err, unix.ENOENT) {
			continue
		} else if err != nil {
			return st, err
		}
		st.rules[name] = make([][]expr.Any, len(rules))
		for i, r := range rules {
			st.rules[name][i] = r.Exprs
		}
	}
	for _, set := range slices.Concat(f.sets.deny[:], f.sets.protected[:], f.sets.dns[:]) {
		elems, err := f.nft.GetSetElements(set)
		if err != nil {
			// google/nftables loses the errno here: a missing set reads
			// as missing, and a real failure shows as a difference.
			continue
		}
		st.elements[set.Name] = len(elems)
	}
	return st, nil
}

// watch subscribes to the changes in the namespace's nftables.
func (f *networkFilter) watch() (chan *nftables.MonitorEvents, error) {
	var connOpts []nftables.ConnOption
	if f.opts.netnsFD > 0 {
		connOpts = append(connOpts, nftables.WithNetNSFd(f.opts.netnsFD))
	}
	c, err := nftables.New(connOpts...)
	if err != nil {
		return nil, err
	}
	// Everything: google/nftables v0.3.0 delivers nothing for narrower
	// choices (its flag test reads (flags&1)<<type).
	m := nftables.NewMonitor()
	events, err := c.AddGenerationalMonitor(m)
	if err != nil {
		return nil, err
	}
	f.monitor = m
	return events, nil
}

// forwardTampering tells the refresh goroutine about deletions in this
// table, coalesced, so that the monitor never waits for it. It ends when
// the monitor does (Close, or a netlink error; then the periodic check
// stays).
func (f *networkFilter) forwardTampering(events chan *nftables.MonitorEvents) {
	defer f.wg.Done()
	for gen := range events {
		for _, ev := range gen.Changes {
			if ev.Type == nftables.MonitorEventTypeOOB {
				f.mu.Lock()
				closing := f.closing
				f.mu.Unlock()
				if !closing {
					f.log.Warn("network filter: watching the table stopped; it is still checked every refresh", "err", ev.Error)
				}
				continue
			}
			switch ev.Type {
			case nftables.MonitorEventTypeDelTable, nftables.MonitorEventTypeDelChain, nftables.MonitorEventTypeDelRule, nftables.MonitorEventTypeDelSet:
			default:
				continue
			}
			if !f.concerns(ev.Data) {
				continue
			}
			select {
			case f.tampered <- struct{}{}:
			default:
			}
		}
	}
}

// concerns says whether a deleted object was this table or in it.
func (f *networkFilter) concerns(obj any) bool {
	var t *nftables.Table
	switch o := obj.(type) {
	case *nftables.Table:
		t = o
	case *nftables.Chain:
		t = o.Table
	case *nftables.Rule:
		t = o.Table
	case *nftables.Set:
		t = o.Table
	}
	return t != nil && t.Name == f.table.Name && t.Family == f.table.Family
}

func (f *networkFilter) nextRefresh() time.Duration {
	if f.protectedDown || f.resolvDown {
		return min(networkRetry, f.opts.Refresh)
	}
	return f.opts.Refresh
}

// readSources reads resolv.conf and the protected addresses into f.dns and
// f.protected; a source that fails keeps its previous addresses and is
// logged once per outage.
func (f *networkFilter) readSources(ctx context.Context) {
	servers, err := readResolvConf(f.opts.Policy.ResolvConf)
	if err != nil {
		if !f.resolvDown {
			f.log.Warn("network filter: cannot read the nameservers; the previous ones stay open", "err", err)
		}
		f.resolvDown = true
	} else {
		if f.resolvDown {
			f.log.Info("network filter: nameservers read again")
		}
		f.resolvDown = false
		f.dns = splitAddrs(servers)
	}

	if f.opts.Policy.Protected == nil {
		return
	}
	pctx, cancel := context.WithTimeout(ctx, f.opts.Refresh)
	addrs, err := f.opts.Policy.Protected(pctx)
	cancel()
	if err != nil {
		if !f.protectedDown {
			f.log.Warn("network filter: cannot resolve the protected addresses; the previous ones stay blocked", "err", err)
		}
		f.protectedDown = true
		return
	}
	if f.protectedDown {
		f.log.Info("network filter: protected addresses resolved again")
	}
	f.protectedDown = false
	f.protected = splitAddrs(addrs)
}

// readResolvConf reads the nameservers of path; a missing file lists none
// (the resolver then asks no one either).
func readResolvConf(path string) ([]netip.Addr, error) {
	file, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer file.Close()
	return parseResolvConf(file)
}

// updateSets replaces, in one transaction, the sets whose addresses changed
// since old.
func (f *networkFilter) updateSets(old [2][2][]netip.Addr) error {
	f.nftMu.Lock()
	defer f.nftMu.Unlock()
	changed := false
	for i, now := range [2][2][]netip.Addr{f.dns, f.protected} {
		sets := [2][2]*nftables.Set{f.sets.dns, f.sets.protected}[i]
		for fam := range 2 {
			if slices.Equal(old[i][fam], now[fam]) {
				continue
			}
			changed = true
			f.nft.FlushSet(sets[fam])
			if len(now[fam]) > 0 {
				if err := f.nft.SetAddElements(sets[fam], addrElements(now[fam])); err != nil {
					return err
				}
			}
		}
	}
	if !changed {
		return nil
	}
	if err := f.nft.Flush(); err != nil {
		return err
	}
	for i, sets := range [2][2]*nftables.Set{f.sets.dns, f.sets.protected} {
		for fam, set := range sets {
			f.installed.elements[set.Name] = len([2][2][]netip.Addr{f.dns, f.protected}[i][fam])
		}
	}
	return nil
}

// splitAddrs sorts addresses into IPv4 and IPv6 (IPv4-mapped ones are
// IPv4: that is what the kernel sends), without zones or duplicates.
func splitAddrs(addrs []netip.Addr) [2][]netip.Addr {
	var out [2][]netip.Addr
	for _, a := range addrs {
		if !a.IsValid() {
			continue
		}
		a = a.WithZone("").Unmap()
		fam := 0
		if a.Is6() {
			fam = 1
		}
		out[fam] = append(out[fam], a)
	}
	for fam := range out {
		slices.SortFunc(out[fam], netip.Addr.Compare)
		out[fam] = slices.Compact(out[fam])
	}
	return out
}

func nflogGroupCandidates(table string) []uint16 {
	h := fnv.New32a()
	h.Write([]byte(table))
	first := 0x8000 + h.Sum32()%(0x8000-nflogGroupTries)
	groups := make([]uint16, nflogGroupTries)
	for i := range groups {
		groups[i] = uint16(first) + uint16(i)
	}
	return groups
}

// builtinDeny are the destinations refused besides the node's own
// addresses (which the kernel's routing knows, addresses added later
// included): loopback, "this host", link-local, multicast and broadcast
// (they are delivered to the node's own sockets too), and IPv4-mapped IPv6
// (never on the wire; the kernel sends IPv4 for them, which the IPv4 rules
// see).
var builtinDeny = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("255.255.255.255/32"),
	netip.MustParsePrefix("::/127"),
	netip.MustParsePrefix("::ffff:0:0/96"),
	netip.MustParsePrefix("fe80::/10"),
	netip.MustParsePrefix("ff00::/8"),
}

func newFilterSets(t *nftables.Table) filterSets {
	addrSet := func(name string, v6, interval bool) *nftables.Set {
		s := &nftables.Set{Table: t, Name: name, KeyType: nftables.TypeIPAddr, Interval: interval}
		if v6 {
			s.KeyType = nftables.TypeIP6Addr
		}
		return s
	}
	uidSet := func(name string) *nftables.Set {
		return &nftables.Set{Table: t, Name: name, KeyType: nftables.TypeUID, Dynamic: true, KeyByteOrder: binaryutil.NativeEndian}
	}
	return filterSets{
		deny:        [2]*nftables.Set{addrSet("deny4", false, true), addrSet("deny6", true, true)},
		protected:   [2]*nftables.Set{addrSet("protected4", false, false), addrSet("protected6", true, false)},
		dns:         [2]*nftables.Set{addrSet("nameservers4", false, false), addrSet("nameservers6", true, false)},
		reportLimit: uidSet("report_limit"),
		suppressed:  uidSet("suppressed"),
	}
}

// install replaces the table in one transaction: if an earlier run left
// it, its rules hold until the new ones take over, and no copy remains. It
// returns how many rules each chain and elements each address set got.
func (f *networkFilter) install() (counts tableCounts, err error) {
	f.nftMu.Lock()
	defer f.nftMu.Unlock()
	c, t := f.nft, f.table
	counts = tableCounts{rules: map[string]int{}, elements: map[string]int{}}
	addSet := func(set *nftables.Set, elems []nftables.SetElement) error {
		if set.KeyType != nftables.TypeUID {
			counts.elements[set.Name] = len(elems)
		}
		return c.AddSet(set, elems)
	}
	c.AddTable(t) // so that the delete cannot fail when there is none
	c.DelTable(t)
	c.AddTable(t)

	size := min(f.opts.UIDs.Count, 1<<20)
	f.sets.reportLimit.Size, f.sets.suppressed.Size = size, size
	var deny [2][]netip.Prefix
	for _, p := range append(slices.Clone(builtinDeny), f.opts.Policy.Deny...) {
		fam := 0
		if p.Addr().Is6() {
			fam = 1
		}
		deny[fam] = append(deny[fam], p)
	}
	for fam := range 2 {
		if err := addSet(f.sets.deny[fam], intervalElements(deny[fam])); err != nil {
			return counts, err
		}
		if err := addSet(f.sets.protected[fam], addrElements(f.protected[fam])); err != nil {
			return counts, err
		}
		if err := addSet(f.sets.dns[fam], addrElements(f.dns[fam])); err != nil {
			return counts, err
		}
	}
	if err := addSet(f.sets.reportLimit, nil); err != nil {
		return counts, err
	}
	if err := addSet(f.sets.suppressed, nil); err != nil {
		return counts, err
	}

	accept := nftables.ChainPolicyAccept
	output := c.AddChain(&nftables.Chain{Name: "output", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	functions := c.AddChain(&nftables.Chain{Name: "functions", Table: t})
	refuse := c.AddChain(&nftables.Chain{Name: "refuse", Table: t})
	reject := c.AddChain(&nftables.Chain{Name: "reject", Table: t})
	rule := func(ch *nftables.Chain, exprs ...expr.Any) {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: exprs})
		counts.rules[ch.Name]++
	}
	cat := func(parts ...[]expr.Any) []expr.Any { return slices.Concat(parts...) }

	// Only the functions' sockets go further. A packet without a full
	// socket (a SYN-ACK, a reset the kernel answers with) cannot load its
	// uid, so the rule does not match and the packet is accepted.
	first, last := f.opts.UIDs.First, f.opts.UIDs.First+f.opts.UIDs.Count-1
	rule(output,
		&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
		&expr.Byteorder{SourceRegister: 1, DestRegister: 1, Op: expr.ByteorderHton, Len: 4, Size: 4},
		&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: binary.BigEndian.AppendUint32(nil, first), ToData: binary.BigEndian.AppendUint32(nil, last)},
		&expr.Verdict{Kind: expr.VerdictJump, Chain: functions.Name})

	// 1. The operator's exceptions, before any deny.
	for _, e := range f.opts.Policy.Allow {
		for _, proto := range []byte{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
			var port []expr.Any
			if e.Port != 0 {
				port = matchDport(e.Port)
			}
			rule(functions, cat(matchPrefix(e.Prefix), matchL4(proto), port, verdict(expr.VerdictAccept, ""))...)
		}
	}
	// 2. DNS to the nameservers of resolv.conf.
	for fam, set := range f.sets.dns {
		for _, proto := range []byte{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
			rule(functions, cat(matchL4(proto), matchDport(53), lookupDaddr(fam == 1, set), verdict(expr.VerdictAccept, ""))...)
		}
	}
	// 3. Refused: the denied ranges and protected addresses (cheap
	// lookups first), then the node's own addresses as routing knows them.
	for fam := range 2 {
		rule(functions, cat(lookupDaddr(fam == 1, f.sets.deny[fam]), verdict(expr.VerdictGoto, refuse.Name))...)
		rule(functions, cat(lookupDaddr(fam == 1, f.sets.protected[fam]), verdict(expr.VerdictGoto, refuse.Name))...)
	}
	rule(functions, cat(matchFibType(unix.RTN_LOCAL), verdict(expr.VerdictGoto, refuse.Name))...)
	rule(functions, cat(matchNFProto(unix.NFPROTO_IPV4), matchFibType(unix.RTN_BROADCAST), verdict(expr.VerdictGoto, refuse.Name))...)
	// 4. Everything else: the chain ends, the base chain accepts.

	// Reports, rate-limited per uid in the kernel: over the limit, an
	// attempt is only counted in the suppressed set.
	rule(refuse,
		&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
		&expr.Dynset{SrcRegKey: 1, SetName: f.sets.reportLimit.Name, SetID: f.sets.reportLimit.ID, Operation: unix.NFT_DYNSET_OP_ADD,
			Exprs: []expr.Any{&expr.Limit{Type: expr.LimitTypePkts, Rate: reportRate, Unit: expr.LimitTimeSecond, Burst: reportBurst, Over: true}}},
		&expr.Dynset{SrcRegKey: 1, SetName: f.sets.suppressed.Name, SetID: f.sets.suppressed.ID, Operation: unix.NFT_DYNSET_OP_ADD,
			Exprs: []expr.Any{&expr.Counter{}}},
		&expr.Verdict{Kind: expr.VerdictGoto, Chain: reject.Name})
	rule(refuse,
		&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX | 1<<unix.NFTA_LOG_SNAPLEN | 1<<unix.NFTA_LOG_QTHRESHOLD,
			Group: f.nflog.group, Data: []byte(f.prefix), Snaplen: nflogCopyRange, QThreshold: 1},
		&expr.Verdict{Kind: expr.VerdictGoto, Chain: reject.Name})

	// Refused fast. TCP gets a reset: connect fails at once with
	// ECONNREFUSED. UDP is dropped on its way out, which fails the send
	// itself with EPERM (an ICMP error would add nothing for a local
	// sender, and, rate-limited, would turn some later sends into
	// EHOSTUNREACH instead). Anything else gets an ICMP "administratively
	// prohibited" too: an ICMPv6 echo's send does not fail when dropped,
	// and ping learns it from the error.
	rule(reject, cat(matchL4(unix.IPPROTO_TCP), []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_TCP_RST}})...)
	rule(reject, cat(matchL4(unix.IPPROTO_UDP), verdict(expr.VerdictDrop, ""))...)
	rule(reject, &expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_ADMIN_PROHIBITED})
	return counts, c.Flush()
}

func verdict(kind expr.VerdictKind, chain string) []expr.Any {
	return []expr.Any{&expr.Verdict{Kind: kind, Chain: chain}}
}

func matchNFProto(p byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

func matchL4(p byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

// matchDport matches the destination port of TCP or UDP (checked before).
func matchDport(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, port)},
	}
}

// loadDaddr loads the destination address of IPv4 or IPv6 packets (and
// matches only those).
func loadDaddr(v6 bool) []expr.Any {
	if v6 {
		return append(matchNFProto(unix.NFPROTO_IPV6), &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 24, Len: 16})
	}
	return append(matchNFProto(unix.NFPROTO_IPV4), &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4})
}

func lookupDaddr(v6 bool, set *nftables.Set) []expr.Any {
	return append(loadDaddr(v6), &expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID})
}

func matchPrefix(p netip.Prefix) []expr.Any {
	v6 := p.Addr().Is6()
	if p.Bits() == 0 {
		if v6 {
			return matchNFProto(unix.NFPROTO_IPV6)
		}
		return matchNFProto(unix.NFPROTO_IPV4)
	}
	exprs := loadDaddr(v6)
	n := p.Addr().BitLen() / 8
	if p.Bits() < p.Addr().BitLen() {
		mask := make([]byte, n)
		for i := range p.Bits() {
			mask[i/8] |= 0x80 >> (i % 8)
		}
		exprs = append(exprs, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: uint32(n), Mask: mask, Xor: make([]byte, n)})
	}
	return append(exprs, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Addr().AsSlice()})
}

// matchFibType matches packets whose destination is of routing type typ
// (RTN_LOCAL: an address of this node, as the kernel knows them now).
func matchFibType(typ uint32) []expr.Any {
	return []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(typ)},
	}
}

func uidKey(uid uint32) []byte { return binaryutil.NativeEndian.PutUint32(uid) }

func addrElements(addrs []netip.Addr) []nftables.SetElement {
	elems := make([]nftables.SetElement, len(addrs))
	for i, a := range addrs {
		elems[i] = nftables.SetElement{Key: a.AsSlice()}
	}
	return elems
}

// intervalElements turns prefixes of one family into the elements of an
// interval set: overlapping and adjacent ones merged (the kernel refuses
// overlaps), each range its first address and, unless it reaches the top
// of the address space, the end marker just past its last.
func intervalElements(prefixes []netip.Prefix) []nftables.SetElement {
	type span struct{ first, last netip.Addr }
	spans := make([]span, 0, len(prefixes))
	for _, p := range prefixes {
		p = p.Masked()
		spans = append(spans, span{p.Addr(), lastAddr(p)})
	}
	slices.SortFunc(spans, func(a, b span) int { return a.first.Compare(b.first) })
	var merged []span
	for _, s := range spans {
		if n := len(merged); n > 0 {
			prev := &merged[n-1]
			if next := prev.last.Next(); !next.IsValid() || s.first.Compare(next) <= 0 {
				if s.last.Compare(prev.last) > 0 {
					prev.last = s.last
				}
				continue
			}
		}
		merged = append(merged, s)
	}
	var elems []nftables.SetElement
	for _, s := range merged {
		elems = append(elems, nftables.SetElement{Key: s.first.AsSlice()})
		if end := s.last.Next(); end.IsValid() {
			elems = append(elems, nftables.SetElement{Key: end.AsSlice(), IntervalEnd: true})
		}
	}
	return elems
}

// lastAddr is the highest address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// explainNFTablesError says what a refusal of nf_tables means and how to
// fix it.
func explainNFTablesError(err error) error {
	switch {
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return fmt.Errorf("nftables refused (%w): the agent needs CAP_NET_ADMIN to enforce sandbox.network %q: run it as root or grant the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN), or set sandbox.network: %s (unsafe)", err, NetworkFiltered, NetworkHost)
	case errors.Is(err, unix.EPROTONOSUPPORT), errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ENOENT), errors.Is(err, unix.EAFNOSUPPORT):
		return fmt.Errorf("nf_tables is not available (%w): the kernel needs CONFIG_NF_TABLES and CONFIG_NF_TABLES_INET (try modprobe nf_tables), or set sandbox.network: %s (unsafe)", err, NetworkHost)
	}
	return err
}

// diagnose turns a failed install into the feature the kernel lacks, found
// by trying each in a probe table that one transaction creates and deletes
// (nothing of it is ever in effect).
func (f *networkFilter) diagnose(installErr error) error {
	if errors.Is(installErr, unix.EPERM) {
		return explainNFTablesError(installErr)
	}
	probes := []struct {
		feature, needs string
		exprs          []expr.Any
	}{
		{"uid ranges", "nft_range (Linux 4.9)", []expr.Any{
			&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
			&expr.Byteorder{SourceRegister: 1, DestRegister: 1, Op: expr.ByteorderHton, Len: 4, Size: 4},
			&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{0, 0, 0, 1}, ToData: []byte{0, 0, 0, 2}}}},
		{"fib daddr type", "nft_fib_inet (Linux 4.10)", matchFibType(unix.RTN_LOCAL)},
		{"reject", "nft_reject_inet", []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_ADMIN_PROHIBITED}}},
		{"log to an NFLOG group", "nft_log and nfnetlink_log", []expr.Any{&expr.Log{Key: 1 << unix.NFTA_LOG_GROUP, Group: f.nflog.group}}},
	}
	probe := &nftables.Table{Family: nftables.TableFamilyINet, Name: f.opts.Table + "-probe"}
	f.nftMu.Lock()
	defer f.nftMu.Unlock()
	for _, p := range probes {
		f.nft.AddTable(probe)
		ch := f.nft.AddChain(&nftables.Chain{Name: "probe", Table: probe, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityFilter})
		f.nft.AddRule(&nftables.Rule{Table: probe, Chain: ch, Exprs: p.exprs})
		f.nft.DelTable(probe)
		if err := f.nft.Flush(); err != nil {
			return fmt.Errorf("the kernel cannot do %s in nftables (%w): it needs %s, or set sandbox.network: %s (unsafe)", p.feature, err, p.needs, NetworkHost)
		}
	}
	return fmt.Errorf("%w (every feature probed alone works; the kernel may lack limits or counters in dynamic sets, Linux 5.x)", installErr)
}
