// Shoal's runner for containerd 1.6's snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite, from Debian's
// golang-github-containerd-containerd-dev).
//
// Every subtest gets a fresh daemon, `$SHOAL_SNAPSHOTTER_BIN --root DIR/root
// --address DIR/shoal.sock --config DIR/config.toml`, and talks to it through
// containerd's own proxy client (snapshots/proxy), the code path containerd
// uses for [proxy_plugins]. Teardown sends SIGTERM, the signal systemd sends,
// and fails the subtest if the daemon does not exit cleanly within 10s.
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func waitForSocket(sock string, cmd *exec.Cmd, exited <-chan error) error {
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			return fmt.Errorf("daemon exited before listening: %v", err)
		default:
		}
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("daemon did not listen on %s within 20s", sock)
}

func newShoal(ctx context.Context, dir string) (snapshots.Snapshotter, func() error, error) {
	bin := os.Getenv("SHOAL_SNAPSHOTTER_BIN")
	if bin == "" {
		return nil, nil, fmt.Errorf("SHOAL_SNAPSHOTTER_BIN is not set")
	}
	sock := filepath.Join(dir, "shoal.sock")
	config := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(config, []byte("version = 1\n"), 0o644); err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(bin, "--root", filepath.Join(dir, "root"), "--address", sock,
		"--config", config, "--log-level", "warn")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	if err := waitForSocket(sock, cmd, exited); err != nil {
		cmd.Process.Kill()
		return nil, nil, err
	}
	conn, err := grpc.Dial("unix://"+sock, grpc.WithInsecure(),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}))
	if err != nil {
		cmd.Process.Kill()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "shoal")
	stop := func() error {
		conn.Close()
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				return fmt.Errorf("daemon did not exit cleanly on SIGTERM: %v", err)
			}
			return nil
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
			return fmt.Errorf("daemon ignored SIGTERM for 10s")
		}
	}
	return sn, stop, nil
}

func TestShoal(t *testing.T) {
	testsuite.SnapshotterSuite(t, "Shoal", newShoal)
}
