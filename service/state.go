package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
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

// updateRecord replaces the record (not the output) of an execution.
func (s *state) updateRecord(ctx context.Context, rec *Record) error {
	data, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode record %s: %w", rec.ExecutionID, err)
	}
	if err := s.rdb.Set(ctx, s.recordKey(rec.ExecutionID), data, s.ttl).Err(); err != nil {
		return fmt.Errorf("update record %s: %w", rec.ExecutionID, err)
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

// writeOutput stores output bytes at their offset. The cost is the chunk,
// never the whole output so far.
func (s *state) writeOutput(ctx context.Context, id string, offset int64, chunk []byte) error {
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

// finishRecord writes the last output, then the final record, then takes
// the execution off the running set, in one round trip. The record and
// output share a slot (one node, one connection), so a reader never sees
// the final status before all the output; the write is idempotent and may
// be retried.
func (s *state) finishRecord(ctx context.Context, rec *Record, rest []outputPiece) error {
	data, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode record %s: %w", rec.ExecutionID, err)
	}
	_, err = s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, piece := range rest {
			s.setRange(ctx, p, rec.ExecutionID, piece.offset, piece.data)
		}
		p.Set(ctx, s.recordKey(rec.ExecutionID), data, s.ttl)
		p.Expire(ctx, s.outputKey(rec.ExecutionID), s.ttl)
		p.SRem(ctx, s.runningKey(), rec.ExecutionID)
		return nil
	})
	if err != nil {
		return fmt.Errorf("finish record %s: %w", rec.ExecutionID, err)
	}
	return nil
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

// settle marks the executions a previous run of this agent left running
// as failed: their processes died with it (or were killed at its start).
func (s *state) settle(ctx context.Context, reason string) (int, error) {
	ids, err := s.rdb.SMembers(ctx, s.runningKey()).Result()
	if err != nil {
		return 0, fmt.Errorf("list running executions: %w", err)
	}
	settled := 0
	for _, id := range ids {
		rec, err := s.record(ctx, id)
		if err != nil {
			return settled, err
		}
		if rec != nil && !rec.Final() {
			now := time.Now().UTC()
			rec.Status, rec.Error, rec.StatusAt, rec.Queued = StatusFailed, reason, &now, false
			if err := s.finishRecord(ctx, rec, nil); err != nil {
				return settled, err
			}
			settled++
			continue
		}
		if err := s.rdb.SRem(ctx, s.runningKey(), id).Err(); err != nil {
			return settled, fmt.Errorf("settle %s: %w", id, err)
		}
	}
	return settled, nil
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
