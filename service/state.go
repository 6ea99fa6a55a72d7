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

// createRecord stores the first record of an execution. It returns false
// when the execution id was already used on this agent.
func (s *state) createRecord(ctx context.Context, rec *Record) (bool, error) {
	data, err := json.Marshal(rec)
	if err != nil {
		return false, fmt.Errorf("encode record %s: %w", rec.ExecutionID, err)
	}
	ok, err := s.rdb.SetArgs(ctx, s.recordKey(rec.ExecutionID), data, redis.SetArgs{Mode: "NX", TTL: s.ttl}).Result()
	if errors.Is(err, redis.Nil) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("create record %s: %w", rec.ExecutionID, err)
	}
	return ok == "OK", nil
}

// updateRecord replaces the record (not the output) of an execution.
func (s *state) updateRecord(ctx context.Context, rec *Record) error {
	data, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode record %s: %w", rec.ExecutionID, err)
	}
	_, err = s.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.Set(ctx, s.recordKey(rec.ExecutionID), data, s.ttl)
		p.Expire(ctx, s.outputKey(rec.ExecutionID), s.ttl)
		return nil
	})
	if err != nil {
		return fmt.Errorf("update record %s: %w", rec.ExecutionID, err)
	}
	return nil
}

// appendOutput adds new output bytes; the cost is the chunk, never the
// whole output so far.
func (s *state) appendOutput(ctx context.Context, id string, chunk []byte) error {
	_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.Append(ctx, s.outputKey(id), string(chunk))
		p.Expire(ctx, s.outputKey(id), s.ttl)
		return nil
	})
	if err != nil {
		return fmt.Errorf("append output of %s: %w", id, err)
	}
	return nil
}

// finishRecord appends the last output and stores the final record in one
// transaction, so a reader never sees a final status without all output.
func (s *state) finishRecord(ctx context.Context, rec *Record, lastChunk []byte) error {
	data, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode record %s: %w", rec.ExecutionID, err)
	}
	_, err = s.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		if len(lastChunk) > 0 {
			p.Append(ctx, s.outputKey(rec.ExecutionID), string(lastChunk))
		}
		p.Set(ctx, s.recordKey(rec.ExecutionID), data, s.ttl)
		p.Expire(ctx, s.outputKey(rec.ExecutionID), s.ttl)
		return nil
	})
	if err != nil {
		return fmt.Errorf("finish record %s: %w", rec.ExecutionID, err)
	}
	return nil
}

// recordJSON returns the record as Flux reads it, output included, and
// false when there is no such execution.
func (s *state) recordJSON(ctx context.Context, id string) ([]byte, bool, error) {
	var recCmd, outCmd *redis.StringCmd
	_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		recCmd = p.Get(ctx, s.recordKey(id))
		outCmd = p.Get(ctx, s.outputKey(id))
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, false, fmt.Errorf("read record %s: %w", id, err)
	}
	data, err := recCmd.Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read record %s: %w", id, err)
	}
	output, err := outCmd.Bytes()
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, false, fmt.Errorf("read output of %s: %w", id, err)
	}
	var rec Record
	if err := json.Unmarshal(data, &rec); err != nil {
		return nil, false, fmt.Errorf("decode record %s: %w", id, err)
	}
	out, err := rec.marshalWithOutput(output)
	if err != nil {
		return nil, false, fmt.Errorf("encode record %s: %w", id, err)
	}
	return out, true, nil
}
