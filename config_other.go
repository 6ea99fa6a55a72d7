//go:build !windows

package main

// defaultAppsDir is where function code lives unless apps_dir says otherwise.
func defaultAppsDir() string { return "/var/lib/flux-agent/apps" }
