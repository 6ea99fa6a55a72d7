//go:build !windows

package cli

import "context"

// connectAdmin dials the admin socket: root-only, so no credentials.
func (inv *invocation) connectAdmin(ctx context.Context) (*conn, error) {
	return connectSocket(ctx, inv.socket)
}

// adminEndpoint names the admin endpoint the agent holds.
func adminEndpoint(inv *invocation) string { return inv.socket }
