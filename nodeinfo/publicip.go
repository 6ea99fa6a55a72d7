package nodeinfo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultPublicIPTimeout bounds one public-IP lookup, body included.
const DefaultPublicIPTimeout = 5 * time.Second

// maxPublicIPBody is more than the longest textual IPv6 address plus a line
// ending; a longer answer is not an address, and is not read further.
const maxPublicIPBody = 64

var (
	// ErrPublicIPStatus reports a lookup service answering other than 200 OK.
	ErrPublicIPStatus = errors.New("public IP service answered with an error status")
	// ErrBadPublicIP reports a lookup service answering with something that
	// is not a single routable IP address (an HTML page, an error text, a
	// loopback address…).
	ErrBadPublicIP = errors.New("public IP service answered with no usable IP address")
)

// lookupPublicIP asks a what-is-my-IP service (such as https://api.ipify.org,
// which answers with the bare address) for the node's public address, within
// timeout. A nil client means http.DefaultClient.
func lookupPublicIP(ctx context.Context, client *http.Client, url string, timeout time.Duration) (string, error) {
	if client == nil {
		client = http.DefaultClient
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", fmt.Errorf("public IP lookup %s: %w", url, err)
	}
	req.Header.Set("Accept", "text/plain")
	resp, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("public IP lookup: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("public IP lookup %s: %s: %w", url, resp.Status, ErrPublicIPStatus)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxPublicIPBody+1))
	if err != nil {
		return "", fmt.Errorf("public IP lookup %s: read answer: %w", url, err)
	}
	if len(body) > maxPublicIPBody {
		return "", fmt.Errorf("public IP lookup %s: answer longer than %d bytes: %w", url, maxPublicIPBody, ErrBadPublicIP)
	}
	addr, err := parsePublicIP(body)
	if err != nil {
		return "", fmt.Errorf("public IP lookup %s: %w", url, err)
	}
	return addr.String(), nil
}

// parsePublicIP accepts exactly one address, surrounded by nothing but white
// space, that another host could reach this node on.
func parsePublicIP(body []byte) (netip.Addr, error) {
	text := bytes.TrimSpace(body)
	addr, err := netip.ParseAddr(string(text))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("answer %q: %w", text, ErrBadPublicIP)
	}
	addr = addr.Unmap()
	if addr.Zone() != "" || addr.IsLoopback() || addr.IsUnspecified() || addr.IsMulticast() ||
		addr.IsLinkLocalUnicast() || addr.IsLinkLocalMulticast() {
		return netip.Addr{}, fmt.Errorf("answer %q is not routable: %w", text, ErrBadPublicIP)
	}
	return addr, nil
}

// retryPolicy says how hard PublicIP tries before giving up.
type retryPolicy struct {
	attempts     int
	firstBackoff time.Duration
	maxBackoff   time.Duration
	timeout      time.Duration
}

var defaultRetryPolicy = retryPolicy{
	attempts:     5,
	firstBackoff: time.Second,
	maxBackoff:   30 * time.Second,
	timeout:      DefaultPublicIPTimeout,
}

// PublicIP is the node's public address, found in the background so the
// agent starts at once. Get answers "" until it is known. Close stops a
// lookup still in progress.
type PublicIP struct {
	addr atomic.Pointer[string]

	cancel    context.CancelFunc
	done      chan struct{}
	closeOnce sync.Once
}

// StartPublicIP settles the node's public address: a configured value wins
// and no lookup is made; an empty url disables the lookup (Get stays ""
// unless configured); otherwise url is looked up in the background, retried
// with growing pauses a few times, and a final failure is logged, not fatal.
// A nil client means http.DefaultClient.
func StartPublicIP(url, configured string, client *http.Client, logger *slog.Logger) *PublicIP {
	return startPublicIP(url, configured, client, logger, defaultRetryPolicy)
}

func startPublicIP(url, configured string, client *http.Client, logger *slog.Logger, policy retryPolicy) *PublicIP {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &PublicIP{cancel: cancel, done: make(chan struct{})}
	if configured != "" || url == "" {
		p.addr.Store(&configured)
		close(p.done)
		return p
	}
	go p.resolve(ctx, url, client, logger, policy)
	return p
}

// Get is the public address, or "" while unknown; it never blocks.
func (p *PublicIP) Get() string {
	if addr := p.addr.Load(); addr != nil {
		return *addr
	}
	return ""
}

// Done is closed once the address is settled: known, disabled, given up on,
// or stopped by Close.
func (p *PublicIP) Done() <-chan struct{} {
	return p.done
}

// Close stops a lookup in progress and waits for it to end. Closing twice is
// harmless.
func (p *PublicIP) Close() error {
	p.closeOnce.Do(p.cancel)
	<-p.done
	return nil
}

func (p *PublicIP) resolve(ctx context.Context, url string, client *http.Client, logger *slog.Logger, policy retryPolicy) {
	defer close(p.done)
	backoff := policy.firstBackoff
	for attempt := 1; ; attempt++ {
		addr, err := lookupPublicIP(ctx, client, url, policy.timeout)
		if err == nil {
			p.addr.Store(&addr)
			logger.Info("public IP found", "ip", addr, "url", url)
			return
		}
		if ctx.Err() != nil {
			return
		}
		if attempt >= policy.attempts {
			logger.Warn("public IP lookup failed; the public IP stays unknown", "url", url, "attempts", attempt, "err", err)
			return
		}
		logger.Debug("public IP lookup failed; retrying", "url", url, "attempt", attempt, "retry_in", backoff, "err", err)
		pause := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			pause.Stop()
			return
		case <-pause.C:
		}
		backoff = min(2*backoff, policy.maxBackoff)
	}
}
