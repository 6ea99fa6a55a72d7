package main

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/windows"
	"google.golang.org/grpc"

	"github.com/serverless-fabric/flux-agent/doctor"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// adminEndpoint is the admin port on Windows: loopback only, each call
// carrying the token the agent wrote at start to admin.token_file, which
// only SYSTEM and Administrators may read.
type adminEndpoint struct {
	net.Listener
	address string
	token   string
}

// adminTokenSDDL gives the token file to SYSTEM and Administrators alone,
// nothing inherited.
const adminTokenSDDL = "D:P(A;;FA;;;SY)(A;;FA;;;BA)"

func listenAdmin(cfg AdminConfig) (*adminEndpoint, error) {
	if cfg.Address == "" {
		return nil, nil
	}
	var raw [32]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return nil, fmt.Errorf("admin token: %w", err)
	}
	token := hex.EncodeToString(raw[:])
	if err := writeToken(cfg.TokenFile, token); err != nil {
		return nil, fmt.Errorf("admin.token_file %s: %w", cfg.TokenFile, err)
	}
	l, err := net.Listen("tcp", cfg.Address)
	if err != nil {
		return nil, fmt.Errorf("admin.address: %w", err)
	}
	return &adminEndpoint{Listener: l, address: cfg.Address, token: token}, nil
}

// writeToken writes a fresh token, the file's access limited before the
// token is in it.
func writeToken(path, token string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	sd, err := windows.SecurityDescriptorFromString(adminTokenSDDL)
	if err != nil {
		return err
	}
	dacl, _, err := sd.DACL()
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	f.Close()
	if err := windows.SetNamedSecurityInfo(path, windows.SE_FILE_OBJECT,
		windows.DACL_SECURITY_INFORMATION|windows.PROTECTED_DACL_SECURITY_INFORMATION, nil, nil, dacl, nil); err != nil {
		return err
	}
	return os.WriteFile(path, []byte(token+"\n"), 0o600)
}

// Where names the endpoint in logs and status.
func (e *adminEndpoint) Where() string { return e.address }

// ServerOptions check the token on every call.
func (e *adminEndpoint) ServerOptions() []grpc.ServerOption {
	check := func(ctx context.Context) error {
		md, _ := metadata.FromIncomingContext(ctx)
		for _, v := range md.Get("authorization") {
			if got, ok := strings.CutPrefix(v, "Bearer "); ok && subtle.ConstantTimeCompare([]byte(got), []byte(e.token)) == 1 {
				return nil
			}
		}
		return status.Error(codes.Unauthenticated, "the admin endpoint needs the token in admin.token_file (run as Administrator)")
	}
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if err := check(ctx); err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if err := check(ss.Context()); err != nil {
				return err
			}
			return h(srv, ss)
		}),
	}
}

// Close stops listening.
func (e *adminEndpoint) Close() error {
	err := e.Listener.Close()
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// adminListener is the admin endpoint as doctor checks it.
func adminListener(cfg AdminConfig) doctor.Listener {
	return doctor.Listener{Key: "admin.address", Network: "tcp", Address: cfg.Address}
}
