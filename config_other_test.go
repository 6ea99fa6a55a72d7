//go:build !windows

package main

import (
	"path/filepath"
	"strings"
	"testing"
)

// foreignKeys are the keys of another OS, refused here.
var foreignKeys = map[string]bool{"admin.address": true, "admin.token_file": true}

func TestAdminSocket(t *testing.T) {
	path := writeConfig(t, "admin:\n  socket: admin.sock\n")
	cfg, err := load(t, map[string]string{"AGENT_CONFIG": path})
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(filepath.Dir(path), "admin.sock"); cfg.Admin.Socket != want {
		t.Errorf("relative admin.socket = %q, want %q", cfg.Admin.Socket, want)
	}
	_, err = load(t, map[string]string{"AGENT_CONFIG": writeConfig(t, ""), "FLUX_AGENT_ADMIN_ADDRESS": "127.0.0.1:50053"})
	if err == nil || !strings.Contains(err.Error(), "admin.address: is for Windows") {
		t.Errorf("admin.address on Linux: %v", err)
	}
}
