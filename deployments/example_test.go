package deployments_test

import (
	"archive/zip"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/serverless-fabric/flux-agent/deployments"
)

// Example shows the life of a function's code as the service drives it:
// check names at registration, deploy, pin a version per execution, release.
func Example() {
	apps, _ := os.MkdirTemp("", "apps")
	defer os.RemoveAll(apps)
	store, err := deployments.Open(apps, deployments.Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer store.Close()

	// RegisterFunction: the static checks.
	fmt.Println(deployments.ValidName("hello"), deployments.ValidHandler("main.sh"))

	// DeployFunction (for a registered function), twice as Flux does.
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	w, _ := zw.Create("main.sh")
	fmt.Fprintln(w, "#!/bin/sh\necho hello")
	zw.Close()
	for range 2 {
		d, err := store.Deploy(context.Background(), "hello", "main.sh", buf.Bytes())
		fmt.Println(d.Files, d.Bytes, d.Unchanged, err)
	}

	// ExecuteFunction: pin the version, run the handler in its directory.
	lease, err := store.Acquire("hello")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer lease.Release()
	path, err := lease.Handler("main.sh")
	fmt.Println(filepath.Rel(lease.Dir, path))
	fmt.Println(err)
	// Output:
	// <nil> <nil>
	// 1 21 false <nil>
	// 1 21 true <nil>
	// main.sh <nil>
	// <nil>
}
