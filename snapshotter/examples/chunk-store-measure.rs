//! Measures the choices behind the chunk store's on-disk format (see
//! docs/ARCHITECTURE.md, "Chunk store format"): what verifying a chunk read
//! from disk costs (sha256 re-hash vs a crc32 checksum vs checking the whole
//! store at start), what zstd would save, and what one-file-per-chunk costs
//! for small chunks.
//!
//! Input: the regular files under a directory (a real root filesystem),
//! cut into chunks of `--chunk` bytes as `ctr-remote image convert` does
//! (one chunk per small file).
//!
//! ```text
//! cargo run --release -p shoal-snapshotter --example chunk-store-measure -- \
//!     /var/cache/shoal-bench/rootfs-bookworm-python3
//! ```
//! Prints figures only; it asserts nothing.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest as _, Sha256};

const DEFAULT_CHUNK: usize = 4 << 20;

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            walk(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| {
        eprintln!("usage: chunk-store-measure DIR [--chunk BYTES]");
        std::process::exit(2)
    }));
    let chunk = match (args.next().as_deref(), args.next()) {
        (Some("--chunk"), Some(n)) => n.parse().expect("--chunk BYTES"),
        _ => DEFAULT_CHUNK,
    };
    let mut files = Vec::new();
    walk(&dir, &mut files);
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    for f in &files {
        let Ok(data) = std::fs::read(f) else { continue };
        for c in data.chunks(chunk) {
            chunks.push(c.to_vec());
        }
    }
    chunks.sort();
    chunks.dedup();
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    println!(
        "input: {} files under {}, {} distinct chunks (chunk size {} KiB), {:.1} MiB",
        files.len(),
        dir.display(),
        chunks.len(),
        chunk >> 10,
        total as f64 / (1 << 20) as f64
    );

    // 1. Verifying on read: sha256 (today) vs crc32 (a checksum header).
    let t = Instant::now();
    let mut x = 0u8;
    for c in &chunks {
        x ^= Sha256::digest(c)[0];
    }
    let sha = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut y = 0u32;
    for c in &chunks {
        y ^= crc32fast::hash(c);
    }
    let crc = t.elapsed().as_secs_f64();
    println!("\n# verifying a chunk read from disk (in memory, one core)");
    println!(
        "sha256 re-hash : {:>6.2} GB/s  ({:.0} ms for the set)",
        gbps(total, sha),
        sha * 1e3
    );
    println!(
        "crc32 checksum : {:>6.2} GB/s  ({:.0} ms for the set)",
        gbps(total, crc),
        crc * 1e3
    );
    println!(
        "ratio sha256/crc32 time: {:.1}x   (checksum bits {x}{y})",
        sha / crc
    );

    // 2. Writing the set as one file per chunk, reading it back cold-ish.
    let store =
        tempfile::tempdir_in(std::env::var_os("MEASURE_DIR").unwrap_or_else(|| "/var/tmp".into()))
            .expect("temp dir");
    let t = Instant::now();
    for (i, c) in chunks.iter().enumerate() {
        let mut f = std::fs::File::create(store.path().join(i.to_string())).unwrap();
        f.write_all(c).unwrap();
    }
    let write = t.elapsed().as_secs_f64();
    let mut blocks = 0u64;
    let mut small = 0u64;
    let mut small_bytes = 0u64;
    let mut small_blocks = 0u64;
    for (i, c) in chunks.iter().enumerate() {
        let md = std::fs::metadata(store.path().join(i.to_string())).unwrap();
        blocks += md.blocks() * 512;
        if c.len() < 4096 {
            small += 1;
            small_bytes += c.len() as u64;
            small_blocks += md.blocks() * 512;
        }
    }
    println!(
        "\n# one file per chunk (on the filesystem of {})",
        store.path().display()
    );
    println!(
        "write (no fsync): {:.2} GB/s; allocated {:.1} MiB for {:.1} MiB of data ({:.1}% overhead)",
        gbps(total, write),
        blocks as f64 / (1 << 20) as f64,
        total as f64 / (1 << 20) as f64,
        (blocks as f64 / total as f64 - 1.0) * 100.0
    );
    println!(
        "chunks < 4 KiB: {small} of {} ({:.1}%), {:.2} MiB of data in {:.2} MiB of blocks, plus {small} inodes",
        chunks.len(),
        small as f64 * 100.0 / chunks.len() as f64,
        small_bytes as f64 / (1 << 20) as f64,
        small_blocks as f64 / (1 << 20) as f64
    );
    // A check-on-load store verifies everything it has at every start.
    println!(
        "check-on-load at start: sha256 of the whole set = {:.0} ms (+ reading {:.0} MiB from disk), per start",
        sha * 1e3,
        total as f64 / (1 << 20) as f64
    );

    // 3. zstd: what compression would save and cost.
    println!("\n# zstd storage");
    for level in [1, 3] {
        let t = Instant::now();
        let packed: Vec<Vec<u8>> = chunks
            .iter()
            .map(|c| zstd::bulk::compress(c, level).unwrap())
            .collect();
        let comp = t.elapsed().as_secs_f64();
        let clen: u64 = packed.iter().map(|c| c.len() as u64).sum();
        let t = Instant::now();
        let mut n = 0u64;
        for (p, c) in packed.iter().zip(&chunks) {
            n += zstd::bulk::decompress(p, c.len()).unwrap().len() as u64;
        }
        let dec = t.elapsed().as_secs_f64();
        assert_eq!(n, total);
        // Space on disk: files are allocated in 4 KiB blocks.
        let alloc: u64 = packed
            .iter()
            .map(|c| (c.len() as u64).div_ceil(4096) * 4096)
            .sum();
        println!(
            "level {level}: {:.1} MiB -> {:.1} MiB ({:.2}x; {:.1} MiB allocated in 4 KiB blocks vs {:.1} MiB raw), compress {:.2} GB/s, decompress {:.2} GB/s",
            total as f64 / (1 << 20) as f64,
            clen as f64 / (1 << 20) as f64,
            total as f64 / clen as f64,
            alloc as f64 / (1 << 20) as f64,
            blocks as f64 / (1 << 20) as f64,
            gbps(total, comp),
            gbps(total, dec)
        );
    }
}
