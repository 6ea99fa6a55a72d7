package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/protobuf/encoding/protojson"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// state keeps what must outlive the agent process in Redis: function
// configs and execution records. Keys are namespaced by agent id, so several
// agents share one Redis, and carry a hash tag so that one execution's keys
// (record and output) share a Cluster slot and can go in one transaction.
type state struct {
	rdb     redis.UniversalClient
	agentID string
	ttl     time.Duration
}

func (s *state) functionsKey() string { return "flux:agent:{" + s.agentID + "}:functions" }

func (s *state) recordKey(id string) string {
	return "flux:agent:" + s.agentID + ":exec:{" + id + "}"
}

func (s *state) outputKey(id string) string { return s.recordKey(id) + ":output" }

// runningKey is the set of executions whose record may still say running:
// what a restarted agent must settle.
func (s *state) runningKey() string { return "flux:agent:{" + s.agentID + "}:running" }

func (s *state) ping(ctx context.Context) error {
	return s.rdb.Ping(ctx).Err()
}

func (s *state) saveFunction(ctx context.Context, fn *fluxpb.FunctionConfig) error {
	data, err := protojson.Marshal(fn)
	if err != nil {
		return fmt.Errorf("encode function %s: %w", fn.GetName(), err)
	}
	if err := s.rdb.HSet(ctx, s.functionsKey(), fn.GetName(), data).Err(); err != nil {
		return fmt.Errorf("save function %s: %w", fn.GetName(), err)
	}
	return nil
}

// loadFunction returns nil, nil when the function was never registered.
func (s *state) loadFunction(ctx context.Context, name string) (*fluxpb.FunctionConfig, error) {
	data, err := s.rdb.HGet(ctx, s.functionsKey(), name).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("load function %s: %w", name, err)
	}
	fn := &fluxpb.FunctionConfig{}
	if err := protojson.Unmarshal(data, fn); err != nil {
		return nil, fmt.Errorf("decode function %s: %w", name, err)
	}
	return fn, nil
}

// createRecord stores the first record of an execution (data, already
// encoded) and, unless it is final, notes it as running. It returns false
// when the execution id was already used on this agent. One round trip:
// the two keys live in different Cluster slots, so this is a plain
// pipeline; a stale member of the running set (the id was taken) is
// harmless, settle skips final records.
func (s *state) createRecord(ctx context.Context, id string, data []byte, final bool) (bool, error) {
	var set *redis.StatusCmd
	_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		set = p.SetArgs(ctx, s.recordKey(id), data, redis.SetArgs{Mode: "NX", TTL: s.ttl})
		if !final {
			p.SAdd(ctx, s.runningKey(), id)
		}
		return nil
	})
	if errors.Is(set.Err(), redis.Nil) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("create record %s: %w", id, err)
	}
	return set.Val() == "OK", nil
}

// updateRecord replaces the record (not the output) of an execution with
// data, its encoding.
func (s *state) updateRecord(ctx context.Context, id string, data []byte) error {
	if err := s.rdb.Set(ctx, s.recordKey(id), data, s.ttl).Err(); err != nil {
		return fmt.Errorf("update record %s: %w", id, err)
	}
	return nil
}

// setRange queues a write of chunk at offset. The bytes go to the
// connection as they are (a string conversion would copy each chunk), and
// the write is idempotent: a retried write cannot duplicate output, as an
// APPEND would.
func (s *state) setRange(ctx context.Context, p redis.Pipeliner, id string, offset int64, chunk []byte) {
	p.Do(ctx, "setrange", s.outputKey(id), offset, chunk)
}

// outputGapError says Redis holds less of an output than the agent wrote
// (it restarted without its data, or a replica took over without the last
// writes): a write past the end would leave a gap that Redis pads with NUL
// bytes, so none was made.
type outputGapError struct {
	id   string
	have int64 // the output's length in Redis
}

func (e *outputGapError) Error() string {
	return fmt.Sprintf("output of %s: Redis holds only its first %d bytes", e.id, e.have)
}

// setRangeScript writes output at an offset only if Redis holds all the
// output before it, and refreshes its TTL. It returns the output's length
// before the write, or -1 minus that length when it refused. ARGV: offset,
// TTL in ms, bytes.
const setRangeScript = `local have = redis.call('STRLEN', KEYS[1])
if have < tonumber(ARGV[1]) then return -1 - have end
if #ARGV[3] > 0 then redis.call('SETRANGE', KEYS[1], ARGV[1], ARGV[3]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return have`

// finishScript is the final write of an execution whose output went to
// Redis before: the last output and the record, only if Redis still holds
// the output written so far; a record is never final over a gap. It
// returns like setRangeScript. KEYS: record, output (one slot: they share
// their hash tag). ARGV: TTL in ms, the length Redis must hold, the record,
// then offset and bytes of each piece.
const finishScript = `local have = redis.call('STRLEN', KEYS[2])
if have < tonumber(ARGV[2]) then return -1 - have end
for i = 4, #ARGV, 2 do redis.call('SETRANGE', KEYS[2], ARGV[i], ARGV[i+1]) end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return have`

// writeOutput stores output bytes at their offset. The cost is the chunk,
// never the whole output so far. Past offset 0 the write is checked: if
// Redis lost the output before offset, nothing is written and the error is
// an *outputGapError that says how much it holds. An empty chunk only
// checks (and refreshes the TTL).
func (s *state) writeOutput(ctx context.Context, id string, offset int64, chunk []byte) error {
	if offset == 0 {
		_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			s.setRange(ctx, p, id, offset, chunk)
			p.Expire(ctx, s.outputKey(id), s.ttl)
			return nil
		})
		if err != nil {
			return fmt.Errorf("write output of %s: %w", id, err)
		}
		return nil
	}
	have, err := s.rdb.Eval(ctx, setRangeScript, []string{s.outputKey(id)}, offset, s.ttl.Milliseconds(), chunk).Int64()
	if err != nil {
		return fmt.Errorf("write output of %s: %w", id, err)
	}
	if have < 0 {
		return &outputGapError{id: id, have: -1 - have}
	}
	return nil
}

// finishRecord writes the last output, then the final record, then takes
// the execution off the running set, in one round trip. The record and
// output share a slot (one node, one connection), so a reader never sees
// the final status before all the output; the write is idempotent and may
// be retried.
//
// written is how much output went to Redis before (0: none). Then the
// record is written only if Redis still holds it (see finishScript);
// otherwise the error is an *outputGapError and the caller writes the
// output again first. unlisted reports that the execution may be off the
// running set although its record is not final (in a Cluster the set is
// on another node): whoever retries must put it back, so that a crash
// meanwhile still leaves the record to settle.
func (s *state) finishRecord(ctx context.Context, rec *Record, rest []outputPiece, written int64) (unlisted bool, err error) {
	data, err := json.Marshal(rec)
	if err != nil {
		return false, fmt.Errorf("encode record %s: %w", rec.ExecutionID, err)
	}
	id := rec.ExecutionID
	var checked *redis.Cmd
	var srem *redis.IntCmd
	_, err = s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		if written == 0 {
			for _, piece := range rest {
				s.setRange(ctx, p, id, piece.offset, piece.data)
			}
			p.Set(ctx, s.recordKey(id), data, s.ttl)
			p.Expire(ctx, s.outputKey(id), s.ttl)
		} else {
			args := make([]any, 0, 3+2*len(rest))
			args = append(args, s.ttl.Milliseconds(), written, data)
			for _, piece := range rest {
				args = append(args, piece.offset, piece.data)
			}
			checked = p.Eval(ctx, finishScript, []string{s.recordKey(id), s.outputKey(id)}, args...)
		}
		srem = p.SRem(ctx, s.runningKey(), id)
		return nil
	})
	unlisted = srem.Err() == nil
	if err != nil {
		return unlisted, fmt.Errorf("finish record %s: %w", id, err)
	}
	if checked != nil {
		if have, _ := checked.Int64(); have < 0 {
			return true, &outputGapError{id: id, have: -1 - have}
		}
	}
	return false, nil
}

// record returns an execution's record without its output, or nil.
func (s *state) record(ctx context.Context, id string) (*Record, error) {
	data, err := s.rdb.Get(ctx, s.recordKey(id)).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read record %s: %w", id, err)
	}
	var rec Record
	if err := json.Unmarshal(data, &rec); err != nil {
		return nil, fmt.Errorf("decode record %s: %w", id, err)
	}
	return &rec, nil
}

// settle marks as failed the executions of the running set whose records
// still say running although nobody runs them (owned says which this
// process does): a previous run crashed or was killed, or a write failed
// half-way. reason words the error for a record. Members whose records
// are final or gone leave the set.
func (s *state) settle(ctx context.Context, owned func(id string) bool, reason func(*Record) string) (int, error) {
	ids, err := s.runningIDs(ctx)
	if err != nil {
		return 0, err
	}
	settled := 0
	for _, id := range ids {
		done, err := s.settleOne(ctx, id, owned, reason)
		if err != nil {
			return settled, err
		}
		if done {
			settled++
		}
	}
	return settled, nil
}

// runningIDs lists the running set.
func (s *state) runningIDs(ctx context.Context) ([]string, error) {
	ids, err := s.rdb.SMembers(ctx, s.runningKey()).Result()
	if err != nil {
		return nil, fmt.Errorf("list running executions: %w", err)
	}
	return ids, nil
}

// settleOne settles one execution (see settle) and reports whether its
// record said running. Ownership is asked before the record is read: an
// execution of this process stays owned until its final record is in
// Redis, so a record read after it stopped being owned is final, or was
// never this process's.
func (s *state) settleOne(ctx context.Context, id string, owned func(id string) bool, reason func(*Record) string) (bool, error) {
	if owned(id) {
		return false, nil
	}
	rec, err := s.record(ctx, id)
	if err != nil {
		return false, err
	}
	if rec != nil && !rec.Final() {
		now := time.Now().UTC()
		rec.Status, rec.Error, rec.StatusAt, rec.Queued = StatusFailed, reason(rec), &now, false
		if _, err := s.finishRecord(ctx, rec, nil, 0); err != nil {
			return false, err
		}
		return true, nil
	}
	if err := s.rdb.SRem(ctx, s.runningKey(), id).Err(); err != nil {
		return false, fmt.Errorf("settle %s: %w", id, err)
	}
	return false, nil
}

// relist puts an execution back on the running set.
func (s *state) relist(ctx context.Context, id string) error {
	if err := s.rdb.SAdd(ctx, s.runningKey(), id).Err(); err != nil {
		return fmt.Errorf("list %s as running: %w", id, err)
	}
	return nil
}

// runningRecord is a running execution's record as last written.
type runningRecord struct {
	id   string
	data []byte
}

// restore writes back, in one round trip, what Redis must hold of this
// agent and lacks: the function configs (fns: name → encoded config) and
// the records of running executions, which go back on the running set.
// Nothing present is overwritten: a newer registration or a final record
// written meanwhile wins.
func (s *state) restore(ctx context.Context, fns map[string][]byte, runs []runningRecord) error {
	if len(fns) == 0 && len(runs) == 0 {
		return nil
	}
	cmds, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for name, data := range fns {
			p.HSetNX(ctx, s.functionsKey(), name, data)
		}
		for _, r := range runs {
			p.SetArgs(ctx, s.recordKey(r.id), r.data, redis.SetArgs{Mode: "NX", TTL: s.ttl})
			p.SAdd(ctx, s.runningKey(), r.id)
		}
		return nil
	})
	for _, c := range cmds {
		// SET NX answers nil when the record is there: it is not an error.
		if err := c.Err(); err != nil && !errors.Is(err, redis.Nil) {
			return fmt.Errorf("restore: %w", err)
		}
	}
	if err != nil && !errors.Is(err, redis.Nil) {
		return fmt.Errorf("restore: %w", err)
	}
	return nil
}

// refresh sets the TTL of running executions' records and outputs again,
// in one round trip, and returns those whose records are gone.
func (s *state) refresh(ctx context.Context, ids []string) (missing []string, err error) {
	cmds := make([]*redis.BoolCmd, len(ids))
	_, err = s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, id := range ids {
			cmds[i] = p.PExpire(ctx, s.recordKey(id), s.ttl)
			p.PExpire(ctx, s.outputKey(id), s.ttl)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("refresh running records: %w", err)
	}
	for i, c := range cmds {
		if !c.Val() {
			missing = append(missing, ids[i])
		}
	}
	return missing, nil
}

// serverIDs names the Redis servers the agent writes to now, by their run
// ids (every master of a Cluster): a change means a server restarted or a
// replica took over, and may have lost writes.
func (s *state) serverIDs(ctx context.Context) ([]string, error) {
	runID := func(ctx context.Context, c redis.UniversalClient) (string, error) {
		info, err := c.Info(ctx, "server").Result()
		if err != nil {
			return "", err
		}
		for line := range strings.Lines(info) {
			if id, ok := strings.CutPrefix(strings.TrimSpace(line), "run_id:"); ok {
				return id, nil
			}
		}
		return "", errors.New("INFO server has no run_id")
	}
	var ids []string
	switch c := s.rdb.(type) {
	case *redis.ClusterClient:
		var mu sync.Mutex
		err := c.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
			id, err := runID(ctx, m)
			if err != nil {
				return err
			}
			mu.Lock()
			ids = append(ids, id)
			mu.Unlock()
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("redis servers: %w", err)
		}
	default:
		id, err := runID(ctx, s.rdb)
		if err != nil {
			return nil, fmt.Errorf("redis server: %w", err)
		}
		ids = []string{id}
	}
	slices.Sort(ids)
	return ids, nil
}

// storedRecord is a record as read from Redis, with the start of its
// output and the output's whole length.
type storedRecord struct {
	rec       Record
	output    []byte // the first bytes of the output, up to the read's limit
	outputLen int64
}

// readRecord reads an execution's record, at most head bytes of its output
// and the output's length, in one round trip; nil when there is no such
// execution. Most outputs are short and come whole with it; a longer one
// is read by readOutput once the reply's memory is granted.
func (s *state) readRecord(ctx context.Context, id string, head int64) (*storedRecord, error) {
	var recCmd, outCmd *redis.StringCmd
	var lenCmd *redis.IntCmd
	_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		recCmd = p.Get(ctx, s.recordKey(id))
		outCmd = p.GetRange(ctx, s.outputKey(id), 0, head-1)
		lenCmd = p.StrLen(ctx, s.outputKey(id))
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("read record %s: %w", id, err)
	}
	data, err := recCmd.Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read record %s: %w", id, err)
	}
	var sr storedRecord
	if err := json.Unmarshal(data, &sr.rec); err != nil {
		return nil, fmt.Errorf("decode record %s: %w", id, err)
	}
	if sr.output, err = outCmd.Bytes(); err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("read output of %s: %w", id, err)
	}
	if sr.outputLen, err = lenCmd.Result(); err != nil {
		return nil, fmt.Errorf("read output of %s: %w", id, err)
	}
	return &sr, nil
}

// readOutput reads the first n bytes of an execution's output.
func (s *state) readOutput(ctx context.Context, id string, n int64) ([]byte, error) {
	out, err := s.rdb.GetRange(ctx, s.outputKey(id), 0, n-1).Bytes()
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("read output of %s: %w", id, err)
	}
	return out, nil
}
