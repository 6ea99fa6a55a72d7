package main

import (
	"os"
	"path/filepath"
)

// DefaultAdminAddress is the admin endpoint's loopback port on Windows.
const DefaultAdminAddress = "127.0.0.1:50053"

// programData is the machine-wide home of service state on Windows.
func programData() string {
	if root := os.Getenv("ProgramData"); root != "" {
		return root
	}
	return `C:\ProgramData`
}

// defaultAppsDir is where function code lives unless apps_dir says otherwise.
func defaultAppsDir() string { return filepath.Join(programData(), "flux-agent", "apps") }

func defaultAdminConfig() AdminConfig {
	return AdminConfig{
		Address:   DefaultAdminAddress,
		TokenFile: filepath.Join(programData(), "flux-agent", "admin.token"),
	}
}

// validateForOS refuses admin.socket, which Windows does not use.
func (a AdminConfig) validateForOS() []error {
	if a.Socket != "" {
		return []error{keyError("socket", "is for Linux; on Windows the admin endpoint is admin.address with admin.token_file (set admin.socket to \"\")")}
	}
	return nil
}
