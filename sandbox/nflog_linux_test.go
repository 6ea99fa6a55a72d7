package sandbox

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// ipv4Packet is an IPv4 header of ihl words to dst, then transport.
func ipv4Packet(ihl int, proto uint8, fragOffset uint16, dst string, transport []byte) []byte {
	h := make([]byte, ihl*4)
	h[0] = 4<<4 | byte(ihl)
	binary.BigEndian.PutUint16(h[6:8], fragOffset)
	h[9] = proto
	copy(h[16:20], netip.MustParseAddr(dst).AsSlice())
	return append(h, transport...)
}

// ipv6Packet is an IPv6 header to dst, then the rest (extension headers,
// transport) starting with next.
func ipv6Packet(next uint8, dst string, rest []byte) []byte {
	h := make([]byte, 40)
	h[0] = 6 << 4
	h[6] = next
	copy(h[24:40], netip.MustParseAddr(dst).AsSlice())
	return append(h, rest...)
}

// ports is the start of a TCP or UDP header.
func ports(dst uint16) []byte {
	return binary.BigEndian.AppendUint16([]byte{0x9c, 0x40}, dst)
}

func TestParsePacketDestination(t *testing.T) {
	extension := func(next uint8, words int) []byte { // hop-by-hop, routing, destination options
		h := make([]byte, (words+1)*8)
		h[0], h[1] = next, byte(words)
		return h
	}
	fragment := func(next uint8, offset uint16) []byte {
		h := make([]byte, 8)
		h[0] = next
		binary.BigEndian.PutUint16(h[2:4], offset<<3)
		return h
	}
	for _, tc := range []struct {
		name   string
		packet []byte
		want   string
		proto  uint8
		ok     bool
	}{
		{"tcp4", ipv4Packet(5, unix.IPPROTO_TCP, 0, "10.0.0.1", ports(443)), "10.0.0.1:443", unix.IPPROTO_TCP, true},
		{"udp4 with options", ipv4Packet(7, unix.IPPROTO_UDP, 0, "127.0.0.1", ports(53)), "127.0.0.1:53", unix.IPPROTO_UDP, true},
		{"icmp4", ipv4Packet(5, unix.IPPROTO_ICMP, 0, "169.254.169.254", []byte{8, 0, 0, 0}), "169.254.169.254:0", unix.IPPROTO_ICMP, true},
		{"udp4 later fragment", ipv4Packet(5, unix.IPPROTO_UDP, 185, "10.0.0.1", ports(53)), "10.0.0.1:0", unix.IPPROTO_UDP, true},
		{"tcp4 header cut", ipv4Packet(5, unix.IPPROTO_TCP, 0, "10.0.0.1", []byte{1, 2}), "10.0.0.1:0", unix.IPPROTO_TCP, true},
		{"tcp6", ipv6Packet(unix.IPPROTO_TCP, "::1", ports(6379)), "[::1]:6379", unix.IPPROTO_TCP, true},
		{"udp6 behind extension headers", ipv6Packet(unix.IPPROTO_HOPOPTS, "fd00::3",
			append(append(extension(unix.IPPROTO_DSTOPTS, 0), extension(unix.IPPROTO_UDP, 1)...), ports(53)...)), "[fd00::3]:53", unix.IPPROTO_UDP, true},
		{"udp6 first fragment", ipv6Packet(unix.IPPROTO_FRAGMENT, "fd00::3", append(fragment(unix.IPPROTO_UDP, 0), ports(53)...)), "[fd00::3]:53", unix.IPPROTO_UDP, true},
		{"udp6 later fragment", ipv6Packet(unix.IPPROTO_FRAGMENT, "fd00::3", append(fragment(unix.IPPROTO_UDP, 10), ports(53)...)), "[fd00::3]:0", unix.IPPROTO_UDP, true},
		{"icmp6", ipv6Packet(unix.IPPROTO_ICMPV6, "fe80::1", []byte{128, 0, 0, 0}), "[fe80::1]:0", unix.IPPROTO_ICMPV6, true},
		{"extension header cut", ipv6Packet(unix.IPPROTO_ROUTING, "fd00::3", []byte{unix.IPPROTO_TCP, 4, 0, 0}), "[fd00::3]:0", unix.IPPROTO_TCP, true},
		{"ipv4 cut", ipv4Packet(5, unix.IPPROTO_TCP, 0, "10.0.0.1", nil)[:19], "", 0, false},
		{"ipv6 cut", ipv6Packet(unix.IPPROTO_TCP, "::1", nil)[:39], "", 0, false},
		{"not ip", []byte{0x50, 0, 0, 0}, "", 0, false},
		{"empty", nil, "", 0, false},
	} {
		dst, proto, ok := parsePacketDestination(tc.packet)
		if ok != tc.ok || (ok && (dst.String() != tc.want || proto != tc.proto)) {
			t.Errorf("%s: %v %d %v; want %s %d %v", tc.name, dst, proto, ok, tc.want, tc.proto, tc.ok)
		}
	}
}

func TestParseNFLOGAttrs(t *testing.T) {
	payload := ipv4Packet(5, unix.IPPROTO_TCP, 0, "10.0.0.1", ports(443))
	uid := binary.BigEndian.AppendUint32(nil, 2_000_000_003)
	var full []byte
	full = appendAttr(full, 1, []byte{0x08, 0x00, 3, 0}) // the packet header: ignored
	full = appendAttr(full, nfulaUID|unix.NLA_F_NET_BYTEORDER, uid)
	full = appendAttr(full, nfulaPrefix, []byte("flux-agent-x\x00"))
	full = appendAttr(full, nfulaPayload, payload)

	gotUID, prefix, gotPayload, ok := parseNFLOGAttrs(full)
	if !ok || gotUID != 2_000_000_003 || prefix != "flux-agent-x" || string(gotPayload) != string(payload) {
		t.Errorf("full report: uid %d prefix %q payload %x ok %v", gotUID, prefix, gotPayload, ok)
	}
	// A packet without a socket has no uid: not the functions'.
	var noUID []byte
	noUID = appendAttr(noUID, nfulaPayload, payload)
	if _, _, _, ok := parseNFLOGAttrs(noUID); ok {
		t.Error("a report without a uid was accepted")
	}
	// A truncated attribute ends the list.
	if _, _, _, ok := parseNFLOGAttrs(full[:len(full)-8]); ok {
		t.Error("a report with a truncated payload was accepted")
	}
}

func TestSplitNetlinkMessages(t *testing.T) {
	msg := func(typ uint16, seq uint32, data string) []byte {
		l := unix.NLMSG_HDRLEN + len(data)
		b := binary.NativeEndian.AppendUint32(nil, uint32(l))
		b = binary.NativeEndian.AppendUint16(b, typ)
		b = binary.NativeEndian.AppendUint16(b, 0)
		b = binary.NativeEndian.AppendUint32(b, seq)
		b = binary.NativeEndian.AppendUint32(b, 0)
		b = append(b, data...)
		return append(b, make([]byte, nlmsgAlign(l)-l)...)
	}
	dgram := append(append(msg(1, 7, "abcde"), msg(2, 8, "")...), msg(3, 9, "xyz")...)
	got := splitNetlinkMessages(append(dgram, 1, 2, 3)) // trailing garbage ignored
	want := []netlinkMessage{{1, 7, []byte("abcde")}, {2, 8, []byte{}}, {3, 9, []byte("xyz")}}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(netlinkMessage{})); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func TestIntervalElements(t *testing.T) {
	p := netip.MustParsePrefix
	key := func(a string) []byte { return netip.MustParseAddr(a).AsSlice() }
	for _, tc := range []struct {
		name string
		in   []netip.Prefix
		want []nftables.SetElement
	}{
		{"merged", []netip.Prefix{p("10.0.0.0/8"), p("255.255.255.255/32"), p("10.1.0.0/16"), p("11.0.0.0/8"), p("0.0.0.0/8"), p("13.0.0.0/8")},
			[]nftables.SetElement{
				{Key: key("0.0.0.0")}, {Key: key("1.0.0.0"), IntervalEnd: true},
				{Key: key("10.0.0.0")}, {Key: key("12.0.0.0"), IntervalEnd: true},
				{Key: key("13.0.0.0")}, {Key: key("14.0.0.0"), IntervalEnd: true},
				{Key: key("255.255.255.255")}, // the top: no end marker
			}},
		{"ipv6", []netip.Prefix{p("ff00::/8"), p("::/127"), p("fe80::/10"), p("::ffff:0:0/96")},
			[]nftables.SetElement{
				{Key: key("::")}, {Key: key("::2"), IntervalEnd: true},
				{Key: key("::ffff:0:0")}, {Key: key("::1:0:0:0"), IntervalEnd: true},
				{Key: key("fe80::")}, {Key: key("fec0::"), IntervalEnd: true},
				{Key: key("ff00::")},
			}},
		{"everything", []netip.Prefix{p("0.0.0.0/0"), p("10.0.0.0/8")}, []nftables.SetElement{{Key: key("0.0.0.0")}}},
	} {
		if diff := cmp.Diff(tc.want, intervalElements(tc.in)); diff != "" {
			t.Errorf("%s (-want +got):\n%s", tc.name, diff)
		}
	}
}

func TestNFLOGGroupCandidates(t *testing.T) {
	a, b := nflogGroupCandidates("flux-agent-a"), nflogGroupCandidates("flux-agent-b")
	if len(a) != nflogGroupTries || a[0] < 0x8000 || a[len(a)-1] < a[0] {
		t.Errorf("candidates %d..%d (%d): want %d consecutive groups from 0x8000 up", a[0], a[len(a)-1], len(a), nflogGroupTries)
	}
	if a[0] == b[0] {
		t.Errorf("two agents start at the same group %d", a[0])
	}
	if again := nflogGroupCandidates("flux-agent-a"); again[0] != a[0] {
		t.Error("the first candidate changes between runs")
	}
}
