package main

import (
	"net"
	"net/netip"
)

// AdminConfig is where the local admin endpoint listens: a root-only Unix
// socket on Linux, a loopback port guarded by a token on Windows. Each OS
// takes only its own keys (validateForOS).
type AdminConfig struct {
	// Socket is the Unix socket's path, created 0600; "" disables it.
	Socket string `yaml:"socket"`
	// Address is the Windows endpoint's loopback host:port; "" disables it.
	Address string `yaml:"address"`
	// TokenFile holds the token a Windows client must present.
	TokenFile string `yaml:"token_file"`
}

// maxSocketPath is what fits sun_path (108 bytes with its NUL on Linux).
const maxSocketPath = 107

func (a AdminConfig) validate() []error {
	errs := a.validateForOS()
	if len(a.Socket) > maxSocketPath {
		errs = append(errs, keyError("socket", "%q is longer than the %d bytes a Unix socket path may have", a.Socket, maxSocketPath))
	}
	if a.Address != "" {
		// The token travels in clear, so the port must not be reachable
		// from another host.
		if !isLoopback(a.Address) {
			errs = append(errs, keyError("address", "%q is not a loopback host:port (e.g. 127.0.0.1:50053)", a.Address))
		}
		if a.TokenFile == "" {
			errs = append(errs, keyError("token_file", "must be set when admin.address is"))
		}
	}
	return errs
}

// isLoopback reports a host:port only this machine can reach.
func isLoopback(hostPort string) bool {
	host, _, err := net.SplitHostPort(hostPort)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}
