package nodeinfo

import (
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func ipNet(cidr string) *net.IPNet {
	ip, n, err := net.ParseCIDR(cidr)
	if err != nil {
		panic(err)
	}
	n.IP = ip // keep the host part, as Interface.Addrs does; ParseIP gives the 16-byte form
	return n
}

func TestFirstPrivateIPv4(t *testing.T) {
	up := net.FlagUp | net.FlagBroadcast | net.FlagRunning
	lo := nic{index: 1, name: "lo", flags: net.FlagUp | net.FlagLoopback, addrs: []net.Addr{ipNet("127.0.0.1/8"), ipNet("::1/128")}}
	tests := []struct {
		name    string
		nics    []nic
		want    string
		wantErr error
	}{
		{
			name: "ordinary server",
			nics: []nic{lo, {index: 2, name: "eth0", flags: up, addrs: []net.Addr{ipNet("10.0.3.7/24"), ipNet("fe80::1/64")}}},
			want: "10.0.3.7",
		},
		{
			name: "IPv6 first on the interface",
			nics: []nic{{index: 2, name: "eth0", flags: up, addrs: []net.Addr{ipNet("fd00::2/64"), ipNet("192.0.2.2/24")}}},
			want: "192.0.2.2",
		},
		{
			name: "lowest index wins whatever the list order",
			nics: []nic{
				{index: 5, name: "docker0", flags: up, addrs: []net.Addr{ipNet("172.17.0.1/16")}},
				{index: 2, name: "eth0", flags: up, addrs: []net.Addr{ipNet("10.1.1.1/16")}},
			},
			want: "10.1.1.1",
		},
		{
			name: "down interface skipped",
			nics: []nic{
				{index: 2, name: "eth0", flags: net.FlagBroadcast, addrs: []net.Addr{ipNet("10.1.1.1/16")}},
				{index: 3, name: "wlan0", flags: up, addrs: []net.Addr{ipNet("192.168.1.20/24")}},
			},
			want: "192.168.1.20",
		},
		{
			name: "link-local and loopback addresses skipped on an ordinary interface",
			nics: []nic{{index: 2, name: "eth0", flags: up, addrs: []net.Addr{ipNet("169.254.10.1/16"), ipNet("127.0.0.2/8"), ipNet("10.9.9.9/8")}}},
			want: "10.9.9.9",
		},
		{
			name: "IPAddr as well as IPNet",
			nics: []nic{{index: 2, name: "tun0", flags: up | net.FlagPointToPoint, addrs: []net.Addr{&net.IPAddr{IP: net.ParseIP("100.64.0.5")}}}},
			want: "100.64.0.5",
		},
		{name: "loopback only", nics: []nic{lo}, wantErr: ErrNoPrivateIPv4},
		{name: "IPv6 only", nics: []nic{lo, {index: 2, name: "eth0", flags: up, addrs: []net.Addr{ipNet("2001:db8::5/64")}}}, wantErr: ErrNoPrivateIPv4},
		{name: "no interfaces", wantErr: ErrNoPrivateIPv4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := firstPrivateIPv4(tt.nics)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("error = %v, want %v", err, tt.wantErr)
			}
			want := netip.Addr{}
			if tt.want != "" {
				want = netip.MustParseAddr(tt.want)
			}
			if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
				t.Errorf("firstPrivateIPv4 (-want +got):\n%s", diff)
			}
		})
	}
}

// On the machine running the test: an IPv4 address that is not loopback,
// or a clear "none".
func TestPrivateIPv4OnThisMachine(t *testing.T) {
	got, err := PrivateIPv4()
	if errors.Is(err, ErrNoPrivateIPv4) {
		t.Skip("this machine has no up interface with an IPv4 address")
	}
	if err != nil {
		t.Fatal(err)
	}
	addr, err := netip.ParseAddr(got)
	if err != nil || !addr.Is4() || addr.IsLoopback() {
		t.Errorf("PrivateIPv4() = %q, want a non-loopback IPv4 address", got)
	}
}
