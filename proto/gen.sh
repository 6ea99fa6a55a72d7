#!/usr/bin/env bash
# Regenerates the Go code for flux.proto (Flux's contract) and admin.proto
# (the agent's own admin API). Needs protoc (Debian:
# protobuf-compiler); the Go plugins come from the pinned tools module.
set -euo pipefail
cd "$(dirname "$0")"
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
go -C ../tools build -o "$bin/" \
  google.golang.org/protobuf/cmd/protoc-gen-go \
  google.golang.org/grpc/cmd/protoc-gen-go-grpc
PATH="$bin:$PATH" protoc -I . \
  --go_out=. --go_opt=paths=source_relative \
  --go-grpc_out=. --go-grpc_opt=paths=source_relative \
  flux.proto admin.proto
