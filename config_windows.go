package main

import (
	"os"
	"path/filepath"
)

// defaultAppsDir is where function code lives unless apps_dir says otherwise:
// under ProgramData, the machine-wide home of service state on Windows.
func defaultAppsDir() string {
	root := os.Getenv("ProgramData")
	if root == "" {
		root = `C:\ProgramData`
	}
	return filepath.Join(root, "flux-agent", "apps")
}
