// Package fluxpb holds the gRPC contract between Flux and the agent: the
// .proto (package flux) and the Go code generated from it.
package fluxpb

//go:generate ./gen.sh
