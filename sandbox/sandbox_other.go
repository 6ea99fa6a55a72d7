//go:build !linux && !windows

package sandbox

// This platform has no containment: the agent runs on Linux and Windows.
