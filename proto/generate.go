// Package fluxpb holds the gRPC contract between Flux and the agent (the
// .proto of package flux, which is Flux's wire and never changes) and the
// agent's own admin API (admin.proto, package fluxagent.admin.v1, served
// only on the local admin endpoint), with the Go code generated from both.
package fluxpb

//go:generate ./gen.sh
