package service

import (
	"context"

	"go.opentelemetry.io/otel/codes"
	"google.golang.org/grpc/status"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// replyHeadBytes is how much output the first read of a record brings
// along: most outputs are shorter, and their record takes one round trip.
const replyHeadBytes = 64 << 10

// GetExecution returns an execution's record, with its output so far.
//
// A record is built once, at its final size, from output read once; what
// it costs (the output read, the record, and gRPC's encoding of it) is
// taken from the node's reply budget first, so that many callers polling a
// large record wait their turn, within their deadline, instead of
// multiplying the agent's memory.
func (s *Service) GetExecution(ctx context.Context, req *fluxpb.GetExecutionRequest) (*fluxpb.GetExecutionResponse, error) {
	id := req.GetExecutionId()
	if !executionIDPattern.MatchString(id) {
		return &fluxpb.GetExecutionResponse{Found: false}, nil
	}
	sr, err := s.state.readRecord(ctx, id, replyHeadBytes)
	if err != nil {
		s.metrics.RedisError(ctx, "get_record")
		return nil, toStatus(err)
	}
	if sr == nil {
		return &fluxpb.GetExecutionResponse{Found: false}, nil
	}
	cost := replyCost(sr.outputLen)
	waitCtx, span := s.tracer.Start(ctx, spanReplyWait)
	err = s.replies.acquire(waitCtx, cost)
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
	if err != nil {
		return nil, status.FromContextError(err).Err()
	}
	defer s.replies.release(cost)
	output := sr.output
	if sr.outputLen > int64(len(output)) {
		if output, err = s.state.readOutput(ctx, id, sr.outputLen); err != nil {
			s.metrics.RedisError(ctx, "get_record")
			return nil, toStatus(err)
		}
	}
	data, err := sr.rec.marshalWithOutput(output, maxRecordBytes)
	if err != nil {
		return nil, toStatus(err)
	}
	return &fluxpb.GetExecutionResponse{Found: true, Data: data}, nil
}

// replyCost is the memory a reply with outputLen bytes of output may take:
// the output as read, the record (each output byte may take six in JSON,
// up to the record's bound) and gRPC's encoding of the record.
func replyCost(outputLen int64) int64 {
	const recordOverhead = 4 << 10 // the record's other fields
	record := min(6*outputLen+recordOverhead, maxRecordBytes)
	return outputLen + 2*record
}
