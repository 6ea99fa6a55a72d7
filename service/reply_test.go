//go:build !windows

// The lifecycle tests run a real redis-server and stop it with SIGSTOP:
// they are built where both exist.

package service

import (
	"bytes"
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// The codec writes a GetExecution reply exactly as protobuf does, from the
// record's own buffer, and gives the reply's memory back when gRPC frees
// that buffer, not before.
func TestServerCodecWritesProtobuf(t *testing.T) {
	svc := &Service{replies: newByteBudget(64 << 20)}
	codec := svc.ServerCodec()
	for _, resp := range []*fluxpb.GetExecutionResponse{
		{Found: false},
		{Found: true, Data: []byte(`{"status":"running"}`)},
		{Found: true, Data: bytes.Repeat([]byte("x"), 2<<20)},
	} {
		held, err := svc.replies.acquire(context.Background(), int64(len(resp.Data)))
		if err != nil {
			t.Fatal(err)
		}
		svc.sending.Store(resp, &replyTicket{budget: svc.replies, n: held})
		got, err := codec.Marshal(resp)
		if err != nil {
			t.Fatal(err)
		}
		want, err := proto.Marshal(resp)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Materialize(), want) {
			t.Errorf("%d-byte reply: codec and protobuf differ", len(resp.Data))
		}
		if len(resp.Data) > 1<<20 && svc.replies.inUse() != held {
			t.Errorf("the reply's memory went back before gRPC freed its buffer")
		}
		got.Free()
		if n := svc.replies.inUse(); n != 0 {
			t.Errorf("%d bytes still held once the buffer is freed", n)
		}
		// Other messages are plain protobuf.
		other := &fluxpb.HealthCheckResponse{Healthy: true, Version: "v"}
		b, err := codec.Marshal(other)
		if want, _ := proto.Marshal(other); err != nil || !bytes.Equal(b.Materialize(), want) {
			t.Errorf("health reply: %v", err)
		}
	}
}

// Through a real gRPC server and client: the record arrives whole, and the
// reply budget is free again once it was sent.
func TestGetExecutionOverGRPC(t *testing.T) {
	h := newHarness(t, nil)
	output := strings.Repeat("\x01 line of output\n", 32<<10) // 0.5 MiB, 0.7 MiB as JSON
	h.register(t, &fluxpb.FunctionConfig{Name: "f"}, exits(0, output))
	h.execute(t, "f", "exc-1", false)

	server := grpc.NewServer(grpc.ForceServerCodecV2(h.svc.ServerCodec()))
	fluxpb.RegisterAgentServiceServer(server, h.svc)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- server.Serve(lis) }()
	t.Cleanup(func() {
		server.Stop()
		<-served
	})
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(50<<20)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := fluxpb.NewAgentServiceClient(conn).GetExecution(ctx, &fluxpb.GetExecutionRequest{ExecutionId: "exc-1"})
	if err != nil {
		t.Fatal(err)
	}
	if rec := h.record(t, "exc-1"); !resp.GetFound() || !bytes.Contains(resp.GetData(), []byte(`"status":"success"`)) || rec.Output != output {
		t.Fatalf("record over gRPC: found %v, %d bytes", resp.GetFound(), len(resp.GetData()))
	}
	if !waitFor(5*time.Second, func() bool { return h.svc.replies.inUse() == 0 }) {
		t.Errorf("%d bytes of reply budget held after the reply was sent", h.svc.replies.inUse())
	}
}
