package sandbox

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// nfnetlink_log's protocol (include/uapi/linux/netfilter/nfnetlink_log.h);
// golang.org/x/sys/unix does not carry it.
const (
	nfnlSubsysULOG = 4

	nfulnlMsgPacket = 0
	nfulnlMsgConfig = 1

	nfulaPayload = 9
	nfulaPrefix  = 10
	nfulaUID     = 11

	nfulaCfgCmd     = 1
	nfulaCfgMode    = 2
	nfulaCfgTimeout = 4
	nfulaCfgQThresh = 5

	nfulnlCfgCmdBind = 1
	nfulnlCopyPacket = 2

	nfgenmsgLen = 4
)

// nflogCopyRange is how much of each refused packet the kernel copies to
// us: the IPv4 header with the longest options (60 bytes) or the IPv6 header
// with a few extension headers, and the ports behind them.
const nflogCopyRange = 128

// nflogSocket receives the reports of one NFLOG group: the refused packets
// the filter's rules log to it, with the uid of the socket that sent them.
type nflogSocket struct {
	fd    int
	group uint16
	seq   uint32
	buf   []byte
}

// openNFLOG binds the first free NFLOG group of candidates in the network
// namespace netnsFD (0 or -1: the caller's). Groups are per namespace and
// belong to one socket each: another agent (or ulogd) holding one makes the
// kernel answer EPERM, this socket holding it already EBUSY.
func openNFLOG(netnsFD int, candidates []uint16) (*nflogSocket, error) {
	var fd int
	err := inNetNS(netnsFD, func() (err error) {
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_NETFILTER)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netfilter netlink socket: %w", err)
	}
	s := &nflogSocket{fd: fd, buf: make([]byte, 1<<16)}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		s.close()
		return nil, fmt.Errorf("bind netfilter netlink socket: %w", err)
	}
	// Room for bursts from many executions at once: what does not fit is
	// lost (and noticed as ENOBUFS). FORCE needs CAP_NET_ADMIN, which the
	// filter needs anyway; the plain option is the fallback.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20); err != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	}
	var tried []error
	for _, g := range candidates {
		err := s.configure(g)
		if err == nil {
			s.group = g
			return s, nil
		}
		if !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EBUSY) {
			s.close()
			return nil, fmt.Errorf("bind NFLOG group %d: %w", g, err)
		}
		tried = append(tried, err)
	}
	s.close()
	return nil, fmt.Errorf("no free NFLOG group among %d-%d (held by other programs): %w", candidates[0], candidates[len(candidates)-1], errors.Join(tried...))
}

// configure binds group g and asks for every report at once (a queue
// threshold of 1, not the kernel's default batch of 100 or 1 s), with the
// packet's headers.
func (s *nflogSocket) configure(g uint16) error {
	var attrs []byte
	attrs = appendAttr(attrs, nfulaCfgCmd, []byte{nfulnlCfgCmdBind})
	mode := binary.BigEndian.AppendUint32(nil, nflogCopyRange)
	attrs = appendAttr(attrs, nfulaCfgMode, append(mode, nfulnlCopyPacket, 0))
	attrs = appendAttr(attrs, nfulaCfgQThresh, binary.BigEndian.AppendUint32(nil, 1))
	attrs = appendAttr(attrs, nfulaCfgTimeout, binary.BigEndian.AppendUint32(nil, 1))
	return s.request(g, attrs)
}

// request sends one config message and waits for the kernel's answer.
// Reports that arrive meanwhile (a crashed agent's table may still log to
// the group) are dropped: no execution can own them yet.
func (s *nflogSocket) request(g uint16, attrs []byte) error {
	s.seq++
	msg := make([]byte, unix.NLMSG_HDRLEN, unix.NLMSG_HDRLEN+nfgenmsgLen+len(attrs))
	binary.NativeEndian.PutUint32(msg[0:], uint32(cap(msg)))
	binary.NativeEndian.PutUint16(msg[4:], nfnlSubsysULOG<<8|nfulnlMsgConfig)
	binary.NativeEndian.PutUint16(msg[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	binary.NativeEndian.PutUint32(msg[8:], s.seq)
	msg = append(msg, unix.AF_UNSPEC, unix.NFNETLINK_V0)
	msg = binary.BigEndian.AppendUint16(msg, g)
	msg = append(msg, attrs...)
	if err := unix.Sendto(s.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("send NFLOG config: %w", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		wait := time.Until(deadline)
		if wait <= 0 {
			return errors.New("NFLOG config: no answer from the kernel")
		}
		pfd := []unix.PollFd{{Fd: int32(s.fd), Events: unix.POLLIN}}
		if _, err := unix.Poll(pfd, int(wait.Milliseconds())+1); err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("NFLOG config: poll: %w", err)
		}
		n, _, err := unix.Recvfrom(s.fd, s.buf, unix.MSG_DONTWAIT)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) || errors.Is(err, unix.ENOBUFS) {
			continue
		}
		if err != nil {
			return fmt.Errorf("NFLOG config: receive: %w", err)
		}
		for _, m := range splitNetlinkMessages(s.buf[:n]) {
			if m.typ != unix.NLMSG_ERROR || m.seq != s.seq || len(m.data) < 4 {
				continue
			}
			if errno := -int32(binary.NativeEndian.Uint32(m.data)); errno != 0 {
				return unix.Errno(errno)
			}
			return nil
		}
	}
}

// receive reads what is queued without waiting and calls report for each
// refused packet of this group, until nothing is left. lost counts the
// times the kernel found the queue full (each time, one or more reports
// were dropped).
func (s *nflogSocket) receive(report func(uid uint32, prefix string, dst netip.AddrPort, proto uint8)) (lost int, err error) {
	for {
		n, _, err := unix.Recvfrom(s.fd, s.buf, unix.MSG_DONTWAIT)
		switch {
		case errors.Is(err, unix.EAGAIN):
			return lost, nil
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.ENOBUFS):
			lost++
			continue
		case err != nil:
			return lost, fmt.Errorf("receive NFLOG reports: %w", err)
		}
		for _, m := range splitNetlinkMessages(s.buf[:n]) {
			if m.typ != nfnlSubsysULOG<<8|nfulnlMsgPacket || len(m.data) < nfgenmsgLen {
				continue
			}
			if binary.BigEndian.Uint16(m.data[2:4]) != s.group {
				continue
			}
			uid, prefix, payload, ok := parseNFLOGAttrs(m.data[nfgenmsgLen:])
			if !ok {
				continue
			}
			dst, proto, ok := parsePacketDestination(payload)
			if !ok {
				continue
			}
			report(uid, prefix, dst, proto)
		}
	}
}

// pending says whether reports wait on the socket.
func (s *nflogSocket) pending() bool {
	pfd := []unix.PollFd{{Fd: int32(s.fd), Events: unix.POLLIN}}
	n, err := unix.Poll(pfd, 0)
	return err != nil || n > 0 // on error, let the reader find out
}

// netlinkMessage is one message of a netlink datagram.
type netlinkMessage struct {
	typ  uint16
	seq  uint32
	data []byte
}

// splitNetlinkMessages returns the messages of one datagram; a truncated
// one ends the list.
func splitNetlinkMessages(b []byte) []netlinkMessage {
	var msgs []netlinkMessage
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(b[0:4]))
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			break
		}
		msgs = append(msgs, netlinkMessage{
			typ:  binary.NativeEndian.Uint16(b[4:6]),
			seq:  binary.NativeEndian.Uint32(b[8:12]),
			data: b[unix.NLMSG_HDRLEN:l],
		})
		b = b[min(nlmsgAlign(l), len(b)):]
	}
	return msgs
}

func nlmsgAlign(l int) int { return (l + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

func (s *nflogSocket) close() error {
	return unix.Close(s.fd)
}

// parseNFLOGAttrs picks the socket's uid, the rule's prefix and the copied
// packet out of one report; ok is false without a uid or a packet.
func parseNFLOGAttrs(b []byte) (uid uint32, prefix string, payload []byte, ok bool) {
	var haveUID bool
	for len(b) >= unix.SizeofNlAttr {
		l := int(binary.NativeEndian.Uint16(b[0:2]))
		t := binary.NativeEndian.Uint16(b[2:4]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
		if l < unix.SizeofNlAttr || l > len(b) {
			break
		}
		v := b[unix.SizeofNlAttr:l]
		switch t {
		case nfulaUID:
			if len(v) == 4 {
				uid, haveUID = binary.BigEndian.Uint32(v), true
			}
		case nfulaPrefix:
			prefix = string(v)
			if i := len(prefix) - 1; i >= 0 && prefix[i] == 0 {
				prefix = prefix[:i]
			}
		case nfulaPayload:
			payload = v
		}
		b = b[min(nlaAlign(l), len(b)):]
	}
	return uid, prefix, payload, haveUID && payload != nil
}

// parsePacketDestination reads where an IPv4 or IPv6 packet goes: the
// address, the destination port for TCP and UDP (0 otherwise, and for
// fragments after the first), and the transport protocol behind any IPv6
// extension headers.
func parsePacketDestination(p []byte) (netip.AddrPort, uint8, bool) {
	if len(p) < 1 {
		return netip.AddrPort{}, 0, false
	}
	var (
		dst       netip.Addr
		proto     uint8
		transport []byte
	)
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 {
			return netip.AddrPort{}, 0, false
		}
		dst = netip.AddrFrom4([4]byte(p[16:20]))
		proto = p[9]
		ihl := int(p[0]&0x0f) * 4
		if fragOffset := binary.BigEndian.Uint16(p[6:8]) & 0x1fff; fragOffset == 0 && ihl >= 20 && ihl <= len(p) {
			transport = p[ihl:]
		}
	case 6:
		if len(p) < 40 {
			return netip.AddrPort{}, 0, false
		}
		dst = netip.AddrFrom16([16]byte(p[24:40]))
		proto, transport = skipIPv6ExtensionHeaders(p[6], p[40:])
	default:
		return netip.AddrPort{}, 0, false
	}
	var port uint16
	if (proto == unix.IPPROTO_TCP || proto == unix.IPPROTO_UDP) && len(transport) >= 4 {
		port = binary.BigEndian.Uint16(transport[2:4])
	}
	return netip.AddrPortFrom(dst, port), proto, true
}

// skipIPv6ExtensionHeaders follows the next-header chain to the transport
// protocol; transport is nil when its header was not copied or the packet
// is a non-first fragment.
func skipIPv6ExtensionHeaders(next uint8, b []byte) (proto uint8, transport []byte) {
	for {
		var l int
		switch next {
		case unix.IPPROTO_HOPOPTS, unix.IPPROTO_ROUTING, unix.IPPROTO_DSTOPTS:
			if len(b) < 2 {
				return next, nil
			}
			l = (int(b[1]) + 1) * 8
		case unix.IPPROTO_FRAGMENT:
			if len(b) < 8 {
				return next, nil
			}
			if binary.BigEndian.Uint16(b[2:4])&0xfff8 != 0 {
				return b[0], nil
			}
			l = 8
		case unix.IPPROTO_AH:
			if len(b) < 2 {
				return next, nil
			}
			l = (int(b[1]) + 2) * 4
		default:
			return next, b
		}
		if l > len(b) {
			return b[0], nil
		}
		next, b = b[0], b[l:]
	}
}

func appendAttr(b []byte, typ uint16, v []byte) []byte {
	l := unix.SizeofNlAttr + len(v)
	b = binary.NativeEndian.AppendUint16(b, uint16(l))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, v...)
	return append(b, make([]byte, nlaAlign(l)-l)...)
}

func nlaAlign(l int) int { return (l + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1) }

// inNetNS runs f on an OS thread that entered the network namespace netnsFD
// (0 or -1: f runs here, in the caller's). The thread is never given back to
// the runtime: it dies with its goroutine, namespace and all.
func inNetNS(netnsFD int, f func() error) error {
	if netnsFD <= 0 {
		return f()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(netnsFD, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter network namespace: %w", err)
			return
		}
		errc <- f()
	}()
	return <-errc
}
