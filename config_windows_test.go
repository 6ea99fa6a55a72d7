package main

import (
	"strings"
	"testing"
)

// foreignKeys are the keys of another OS, refused here.
var foreignKeys = map[string]bool{"admin.socket": true}

func TestAdminAddress(t *testing.T) {
	for addr, ok := range map[string]bool{"127.0.0.1:50053": true, "[::1]:50053": true, "localhost:50053": true, "0.0.0.0:50053": false, "10.0.0.5:50053": false, "50053": false} {
		_, err := load(t, map[string]string{"AGENT_CONFIG": writeConfig(t, ""), "FLUX_AGENT_ADMIN_ADDRESS": addr})
		if (err == nil) != ok || (err != nil && !strings.Contains(err.Error(), "admin.address:")) {
			t.Errorf("admin.address %s: %v", addr, err)
		}
	}
	_, err := load(t, map[string]string{"AGENT_CONFIG": writeConfig(t, ""), "FLUX_AGENT_ADMIN_TOKEN_FILE": ""})
	if err == nil || !strings.Contains(err.Error(), "admin.token_file: must be set") {
		t.Errorf("admin.address without a token file: %v", err)
	}
}
