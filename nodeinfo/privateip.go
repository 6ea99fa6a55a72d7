package nodeinfo

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
)

// ErrNoPrivateIPv4 reports that no up interface has a usable IPv4 address.
var ErrNoPrivateIPv4 = errors.New("no up interface with a non-loopback IPv4 address")

// PrivateIPv4 is the node's address on its own network: the first IPv4
// address, in interface index order, of an up, non-loopback interface.
// Link-local (169.254/16) addresses are skipped, since peers cannot count on
// reaching them.
func PrivateIPv4() (string, error) {
	ifaces, err := net.Interfaces()
	if err != nil {
		return "", fmt.Errorf("list network interfaces: %w", err)
	}
	nics := make([]nic, 0, len(ifaces))
	for _, iface := range ifaces {
		addrs, err := iface.Addrs()
		if err != nil {
			return "", fmt.Errorf("addresses of interface %s: %w", iface.Name, err)
		}
		nics = append(nics, nic{index: iface.Index, name: iface.Name, flags: iface.Flags, addrs: addrs})
	}
	addr, err := firstPrivateIPv4(nics)
	if err != nil {
		return "", err
	}
	return addr.String(), nil
}

// nic is what firstPrivateIPv4 needs of a net.Interface, as plain data so
// tests can describe any machine.
type nic struct {
	index int
	name  string
	flags net.Flags
	addrs []net.Addr
}

func firstPrivateIPv4(nics []nic) (netip.Addr, error) {
	nics = slices.Clone(nics)
	slices.SortStableFunc(nics, func(a, b nic) int { return cmp.Compare(a.index, b.index) })
	for _, n := range nics {
		if n.flags&net.FlagUp == 0 || n.flags&net.FlagLoopback != 0 {
			continue
		}
		for _, a := range n.addrs {
			addr, ok := ipOf(a)
			if !ok {
				continue
			}
			addr = addr.Unmap()
			if addr.Is4() && !addr.IsLoopback() && !addr.IsLinkLocalUnicast() && !addr.IsUnspecified() {
				return addr, nil
			}
		}
	}
	return netip.Addr{}, ErrNoPrivateIPv4
}

// ipOf takes the IP out of the address types net.Interface.Addrs returns.
func ipOf(a net.Addr) (netip.Addr, bool) {
	switch a := a.(type) {
	case *net.IPNet:
		return netip.AddrFromSlice(a.IP)
	case *net.IPAddr:
		return netip.AddrFromSlice(a.IP)
	}
	return netip.Addr{}, false
}
