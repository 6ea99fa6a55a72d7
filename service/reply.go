package service

import (
	"context"
	"sync"

	"go.opentelemetry.io/otel/codes"
	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// replyHeadBytes is how much output the first read of a record brings
// along: most outputs are shorter, and their record takes one round trip.
const replyHeadBytes = 64 << 10

// GetExecution returns an execution's record, with its output so far.
//
// A record is built once, at its final size, from output read once, and
// the memory it takes comes from the node's reply budget first: many
// callers polling a large record wait their turn, within their deadline,
// instead of multiplying the agent's memory. The record's share is given
// back once gRPC has sent it (with ServerCodec) or the call is over
// (without, the budget also counts gRPC's copy of the record).
//
// A final record that still waits for Redis (it failed when the execution
// ended) is answered from the agent's own copy: Redis may not answer, or
// still say running.
func (s *Service) GetExecution(ctx context.Context, req *fluxpb.GetExecutionRequest) (*fluxpb.GetExecutionResponse, error) {
	id := req.GetExecutionId()
	if !executionIDPattern.MatchString(id) {
		return &fluxpb.GetExecutionResponse{Found: false}, nil
	}
	if pf := s.finals.get(id); pf != nil {
		pf.readers.RLock()
		defer pf.readers.RUnlock()
		if !pf.closed && (pf.copy != nil || pf.size == 0) {
			sr := &storedRecord{rec: pf.rec, outputLen: pf.size}
			return s.reply(ctx, sr, func(_ context.Context, n int64) ([]byte, error) { return pf.readOutput(n) })
		}
	}
	sr, err := s.state.readRecord(ctx, id, replyHeadBytes)
	if err != nil {
		s.metrics.RedisError(ctx, "get_record")
		return nil, toStatus(err)
	}
	if sr == nil {
		return &fluxpb.GetExecutionResponse{Found: false}, nil
	}
	return s.reply(ctx, sr, func(ctx context.Context, n int64) ([]byte, error) {
		out, err := s.state.readOutput(ctx, id, n)
		if err != nil {
			s.metrics.RedisError(ctx, "get_record")
		}
		return out, err
	})
}

// reply builds the reply of a record whose output is read by readOutput
// (its first bytes may come with sr).
func (s *Service) reply(ctx context.Context, sr *storedRecord, readOutput func(context.Context, int64) ([]byte, error)) (*fluxpb.GetExecutionResponse, error) {
	waitCtx, span := s.tracer.Start(ctx, spanReplyWait)
	copies := int64(2) // the record, and gRPC's encoding of it
	if s.zeroCopy.Load() {
		copies = 1
	}
	held, err := s.replies.acquire(waitCtx, replyCost(sr.outputLen, copies))
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
	if err != nil {
		return nil, status.FromContextError(err).Err()
	}
	output := sr.output
	if sr.outputLen > int64(len(output)) {
		if output, err = readOutput(ctx, sr.outputLen); err != nil {
			s.replies.release(held)
			return nil, toStatus(err)
		}
	}
	data, err := sr.rec.marshalWithOutput(output, maxRecordBytes)
	if err != nil {
		s.replies.release(held)
		return nil, toStatus(err)
	}
	// The output read is garbage now; the record is held until it is sent.
	kept := min(held, copies*int64(len(data)))
	s.replies.release(held - kept)
	resp := &fluxpb.GetExecutionResponse{Found: true, Data: data}
	t := &replyTicket{budget: s.replies, n: kept}
	s.sending.Store(resp, t)
	context.AfterFunc(ctx, func() { // the call is over and the codec never took it
		if _, ok := s.sending.LoadAndDelete(resp); ok {
			t.Put(nil)
		}
	})
	return resp, nil
}

// replyCost is the memory a reply with outputLen bytes of output may take:
// the output as read, and copies of the record (each output byte may take
// six in JSON, up to the record's bound).
func replyCost(outputLen, copies int64) int64 {
	const recordOverhead = 4 << 10 // the record's other fields
	return outputLen + copies*min(6*outputLen+recordOverhead, maxRecordBytes)
}

// replyTicket is a reply's share of the reply budget. As the pool of the
// reply's gRPC buffer it is given back when gRPC frees the buffer: once
// the record is on the wire, or dropped with its stream.
type replyTicket struct {
	budget *byteBudget
	n      int64
	once   sync.Once
}

// Get is never called: the buffer exists before the ticket.
func (t *replyTicket) Get(length int) *[]byte {
	b := make([]byte, length)
	return &b
}

// Put gives the reply's share back, once.
func (t *replyTicket) Put(*[]byte) { t.once.Do(func() { t.budget.release(t.n) }) }

// ServerCodec is the gRPC codec for the server that serves s: protobuf for
// every message, except that a GetExecution record goes to the wire from
// the buffer it was built in (a 48 MiB record is not copied once more), and
// its share of the reply budget is given back only when gRPC is done with
// it. Without it replies are still bounded while they are built, but not
// while gRPC sends its copy. Pass it with grpc.ForceServerCodecV2.
func (s *Service) ServerCodec() encoding.CodecV2 {
	s.zeroCopy.Store(true)
	return replyCodec{CodecV2: encoding.GetCodecV2(grpcproto.Name), svc: s}
}

type replyCodec struct {
	encoding.CodecV2
	svc *Service
}

// Marshal writes a GetExecution reply as protobuf does (found = 1, data =
// 2), with data as a buffer of its own whose release gives the budget back.
func (c replyCodec) Marshal(v any) (mem.BufferSlice, error) {
	resp, ok := v.(*fluxpb.GetExecutionResponse)
	if !ok {
		return c.CodecV2.Marshal(v)
	}
	held, ok := c.svc.sending.LoadAndDelete(resp)
	if !ok {
		return c.CodecV2.Marshal(v)
	}
	t := held.(*replyTicket)
	var head []byte
	if resp.GetFound() {
		head = protowire.AppendTag(head, 1, protowire.VarintType)
		head = protowire.AppendVarint(head, 1)
	}
	data := resp.GetData()
	if len(data) == 0 {
		t.Put(nil)
		return mem.BufferSlice{mem.SliceBuffer(head)}, nil
	}
	head = protowire.AppendTag(head, 2, protowire.BytesType)
	head = protowire.AppendVarint(head, uint64(len(data)))
	body := mem.NewBuffer(&data, t)
	if _, pooled := body.(mem.SliceBuffer); pooled {
		t.Put(nil) // small: gRPC will not free it, and it costs nothing
	}
	return mem.BufferSlice{mem.SliceBuffer(head), body}, nil
}
