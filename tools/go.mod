// Build and test tools, pinned as Go tools in their own module so the
// agent's go.mod stays lean. Run them with `go tool -modfile=tools/go.mod NAME`.
module github.com/serverless-fabric/flux-agent/tools

go 1.26.8

tool (
	google.golang.org/grpc/cmd/protoc-gen-go-grpc
	google.golang.org/protobuf/cmd/protoc-gen-go
)

require (
	google.golang.org/grpc/cmd/protoc-gen-go-grpc v1.6.2 // indirect
	google.golang.org/protobuf v1.36.12 // indirect
)
