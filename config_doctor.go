package main

import (
	"github.com/serverless-fabric/flux-agent/doctor"
	"github.com/serverless-fabric/flux-agent/sandbox"
)

// doctorConfig is the config in doctor's terms: what the host checks read
// and the addresses the agent binds.
func (c *Config) doctorConfig() doctor.Config {
	d := doctor.Config{
		ConfigFile: c.path,
		RunAsUser:  c.Sandbox.RunAsUser,
		AppsDir:    c.AppsDir,
		CgroupRoot: c.Sandbox.CgroupRoot,
		Network:    c.Sandbox.Network,
		TLS: doctor.TLSFiles{Enabled: c.TLS.Enabled, CACert: c.TLS.CACert,
			CertFile: c.TLS.CertFile, KeyFile: c.TLS.KeyFile},
		Redis:     c.RedisOptions(),
		RedisAddr: c.RedisAddr.String(),
		Listeners: []doctor.Listener{
			{Key: "port", Network: "tcp", Address: c.ListenAddr()},
			{Key: "telemetry.metrics_address", Network: "tcp", Address: c.Telemetry.MetricsAddress},
		},
	}
	d.Listeners = append(d.Listeners, adminListener(c.Admin))
	switch r := c.Sandbox.UIDRange; r.Mode {
	case UIDsFixed:
		d.UIDs = sandbox.UIDRange{First: r.First, Count: r.Count}
	case UIDsShared:
		d.SharedUID = true
	}
	return d
}
