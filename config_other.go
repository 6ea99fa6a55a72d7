//go:build !windows

package main

// DefaultAdminSocket is where the admin endpoint listens. Under systemd,
// /run/flux-agent must come from RuntimeDirectory=flux-agent: with
// ProtectSystem=strict the agent cannot make it itself.
const DefaultAdminSocket = "/run/flux-agent/admin.sock"

// defaultAppsDir is where function code lives unless apps_dir says otherwise.
func defaultAppsDir() string { return "/var/lib/flux-agent/apps" }

func defaultAdminConfig() AdminConfig { return AdminConfig{Socket: DefaultAdminSocket} }

// validateForOS refuses the Windows keys, which would otherwise be ignored.
func (a AdminConfig) validateForOS() []error {
	var errs []error
	for _, k := range []struct{ key, value string }{{"address", a.Address}, {"token_file", a.TokenFile}} {
		if k.value != "" {
			errs = append(errs, keyError(k.key, "is for Windows; here the admin endpoint is admin.socket (set admin.%s to \"\")", k.key))
		}
	}
	return errs
}
