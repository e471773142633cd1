//! Compiles the vendored containerd and Kubernetes CRI protos (see
//! `vendor/README.md`) and
//! Shoal's own (`shoal/`) into
//! tonic client and server stubs. `protoc` comes from `protoc-bin-vendored`, so
//! a build needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: build scripts are single-threaded; nothing else reads the env.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Chunk bytes are sliced out of the store's `Bytes` without a copy.
        .bytes(".shoal.p2p.v1.ChunkPart.data")
        .compile_protos(
            &[
                "vendor/github.com/containerd/containerd/api/types/mount.proto",
                "vendor/github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto",
                "shoal/v1/status.proto",
                "shoal/v1/cache.proto",
                "shoal/v1/profile.proto",
                "shoal/p2p/v1/peer.proto",
            ],
            &["vendor", "."],
        )?;
    // Kubernetes' CRI: clients only (Shoal's CRI image-service proxy forwards
    // raw bytes and needs no generated server; tests and tools drive CRI).
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_protos(
            &["vendor/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto"],
            &["vendor"],
        )?;
    Ok(())
}
