package cli

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// maxMessageBytes matches what the agent accepts: deploys up to Flux's
// 50 MiB and more.
const maxMessageBytes = 64 << 20

// conn is a connection to the agent.
type conn struct {
	cc    *grpc.ClientConn
	agent fluxpb.AgentServiceClient
	// admin is nil over --addr, where only AgentService is served.
	admin fluxpb.AdminServiceClient
	// where names the endpoint in messages.
	where string
}

func (c *conn) Close() error { return c.cc.Close() }

// connect reaches the agent: the admin endpoint, or --addr.
func (inv *invocation) connect(ctx context.Context) (*conn, error) {
	if inv.addr == "" {
		if inv.tlsCA != "" || inv.tlsCert != "" || inv.tlsKey != "" {
			return nil, usageError("--tls-ca, --tls-cert and --tls-key go with --addr (the admin endpoint has no TLS)")
		}
		return inv.connectAdmin(ctx)
	}
	if inv.cmd.admin {
		return nil, fmt.Errorf("%s needs the agent's admin socket, which --addr does not reach (it serves only Flux's AgentService): run it on the agent's host, as root, without --addr", inv.cmd.name)
	}
	creds := insecure.NewCredentials()
	if inv.tlsCA != "" || inv.tlsCert != "" || inv.tlsKey != "" {
		cfg, err := inv.tlsConfig()
		if err != nil {
			return nil, err
		}
		creds = credentials.NewTLS(cfg)
	}
	// Fail now, with the reason, rather than at the first call.
	d := net.Dialer{Timeout: 5 * time.Second}
	raw, err := d.DialContext(ctx, "tcp", inv.addr)
	if err != nil {
		return nil, fmt.Errorf("cannot reach the agent at %s: %w (is it running, and is its port open to you?)", inv.addr, err)
	}
	raw.Close()
	cc, err := grpc.NewClient(inv.addr, grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessageBytes), grpc.MaxCallSendMsgSize(maxMessageBytes)))
	if err != nil {
		return nil, fmt.Errorf("--addr %s: %w", inv.addr, err)
	}
	return &conn{cc: cc, agent: fluxpb.NewAgentServiceClient(cc), where: inv.addr}, nil
}

// tlsConfig is Flux's side of the agent's mTLS: the agent's certificate
// checked against the CA under the name flux-agent, a client certificate
// presented.
func (inv *invocation) tlsConfig() (*tls.Config, error) {
	if inv.tlsCA == "" || inv.tlsCert == "" || inv.tlsKey == "" {
		return nil, usageError("mutual TLS needs all three of --tls-ca, --tls-cert and --tls-key")
	}
	caPEM, err := os.ReadFile(inv.tlsCA)
	if err != nil {
		return nil, fmt.Errorf("--tls-ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("--tls-ca %s holds no PEM certificate", inv.tlsCA)
	}
	pair, err := tls.LoadX509KeyPair(inv.tlsCert, inv.tlsKey)
	if err != nil {
		return nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, Certificates: []tls.Certificate{pair}, ServerName: inv.serverName}, nil
}

// connectSocket dials the admin socket once by hand, so that the reason it
// fails is known (gRPC would only say "unavailable"), then hands it to
// gRPC.
func connectSocket(ctx context.Context, path string) (*conn, error) {
	if path == "" {
		return nil, errors.New("the admin endpoint is off (admin.socket is empty in the agent's config): set it, or use --addr")
	}
	d := net.Dialer{Timeout: 5 * time.Second}
	raw, err := d.DialContext(ctx, "unix", path)
	switch {
	case errors.Is(err, syscall.ENOENT):
		return nil, fmt.Errorf("no agent answers on %s (it does not exist): is the agent running? (systemctl status flux-agent, or scripts/run-agent.sh); for an agent with another admin.socket, pass --socket PATH or AGENT_CONFIG=its config", path)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return nil, fmt.Errorf("permission denied on %s: the admin socket is root's alone; run this as root", path)
	case errors.Is(err, syscall.ECONNREFUSED):
		return nil, fmt.Errorf("nothing listens on %s (a socket left by an agent that stopped): is the agent running? (systemctl status flux-agent)", path)
	case err != nil:
		return nil, fmt.Errorf("admin socket %s: %w", path, err)
	}
	raw.Close()
	cc, err := grpc.NewClient("unix:"+path, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessageBytes), grpc.MaxCallSendMsgSize(maxMessageBytes)))
	if err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", path, err)
	}
	return &conn{cc: cc, agent: fluxpb.NewAgentServiceClient(cc), admin: fluxpb.NewAdminServiceClient(cc), where: path}, nil
}

// explain turns a failed call into what to do about it.
func (c *conn) explain(err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	switch st.Code() {
	case codes.Unavailable:
		return fmt.Errorf("the agent at %s did not answer: %s (is it running? a TLS mismatch also shows this way: check --tls-* and --tls-server-name)", c.where, st.Message())
	case codes.DeadlineExceeded:
		return fmt.Errorf("the agent at %s did not answer in time", c.where)
	case codes.Unauthenticated, codes.PermissionDenied:
		return fmt.Errorf("the agent at %s refused the call: %s", c.where, st.Message())
	case codes.Canceled:
		return context.Canceled
	}
	return errors.New(st.Message())
}

// callTimeout bounds each unary call but deploys and sync invokes.
const callTimeout = 10 * time.Second

// unary gives a call its deadline.
func unary(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, callTimeout)
}

// needAdmin says, for a command that can do without it, that the admin
// service is not there.
func (c *conn) hasAdmin() bool { return c.admin != nil }
