package nodeinfo

import (
	"log/slog"
	"net/http"
)

// IPs are the node's addresses as every execution receives them
// (FLUX_NODE_PRIVATE_IP, FLUX_NODE_PUBLIC_IP): configured values win, the
// rest is found out, the public one in the background.
type IPs struct {
	private string
	public  *PublicIP
}

// StartIPs settles the private address at once (configuredPrivate, else
// PrivateIPv4; a failure is logged and leaves it empty) and starts finding
// the public one as StartPublicIP does. Close stops the public lookup.
func StartIPs(configuredPrivate, configuredPublic, publicIPURL string, client *http.Client, logger *slog.Logger) *IPs {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	private := configuredPrivate
	if private == "" {
		var err error
		if private, err = PrivateIPv4(); err != nil {
			logger.Warn("private IP unknown; set network.node_private_ip", "err", err)
		}
	}
	return &IPs{
		private: private,
		public:  StartPublicIP(publicIPURL, configuredPublic, client, logger),
	}
}

// PrivateIP is the node's address on its own network, or "" if unknown.
func (n *IPs) PrivateIP() string { return n.private }

// PublicIP is the node's public address, or "" while unknown; it never blocks.
func (n *IPs) PublicIP() string { return n.public.Get() }

// publicIPSettled is closed once the public address is known or given up on.
func (n *IPs) publicIPSettled() <-chan struct{} { return n.public.Done() }

// Close stops a public lookup in progress and waits for it to end.
func (n *IPs) Close() error { return n.public.Close() }
