// A minimal containerd-stargz-grpc for the lazy-pull benchmark: Debian ships
// stargz-snapshotter's library (golang-github-containerd-stargz-snapshotter-dev)
// and ctr-remote, but not its daemon. This wires the library's snapshotter
// service to a gRPC socket the way upstream's cmd/containerd-stargz-grpc does,
// with the library's default filesystem configuration (prefetch and
// background fetch on), and one registry reached over plain HTTP.
//
// Build (GOPATH mode, Debian's Go sources only; no network):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o stargz-grpc .
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots/overlay/overlayutils"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	fsconfig "github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "state directory")
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "gRPC socket")
	registry := flag.String("plain-http-registry", "", "HOST:PORT of a registry to reach over plain HTTP")
	flag.Parse()

	if err := run(*root, *address, *registry); err != nil {
		fmt.Fprintf(os.Stderr, "stargz-grpc: %v\n", err)
		os.Exit(1)
	}
}

// What upstream's service.NewStargzSnapshotterService does, minus the CRI
// keychain (its package needs k8s.io/cri-api, which Debian lacks): a
// filesystem that finds layers from the labels ctr-remote rpull adds, and the
// snapshotter on top.
func run(root, address, registry string) error {
	ctx := context.Background()
	// The fetcher uses the client's Transport directly: it must not be nil.
	client := &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
	hosts := func(ref reference.Spec) ([]docker.RegistryHost, error) {
		host := ref.Hostname()
		scheme := "https"
		if host == registry {
			scheme = "http"
		}
		return []docker.RegistryHost{{
			Client:       client,
			Authorizer:   docker.NewDockerAuthorizer(),
			Host:         host,
			Scheme:       scheme,
			Path:         "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
		}}, nil
	}
	snRoot := filepath.Join(root, "snapshotter")
	if err := os.MkdirAll(snRoot, 0o700); err != nil {
		return err
	}
	opq := layer.OverlayOpaqueTrusted
	if userxattr, err := overlayutils.NeedsUserXAttr(snRoot); err == nil && userxattr {
		opq = layer.OverlayOpaqueUser
	}
	fs, err := stargzfs.NewFilesystem(filepath.Join(root, "stargz"), fsconfig.Config{},
		stargzfs.WithGetSources(source.FromDefaultLabels(hosts)),
		stargzfs.WithOverlayOpaqueType(opq))
	if err != nil {
		return fmt.Errorf("filesystem: %w", err)
	}
	sn, err := snbase.NewSnapshotter(ctx, snRoot, fs, snbase.AsynchronousRemove)
	if err != nil {
		return fmt.Errorf("snapshotter: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return err
	}
	_ = os.Remove(address)
	l, err := net.Listen("unix", address)
	if err != nil {
		return err
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	errc := make(chan error, 1)
	go func() { errc <- rpc.Serve(l) }()
	fmt.Fprintf(os.Stderr, "stargz-grpc: serving on %s, root %s\n", address, root)
	select {
	case <-sigs:
	case err = <-errc:
	}
	rpc.Stop()
	if cerr := sn.Close(); cerr != nil && err == nil {
		err = cerr
	}
	return err
}
