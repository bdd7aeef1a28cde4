// Command etcd is the etcd server for the tests' control plane (see ../ensure-binaries.sh):
// the same entry point as etcd's own binary, built from the pinned go.etcd.io/etcd/server/v3.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
