//go:build !linux

package sandbox

import (
	"context"
	"errors"
	"log/slog"
	"time"
)

// errNetworkFilterUnsupported is what openNetworkFilter says off Linux:
// only nftables enforces the filtered policy.
var errNetworkFilterUnsupported = errors.New("network filter: sandbox.network \"filtered\" needs Linux (nftables); set sandbox.network: host")

// networkFilterOptions mirror the Linux ones so that callers build
// everywhere.
type networkFilterOptions struct {
	Table     string
	UIDs      UIDRange
	Policy    NetworkPolicy
	Refresh   time.Duration
	Logger    *slog.Logger
	OnBlocked func(BlockedConnection)
	netnsFD   int
}

// networkFilter does not exist off Linux.
type networkFilter struct{}

func openNetworkFilter(ctx context.Context, opts networkFilterOptions) (*networkFilter, error) {
	return nil, errNetworkFilterUnsupported
}

// Close does nothing: no filter was ever opened.
func (f *networkFilter) Close() error { return nil }

func (f *networkFilter) settle(ctx context.Context, uid uint32) (uint64, error) {
	return 0, errNetworkFilterUnsupported
}
