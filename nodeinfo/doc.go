// Package nodeinfo measures the node the agent runs on, so that Flux can
// autoscale and drain it: CPU and memory load sampled in the background (the
// ReportNodeStatus RPC must answer from memory in well under a millisecond),
// and the node's private and public IP addresses that functions receive in
// their environment.
//
// Linux reads /proc through github.com/prometheus/procfs, with the proc root
// passed in so tests can point it at fixtures; Windows asks the kernel
// (GetSystemTimes, GlobalMemoryStatusEx). Each platform file implements the
// same unexported openStatSource; the code shared between them never asks
// which platform it is on.
package nodeinfo
