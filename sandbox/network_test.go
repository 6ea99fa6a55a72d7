package sandbox

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseNetworkMode(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want NetworkMode
		ok   bool
	}{
		{"filtered", NetworkFiltered, true},
		{"none", NetworkNone, true},
		{"host", NetworkHost, true},
		{"", "", false},
		{"Filtered", "", false},
		{"open", "", false},
	} {
		got, err := ParseNetworkMode(tc.in)
		if got != tc.want || (err == nil) != tc.ok {
			t.Errorf("ParseNetworkMode(%q) = %q, %v; want %q, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalidNetworkPolicy) {
			t.Errorf("ParseNetworkMode(%q): %v is not ErrInvalidNetworkPolicy", tc.in, err)
		}
	}
}

func TestParseNetworkException(t *testing.T) {
	p := netip.MustParsePrefix
	for _, tc := range []struct {
		in     string
		want   NetworkException
		string string // what String gives back, when not in
	}{
		{in: "10.0.0.5:8125", want: NetworkException{p("10.0.0.5/32"), 8125}},
		{in: "[fd00::1]:53", want: NetworkException{p("fd00::1/128"), 53}},
		{in: "10.1.0.0/16", want: NetworkException{p("10.1.0.0/16"), 0}},
		{in: "10.1.0.0/16:443", want: NetworkException{p("10.1.0.0/16"), 443}},
		{in: "fd00::/64", want: NetworkException{p("fd00::/64"), 0}},
		{in: "[fd00::/64]:443", want: NetworkException{p("fd00::/64"), 443}},
		{in: "fd00::/64:443", want: NetworkException{p("fd00::/64"), 443}, string: "[fd00::/64]:443"},
		{in: "10.0.0.5", want: NetworkException{p("10.0.0.5/32"), 0}},
		{in: "fd00::1", want: NetworkException{p("fd00::1/128"), 0}},
		{in: "10.0.0.5/32:80", want: NetworkException{p("10.0.0.5/32"), 80}, string: "10.0.0.5:80"},
		{in: "0.0.0.0/0", want: NetworkException{p("0.0.0.0/0"), 0}},
		{in: "[::ffff:10.0.0.5]:8125", want: NetworkException{p("10.0.0.5/32"), 8125}, string: "10.0.0.5:8125"},
		{in: "::ffff:10.0.0.0/104", want: NetworkException{p("10.0.0.0/8"), 0}, string: "10.0.0.0/8"},
	} {
		got, err := ParseNetworkException(tc.in)
		if err != nil {
			t.Errorf("ParseNetworkException(%q): %v", tc.in, err)
			continue
		}
		if got != tc.want {
			t.Errorf("ParseNetworkException(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
		want := tc.in
		if tc.string != "" {
			want = tc.string
		}
		if s := got.String(); s != want {
			t.Errorf("ParseNetworkException(%q).String() = %q, want %q", tc.in, s, want)
		}
		if again, err := ParseNetworkException(got.String()); err != nil || again != got {
			t.Errorf("round trip of %q: %+v, %v", got.String(), again, err)
		}
	}
}

func TestParseNetworkExceptionRefuses(t *testing.T) {
	for _, in := range []string{
		"",
		"10.0.0.5:",                  // an empty port
		"10.0.0.5:0",                 // 0 is spelled by leaving the port out
		"10.0.0.5:65536",             // too big
		"10.0.0.5:http",              // names are not resolved
		"10.1.2.3/16",                // host bits: 10.1.0.0/16 or 10.1.2.3?
		"10.0.0.0/33",                // no such prefix
		"[10.0.0.5]:80",              // brackets are for IPv6
		"[fd00::1]",                  // brackets without a port
		"[fd00::1]80",                // no colon
		"[fd00::1:80",                // no ]
		"fe80::1%eth0",               // zones
		"[fe80::1%eth0]:53",          //
		"::ffff:10.0.0.0/80",         // a mapped prefix shorter than the mapping
		"redis.internal:6379",        // names
		"10.0.0.5:8125:1",            // two ports
		"10.0.0.5/32/32",             // two lengths
		"fd00::1:53 ",                // trailing space
		"1.2.3.4:80\x00",             // NUL
		"999.0.0.1:80",               // not an address
		"10.0.0.5 , 10.0.0.6",        // one exception per entry
		"[fd00::/64]:0",              // port 0 again
		"fd00::/64:",                 // empty port
		"fd00::/64:99999",            // too big
		"fd00::/129",                 // no such prefix
		"fd00::1/64",                 // host bits
		"[fd00::1/64]:53",            // host bits
		"::ffff:10.0.0.5/96:1",       // a mapped /96 is 0.0.0.0/0 with host bits
		"[::ffff:1.2.3.4/128]:80:80", // two ports
	} {
		if e, err := ParseNetworkException(in); err == nil {
			t.Errorf("ParseNetworkException(%q) = %+v, want an error", in, e)
		} else if !errors.Is(err, ErrInvalidNetworkPolicy) {
			t.Errorf("ParseNetworkException(%q): %v is not ErrInvalidNetworkPolicy", in, err)
		}
	}
}

func TestParseNetworkPrefix(t *testing.T) {
	p := netip.MustParsePrefix
	for _, tc := range []struct {
		in   string
		want netip.Prefix
		ok   bool
	}{
		{"10.0.0.0/8", p("10.0.0.0/8"), true},
		{"10.0.0.5", p("10.0.0.5/32"), true},
		{"fd00::/8", p("fd00::/8"), true},
		{"2001:db8::1", p("2001:db8::1/128"), true},
		{"::ffff:192.168.0.0/112", p("192.168.0.0/16"), true},
		{"::ffff:192.168.0.1", p("192.168.0.1/32"), true},
		{"10.0.0.5/8", netip.Prefix{}, false},
		{"10.0.0.5:80", netip.Prefix{}, false},
		{"fe80::1%lo", netip.Prefix{}, false},
		{"", netip.Prefix{}, false},
	} {
		got, err := ParseNetworkPrefix(tc.in)
		if got != tc.want || (err == nil) != tc.ok {
			t.Errorf("ParseNetworkPrefix(%q) = %v, %v; want %v, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestParseResolvConf(t *testing.T) {
	a := netip.MustParseAddr
	for _, tc := range []struct {
		file string
		want []netip.Addr
	}{
		{"systemd-resolved.conf", []netip.Addr{a("127.0.0.53")}},
		// Zones and IPv4 mappings go (the kernel sends plain IPv4 for the
		// mapped one); lines the resolver would ignore are ignored.
		{"mixed.conf", []netip.Addr{a("10.0.0.2"), a("::1"), a("fe80::1"), a("127.0.0.1"), a("169.254.169.253")}},
		{"empty.conf", nil},
	} {
		f, err := os.Open(filepath.Join("testdata", "resolvconf", tc.file))
		if err != nil {
			t.Fatal(err)
		}
		got, err := parseResolvConf(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(tc.want, got, cmp.Comparer(func(x, y netip.Addr) bool { return x == y })); diff != "" {
			t.Errorf("%s (-want +got):\n%s", tc.file, diff)
		}
	}
}

func TestProtocolName(t *testing.T) {
	for p, want := range map[uint8]string{1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "132"} {
		if got := protocolName(p); got != want {
			t.Errorf("protocolName(%d) = %q, want %q", p, got, want)
		}
	}
}

func TestNetworkTableName(t *testing.T) {
	for in, want := range map[string]string{
		"node-1.eu": "flux-agent-node-1.eu",
		"Node_2":    "flux-agent-Node_2",
		"":          "flux-agent-e3b0c44298fc1c14", // sha256, first 8 bytes
		"a b":       "flux-agent-c8687a08aa5d6ed2",
	} {
		if got := networkTableName(in); got != want {
			t.Errorf("networkTableName(%q) = %q, want %q", in, got, want)
		}
	}
	for _, in := range []string{strings.Repeat("x", 65), "fluxé", "a/b", "a\nb"} {
		if got := networkTableName(in); len(got) != len("flux-agent-")+16 {
			t.Errorf("networkTableName(%q) = %q, want it hashed", in, got)
		}
	}
}
