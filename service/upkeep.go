package service

import (
	"context"
	"slices"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
)

// Pace of the agent's upkeep of Redis.
const (
	// upkeepInterval paces the check of which Redis servers the agent
	// writes to (and, in a Cluster, the reload of the slot map that comes
	// with it), and the retries of settling: a restarted or promoted
	// server is noticed within it.
	upkeepInterval = time.Second
	// sweepInterval paces the settling of the running set once the one at
	// start is done: it finds what a write that failed half-way, or a
	// final record given up, left saying running.
	sweepInterval = 10 * time.Second
	// claimSettleDelay is how long a claim that failed waits before its id
	// is settled: a write that timed out on a stalled server may still be
	// executed when the server resumes, and must come before its settling.
	claimSettleDelay = 5 * time.Second
	// maxToSettle bounds the ids waiting to be settled (a failed claim,
	// a final record given up); past it, new ones are left to the sweep of
	// the running set.
	maxToSettle = 10000
)

// Errors of the records the agent settles.
const (
	reasonAgentStopped = "the agent stopped before the execution finished (crash or kill); it was not run to the end"
	reasonClaimFailed  = "the execution did not start: Redis failed while the agent recorded its start"
	reasonLost         = "the agent lost track of the execution before it recorded its end"
)

// toSettle is an id whose record may say running although nothing runs
// it, settled from notBefore on.
type toSettle struct {
	reason    string
	notBefore time.Time
}

// Start begins the agent's upkeep of Redis, until Shutdown: it settles
// the records an earlier run left running (retrying until Redis answers),
// writes the final records that could not be written when their
// executions ended, refreshes the TTL of running records, and writes back
// what this agent owns (function configs, running records, their output)
// when Redis lost it. Its first round runs before Start returns, within
// ctx, so that an agent that serves has settled what Redis let it settle;
// the rest runs in the background. New starts nothing: call Start before
// the agent serves.
func (s *Service) Start(ctx context.Context) {
	s.mu.Lock()
	if s.stopUpkeep != nil || s.draining {
		s.mu.Unlock()
		return
	}
	bg, cancel := context.WithCancel(context.Background())
	s.stopUpkeep = cancel
	s.upkeepDone.Add(2) // before the first round: Shutdown may come during it
	s.mu.Unlock()
	var u upkeepState
	first, cancelFirst := context.WithCancel(bg) // Shutdown ends it too
	stop := context.AfterFunc(ctx, cancelFirst)
	s.upkeepRound(first, &u)
	stop()
	cancelFirst()
	go func() {
		defer s.upkeepDone.Done()
		s.finals.run(bg)
	}()
	go func() {
		defer s.upkeepDone.Done()
		s.upkeep(bg, &u)
	}()
}

// stopBackground ends the upkeep and waits for it: at most a Redis try.
func (s *Service) stopBackground() {
	s.mu.Lock()
	stop := s.stopUpkeep
	s.mu.Unlock()
	if stop != nil {
		stop()
		s.upkeepDone.Wait()
	}
}

// upkeepState is what the upkeep remembers between rounds.
type upkeepState struct {
	servers   []string // Redis's run ids when last seen; nil before it first answered
	restore   bool     // what the agent owns must be written back
	settled   bool     // the settling at start is done
	swept     time.Time
	refreshed time.Time
	down      bool // the outage is logged
}

// upkeep runs a round every upkeepInterval, the first one after it (Start
// ran one).
func (s *Service) upkeep(ctx context.Context, u *upkeepState) {
	tick := time.NewTicker(upkeepInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		s.upkeepRound(ctx, u)
	}
}

// try runs one Redis step under its own timeout.
func try(ctx context.Context, step func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, redisTryTimeout)
	defer cancel()
	return step(ctx)
}

func (s *Service) upkeepRound(ctx context.Context, u *upkeepState) {
	var servers []string
	err := try(ctx, func(ctx context.Context) (err error) {
		servers, err = s.state.serverIDs(ctx)
		return err
	})
	if err != nil {
		if ctx.Err() == nil {
			s.metrics.RedisError(ctx, "probe")
			if !u.down {
				s.logger.WarnContext(ctx, "Redis does not answer; executions wait for it", "err", err)
				u.down = true
			}
		}
		return
	}
	if u.down {
		s.logger.InfoContext(ctx, "Redis answers again")
		u.down = false
	}
	if !slices.Equal(servers, u.servers) {
		// A first answer counts too: Redis may have restarted empty while
		// the agent was stopped.
		if u.servers != nil {
			s.logger.WarnContext(ctx, "Redis restarted or failed over; writing back what it may have lost",
				"servers_before", u.servers, "servers", servers)
		}
		u.servers, u.restore = servers, true
	}
	if u.restore {
		u.restore = s.restore(ctx) != nil
	}
	if !u.settled || time.Since(u.swept) >= sweepInterval {
		if n, err := s.sweep(ctx); err == nil {
			if n > 0 {
				s.logger.WarnContext(ctx, "marked executions nobody runs any more as failed", "count", n, "at_start", !u.settled)
			}
			u.settled, u.swept = true, time.Now()
		} else if ctx.Err() == nil {
			s.metrics.RedisError(ctx, "settle")
		}
	}
	s.settleQueued(ctx)
	if time.Since(u.refreshed) >= s.opts.ExecutionTTL/3 {
		if s.refreshRunning(ctx) == nil {
			u.refreshed = time.Now()
		}
	}
}

// owns reports whether this process runs id or still has its final record
// to write.
func (s *Service) owns(id string) bool {
	s.mu.Lock()
	e := s.active[id]
	s.mu.Unlock()
	return e != nil || s.finals.has(id)
}

// settleReason words why a record nobody runs any more failed.
func (s *Service) settleReason(rec *Record) string {
	s.settleMu.Lock()
	queued, ok := s.toSettle[rec.ExecutionID]
	s.settleMu.Unlock()
	switch {
	case ok:
		return queued.reason
	case rec.StartedAt.Before(s.startedAt):
		return reasonAgentStopped
	default:
		return reasonLost
	}
}

// sweep settles the running set (see state.settle), a step per try.
func (s *Service) sweep(ctx context.Context) (int, error) {
	var ids []string
	if err := try(ctx, func(ctx context.Context) (err error) {
		ids, err = s.state.runningIDs(ctx)
		return err
	}); err != nil {
		return 0, err
	}
	settled := 0
	for _, id := range ids {
		var done bool
		if err := try(ctx, func(ctx context.Context) (err error) {
			done, err = s.state.settleOne(ctx, id, s.owns, s.settleReason)
			return err
		}); err != nil {
			return settled, err
		}
		if done {
			settled++
		}
	}
	return settled, nil
}

// queueSettle has id settled from delay on.
func (s *Service) queueSettle(id, reason string, delay time.Duration) {
	s.settleMu.Lock()
	defer s.settleMu.Unlock()
	if _, ok := s.toSettle[id]; !ok && len(s.toSettle) >= maxToSettle {
		return
	}
	s.toSettle[id] = toSettle{reason: reason, notBefore: time.Now().Add(delay)}
}

// settleQueued settles the queued ids that are due; what Redis refuses
// waits for the next round.
func (s *Service) settleQueued(ctx context.Context) {
	now := time.Now()
	s.settleMu.Lock()
	var due []string
	for id, q := range s.toSettle {
		if !now.Before(q.notBefore) {
			due = append(due, id)
		}
	}
	s.settleMu.Unlock()
	for _, id := range due {
		if s.owns(id) {
			continue // run again under the same id: settled once it is over
		}
		err := try(ctx, func(ctx context.Context) error {
			_, err := s.state.settleOne(ctx, id, s.owns, s.settleReason)
			return err
		})
		if err != nil {
			if ctx.Err() == nil {
				s.metrics.RedisError(ctx, "settle")
			}
			return
		}
		s.settleMu.Lock()
		delete(s.toSettle, id)
		s.settleMu.Unlock()
	}
}

// running lists the executions whose running records are in Redis (or
// should be), with those records.
func (s *Service) running() ([]*execution, []runningRecord) {
	var execs []*execution
	var recs []runningRecord
	for _, e := range s.activeExecutions() {
		e.mu.Lock()
		if e.stored != nil {
			execs = append(execs, e)
			recs = append(recs, runningRecord{id: e.id, data: e.stored})
		}
		e.mu.Unlock()
	}
	return execs, recs
}

// restore writes back what this agent owns and Redis may have lost: the
// function configs, the running records (back on the running set), and
// the output each running execution wrote so far, checked by its own
// writer.
func (s *Service) restore(ctx context.Context) error {
	fns := s.functionConfigs()
	execs, recs := s.running()
	err := try(ctx, func(ctx context.Context) error { return s.state.restore(ctx, fns, recs) })
	if err != nil {
		if ctx.Err() == nil {
			s.metrics.RedisError(ctx, "restore")
		}
		return err
	}
	for _, e := range execs {
		e.checkOutput()
	}
	s.logger.InfoContext(ctx, "Redis holds what this agent owns", "functions", len(fns), "running", len(recs))
	return nil
}

// refreshRunning sets the TTL of running records and their output again,
// so that an execution longer than the TTL keeps them; a record found
// gone is written back.
func (s *Service) refreshRunning(ctx context.Context) error {
	execs, recs := s.running()
	if len(recs) == 0 {
		return nil
	}
	ids := make([]string, len(recs))
	for i, r := range recs {
		ids[i] = r.id
	}
	var missing []string
	err := try(ctx, func(ctx context.Context) (err error) {
		missing, err = s.state.refresh(ctx, ids)
		return err
	})
	if err != nil {
		if ctx.Err() == nil {
			s.metrics.RedisError(ctx, "refresh")
		}
		return err
	}
	if len(missing) == 0 {
		return nil
	}
	var lost []runningRecord
	for i, r := range recs {
		if slices.Contains(missing, r.id) {
			lost = append(lost, r)
			execs[i].checkOutput()
		}
	}
	s.logger.WarnContext(ctx, "running records were gone from Redis; writing them back", "count", len(lost))
	return try(ctx, func(ctx context.Context) error { return s.state.restore(ctx, nil, lost) })
}

// functionConfigs encodes every function this agent knows, for Redis.
func (s *Service) functionConfigs() map[string][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	fns := make(map[string][]byte, len(s.functions))
	for name, fn := range s.functions {
		if data, err := protojson.Marshal(fn.cfg); err == nil {
			fns[name] = data
		}
	}
	return fns
}
