package sandbox

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// NetworkMode says what a function may reach over the network.
type NetworkMode string

// The network modes; NetworkFiltered is the default.
const (
	// NetworkFiltered lets functions reach other hosts and the internet,
	// never the node itself, its loopback, link-local ranges, the agent's
	// Redis servers or the operator's denied CIDRs.
	NetworkFiltered NetworkMode = "filtered"
	// NetworkNone gives each execution an empty network namespace: its own
	// loopback only.
	NetworkNone NetworkMode = "none"
	// NetworkHost applies no policy: a function reaches everything the node
	// reaches, the agent's own ports and Redis included. Unsafe with
	// untrusted code.
	NetworkHost NetworkMode = "host"
)

// networkTableName is the nftables table of the agent agentID: stable, so
// that a restarted agent replaces its own table, and apart from other
// agents' on the same host. Readable when the id is a plain name, hashed
// otherwise.
func networkTableName(agentID string) string {
	const prefix = "flux-agent-"
	plain := len(agentID) > 0 && len(agentID) <= 64
	for _, r := range agentID {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			plain = false
		}
	}
	if plain {
		return prefix + agentID
	}
	sum := sha256.Sum256([]byte(agentID))
	return prefix + hex.EncodeToString(sum[:8])
}

// ErrInvalidNetworkPolicy is wrapped by the parsers of this file for a value
// they refuse.
var ErrInvalidNetworkPolicy = errors.New("invalid network policy")

// ParseNetworkMode reads a mode as written in the configuration.
func ParseNetworkMode(s string) (NetworkMode, error) {
	switch m := NetworkMode(s); m {
	case NetworkFiltered, NetworkNone, NetworkHost:
		return m, nil
	}
	return "", fmt.Errorf("%w: network mode %q: want %q, %q or %q", ErrInvalidNetworkPolicy, s, NetworkFiltered, NetworkNone, NetworkHost)
}

// UnmarshalText implements encoding.TextUnmarshaler with
// ParseNetworkMode (any case, spaces trimmed).
func (m *NetworkMode) UnmarshalText(text []byte) error {
	v, err := ParseNetworkMode(strings.ToLower(strings.TrimSpace(string(text))))
	if err != nil {
		return err
	}
	*m = v
	return nil
}

// NetworkPolicy is what functions may reach in filtered mode.
type NetworkPolicy struct {
	Mode NetworkMode
	// Deny lists the operator's extra denied CIDRs (sandbox.network_deny).
	Deny []netip.Prefix
	// Allow lists the operator's exceptions (sandbox.network_allow); they are
	// checked before any deny, the built-in ones included.
	Allow []NetworkException
	// Protected returns addresses no function may reach besides the node's
	// own: the agent's Redis servers (resolved; Cluster and Sentinel nodes
	// included). It is called at open and every refresh period; nil means
	// none. An error keeps the previous set (and is logged once per outage).
	Protected func(context.Context) ([]netip.Addr, error)
	// ResolvConf is read for the nameservers that stay reachable on port 53
	// ("" = /etc/resolv.conf).
	ResolvConf string
}

// Defaults of the filtered policy.
const (
	// DefaultResolvConf is where the system's resolvers are listed.
	DefaultResolvConf = "/etc/resolv.conf"
	// DefaultNetworkRefresh is how often the filter re-reads the protected
	// addresses (the Redis servers may move) and resolv.conf.
	DefaultNetworkRefresh = 30 * time.Second
)

// NetworkException opens one destination on purpose: an address or prefix,
// and a port (0 = every port), for TCP and UDP.
type NetworkException struct {
	Prefix netip.Prefix
	Port   uint16
}

// ParseNetworkException reads an exception as written in the configuration:
// "10.0.0.5:8125", "[fd00::1]:53", "10.1.0.0/16", "10.1.0.0/16:443",
// "fd00::/64", "[fd00::/64]:443". A missing port means every port.
func ParseNetworkException(s string) (NetworkException, error) {
	bad := func(format string, args ...any) (NetworkException, error) {
		return NetworkException{}, fmt.Errorf("%w: network exception %q: %s", ErrInvalidNetworkPolicy, s, fmt.Sprintf(format, args...))
	}
	host, port := s, ""
	switch {
	case strings.HasPrefix(s, "["):
		end := strings.Index(s, "]")
		if end < 0 {
			return bad("missing ]")
		}
		host, port = s[1:end], s[end+1:]
		if port == "" {
			return bad("brackets are for an address with a port: write it without them")
		}
		if !strings.HasPrefix(port, ":") {
			return bad("want :port after ]")
		}
		port = port[1:]
		if !strings.Contains(host, ":") {
			return bad("brackets are for IPv6 addresses")
		}
	case strings.Contains(s, "/"):
		// "a/bits" or "a/bits:port": the port follows the prefix length.
		slash := strings.LastIndex(s, "/")
		if i := strings.LastIndex(s[slash:], ":"); i >= 0 {
			host, port = s[:slash+i], s[slash+i+1:]
		}
	case strings.Count(s, ":") == 1:
		host, port, _ = strings.Cut(s, ":")
	}
	p, err := parsePrefix(host)
	if err != nil {
		return bad("%v", err)
	}
	e := NetworkException{Prefix: p}
	if port != "" || strings.HasSuffix(s, ":") {
		n, err := strconv.ParseUint(port, 10, 16)
		if err != nil || n == 0 {
			return bad("port %q: want 1-65535, or no port for every port", port)
		}
		e.Port = uint16(n)
	}
	return e, nil
}

// UnmarshalText implements encoding.TextUnmarshaler with
// ParseNetworkException, so configuration files hold exceptions as text.
func (e *NetworkException) UnmarshalText(text []byte) error {
	v, err := ParseNetworkException(strings.TrimSpace(string(text)))
	if err != nil {
		return err
	}
	*e = v
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (e NetworkException) MarshalText() ([]byte, error) { return []byte(e.String()), nil }

// String writes e the way ParseNetworkException reads it.
func (e NetworkException) String() string {
	host := e.Prefix.String()
	if e.Prefix.IsSingleIP() {
		host = e.Prefix.Addr().String()
	}
	if e.Port == 0 {
		return host
	}
	if e.Prefix.Addr().Is6() {
		return "[" + host + "]:" + strconv.Itoa(int(e.Port))
	}
	return host + ":" + strconv.Itoa(int(e.Port))
}

// ParseNetworkPrefix reads a CIDR or a single address (sandbox.network_deny).
// It refuses set host bits ("10.1.2.3/16") rather than guess which was
// meant, and zones; IPv4-mapped IPv6 forms become IPv4, which is what the
// kernel puts on the wire for them.
func ParseNetworkPrefix(s string) (netip.Prefix, error) {
	p, err := parsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%w: %q: %v", ErrInvalidNetworkPolicy, s, err)
	}
	return p, nil
}

func parsePrefix(s string) (netip.Prefix, error) {
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		if p, err = netip.ParsePrefix(s); err != nil {
			return p, errors.New("not an address or CIDR")
		}
		if p != p.Masked() {
			return p, fmt.Errorf("host bits set: did you mean %s?", p.Masked())
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return p, errors.New("not an address or CIDR")
		}
		if a.Zone() != "" {
			return p, errors.New("zones are not supported")
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if a := p.Addr(); a.Is4In6() {
		if p.Bits() < 96 {
			return p, errors.New("an IPv4-mapped prefix needs at least 96 bits")
		}
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p, nil
}

// parseResolvConf returns the nameservers resolv.conf lists, in order, as
// plain addresses (zones and IPv4 mappings removed).
func parseResolvConf(r io.Reader) ([]netip.Addr, error) {
	var servers []netip.Addr
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(fields[1])
		if err != nil {
			continue // the resolver ignores it too
		}
		servers = append(servers, a.WithZone("").Unmap())
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read resolv.conf: %w", err)
	}
	return servers, nil
}

// BlockedConnection is one attempt the policy refused.
type BlockedConnection struct {
	// UID owns the socket that tried: the integrator maps it to the running
	// execution.
	UID uint32
	// Destination is the address and port tried (port 0 for protocols
	// without ports).
	Destination netip.AddrPort
	// Protocol is "tcp", "udp", "icmp", "icmpv6", or the IP protocol number.
	Protocol string
}

// protocolName names an IP protocol number the way BlockedConnection does.
func protocolName(p uint8) string {
	switch p {
	case 1:
		return "icmp"
	case 6:
		return "tcp"
	case 17:
		return "udp"
	case 58:
		return "icmpv6"
	}
	return strconv.Itoa(int(p))
}
