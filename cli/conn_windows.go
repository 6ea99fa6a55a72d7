package cli

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// connectAdmin dials the admin port on loopback with the token the agent
// wrote to admin.token_file, which only Administrators and SYSTEM may
// read.
func (inv *invocation) connectAdmin(ctx context.Context) (*conn, error) {
	addr := inv.env.AdminAddress
	if addr == "" {
		return nil, errors.New("the admin endpoint is off (admin.address is empty in the agent's config): set it, or use --addr")
	}
	token, err := os.ReadFile(inv.env.AdminTokenFile)
	switch {
	case errors.Is(err, os.ErrPermission):
		return nil, fmt.Errorf("cannot read the admin token %s: run this as Administrator", inv.env.AdminTokenFile)
	case errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("no admin token at %s: is the agent running? (sc query flux-agent)", inv.env.AdminTokenFile)
	case err != nil:
		return nil, fmt.Errorf("admin token: %w", err)
	}
	d := net.Dialer{Timeout: 5 * time.Second}
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("no agent answers on %s: is the agent running? (sc query flux-agent): %w", addr, err)
	}
	raw.Close()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithPerRPCCredentials(tokenCreds(strings.TrimSpace(string(token)))),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessageBytes), grpc.MaxCallSendMsgSize(maxMessageBytes)))
	if err != nil {
		return nil, fmt.Errorf("admin endpoint %s: %w", addr, err)
	}
	return &conn{cc: cc, agent: fluxpb.NewAgentServiceClient(cc), admin: fluxpb.NewAdminServiceClient(cc), where: addr}, nil
}

// tokenCreds presents the admin token with every call. The endpoint is
// loopback only, so it travels without TLS.
type tokenCreds string

func (t tokenCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(t)}, nil
}

func (tokenCreds) RequireTransportSecurity() bool { return false }

// adminEndpoint names the admin endpoint the agent holds.
func adminEndpoint(inv *invocation) string { return inv.env.AdminAddress }
