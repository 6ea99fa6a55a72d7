package main

import (
	"net"
	"net/url"
)

// NetworkConfig sets or discovers the IPs given to functions.
type NetworkConfig struct {
	NodePrivateIP string `yaml:"node_private_ip"`
	NodePublicIP  string `yaml:"node_public_ip"`
	// PublicIPURL is looked up for NodePublicIP when that is empty; ""
	// turns the lookup off.
	PublicIPURL string `yaml:"public_ip_url"`
}

func defaultNetworkConfig() NetworkConfig {
	return NetworkConfig{PublicIPURL: DefaultPublicIPURL}
}

func (n NetworkConfig) validate() []error {
	var errs []error
	for _, ip := range []struct{ key, value string }{{"node_private_ip", n.NodePrivateIP}, {"node_public_ip", n.NodePublicIP}} {
		if ip.value != "" && net.ParseIP(ip.value) == nil {
			errs = append(errs, keyError(ip.key, "%q is not an IP address", ip.value))
		}
	}
	if u := n.PublicIPURL; u != "" {
		if parsed, err := url.Parse(u); err != nil || (parsed.Scheme != "http" && parsed.Scheme != "https") || parsed.Host == "" {
			errs = append(errs, keyError("public_ip_url", "%q is not an http(s) URL (set it empty to disable the lookup)", u))
		}
	}
	return errs
}
