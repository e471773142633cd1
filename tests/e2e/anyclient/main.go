// anyclient pulls an image the way nerdctl and CRI do: containerd's Go
// client Pull with unpack into a snapshotter, adding no snapshot labels of its
// own (no cri.* labels). It counts what containerd itself fetched from the
// registry and prints one JSON line:
//
//	{"image":"...","requests":N,"bytes":N}
//
// Build (GOPATH mode over Debian's Go sources; no network):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o anyclient .
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/remotes/docker"
)

type counter struct {
	requests, bytes int64
}

type countingBody struct {
	io.ReadCloser
	c *counter
}

func (b countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	atomic.AddInt64(&b.c.bytes, int64(n))
	return n, err
}

type countingTransport struct {
	next http.RoundTripper
	c    *counter
}

func (t countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	atomic.AddInt64(&t.c.requests, 1)
	resp, err := t.next.RoundTrip(r)
	if err == nil && resp.Body != nil {
		resp.Body = countingBody{resp.Body, t.c}
	}
	return resp, err
}

func main() {
	address := flag.String("address", "/run/containerd/containerd.sock", "containerd socket")
	ns := flag.String("namespace", "default", "containerd namespace")
	snapshotter := flag.String("snapshotter", "shoal", "snapshotter")
	timeout := flag.Duration("timeout", 5*time.Minute, "pull timeout")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: anyclient [flags] REF")
		os.Exit(2)
	}
	ref := flag.Arg(0)
	client, err := containerd.New(*address)
	if err != nil {
		fmt.Fprintln(os.Stderr, "anyclient: connect:", err)
		os.Exit(1)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), *ns), *timeout)
	defer cancel()
	c := &counter{}
	httpClient := &http.Client{Transport: countingTransport{http.DefaultTransport, c}}
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(
			docker.WithPlainHTTP(docker.MatchAllHosts),
			docker.WithClient(httpClient),
		),
	})
	img, err := client.Pull(ctx, ref,
		containerd.WithResolver(resolver),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(*snapshotter),
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, "anyclient: pull:", err)
		os.Exit(1)
	}
	out, _ := json.Marshal(map[string]interface{}{
		"image":    img.Name(),
		"requests": atomic.LoadInt64(&c.requests),
		"bytes":    atomic.LoadInt64(&c.bytes),
	})
	fmt.Println(string(out))
}
