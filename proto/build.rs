//! Compiles the vendored containerd protos (see `vendor/README.md`) and
//! Shoal's own (`shoal/`) into
//! tonic client and server stubs. `protoc` comes from `protoc-bin-vendored`, so
//! a build needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: build scripts are single-threaded; nothing else reads the env.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &[
                "vendor/github.com/containerd/containerd/api/types/mount.proto",
                "vendor/github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto",
                "shoal/v1/status.proto",
                "shoal/v1/cache.proto",
                "shoal/v1/profile.proto",
            ],
            &["vendor", "."],
        )?;
    Ok(())
}
