//! TOC size limits (`remote.toc_max_entries`, `toc_max_compressed_bytes`,
//! `toc_max_json_bytes`): a TOC past one is refused with an error naming the
//! limit, while it is being read (never after materializing it), and the
//! layer falls back to a normal pull, counted as `toc_limit`.
//!
//! The memory tests run the parse in a child process (this test binary,
//! re-run with `--ignored --exact child_parses_the_blob`) and read its peak
//! RSS (`VmHWM` in /proc/self/status), so the figure is that of one parse and
//! nothing else the test harness allocated.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;

use common::estargz::{self, Entry, Format, Layer, DEFAULT_CHUNK};
use shoal::error::Error;
use shoal::metadata::Kind;
use shoal::remote::layer::tree;
use shoal::remote::layers::RemoteConfig;
use shoal::remote::toc::{parse_footer, Toc, TocError, TocLimits, BYTES_PER_ENTRY, FOOTER_FETCH};

const CHILD: &str = "child_parses_the_blob";
const ENV_BLOB: &str = "SHOAL_TEST_TOC_BLOB";
const ENV_DIGEST: &str = "SHOAL_TEST_TOC_DIGEST";
const ENV_MAX_ENTRIES: &str = "SHOAL_TEST_TOC_MAX_ENTRIES";

/// A TOC of `n` empty directories (the cheapest entry to write, and the
/// costliest per JSON byte to hold), as a zstd:chunked blob.
fn dirs_blob(n: usize) -> (Vec<u8>, String, usize) {
    let mut json = String::with_capacity(n * 32 + 32);
    json.push_str("{\"version\":1,\"entries\":[");
    for i in 0..n {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            "{{\"name\":\"{:03}/{:04}/\",\"type\":\"dir\"}}",
            i / 10_000,
            i % 10_000
        ));
    }
    json.push_str("]}");
    let (blob, digest) = estargz::finish(Format::ZstdChunked, &[], json.as_bytes());
    (blob, digest, json.len())
}

fn vm_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Child side: what the snapshotter does with a blob up to the mount
/// (verified TOC, FUSE entries, inode tree), then one line with the result
/// and the peak RSS. Only run by [`run_child`].
#[test]
#[ignore = "the child half of the peak-RSS tests; they run it"]
fn child_parses_the_blob() {
    let path = std::env::var(ENV_BLOB).expect("run by run_child");
    let digest = std::env::var(ENV_DIGEST).unwrap();
    let limits = TocLimits {
        max_entries: std::env::var(ENV_MAX_ENTRIES).unwrap().parse().unwrap(),
        ..TocLimits::default()
    };
    let blob = std::fs::read(path).unwrap();
    let base = vm_kb("VmHWM:");
    let size = blob.len() as u64;
    let footer = parse_footer(&blob[(size - FOOTER_FETCH) as usize..], size).unwrap();
    let toc = &blob[footer.toc_offset as usize..(footer.toc_offset + footer.toc_len) as usize];
    let outcome = match Toc::parse_with(toc, &footer, &digest, &limits) {
        Ok(toc) => {
            let tree = tree(&toc).unwrap();
            format!("ok:{}:{}", toc.entries.len(), tree.len())
        }
        Err(TocError::OverLimit(m)) => format!("refused:{m}"),
        Err(e) => format!("error:{e}"),
    };
    println!(
        "TOC_RSS base_kb={base} hwm_kb={} outcome={outcome}",
        vm_kb("VmHWM:")
    );
}

/// Runs [`child_parses_the_blob`] on `blob`; returns its outcome and its
/// peak RSS above what it had before parsing, in bytes.
fn run_child(dir: &Path, blob: &[u8], digest: &str, max_entries: u64) -> (String, u64) {
    let path = dir.join("blob");
    std::fs::write(&path, blob).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            CHILD,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_BLOB, &path)
        .env(ENV_DIGEST, digest)
        .env(ENV_MAX_ENTRIES, max_entries.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("TOC_RSS ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no result from the child: {stdout}"));
    let field = |k: &str| -> u64 {
        line.split(' ')
            .find_map(|f| f.strip_prefix(k))
            .unwrap()
            .parse()
            .unwrap()
    };
    let outcome = line.split_once("outcome=").unwrap().1.to_owned();
    let grown = field("hwm_kb=").saturating_sub(field("base_kb=")) * 1024;
    (outcome, grown)
}

const BIG: usize = 2_000_000;

#[test]
fn two_million_entries_stay_within_the_stated_bound_per_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, digest, json_len) = dirs_blob(BIG);
    // Above the default limit: raised, as an operator would for such layers.
    let (outcome, grown) = run_child(dir.path(), &blob, &digest, BIG as u64 + 1);
    let per_entry = grown / BIG as u64;
    println!(
        "{BIG} entries, JSON {json_len} bytes, compressed blob {} bytes: \
         peak RSS +{} MiB, {per_entry} bytes per entry (bound {BYTES_PER_ENTRY})",
        blob.len(),
        grown >> 20
    );
    // The tree has the entries plus the 200 implicit parents and the root.
    assert_eq!(outcome, format!("ok:{BIG}:{}", BIG + 200 + 1));
    assert!(
        grown <= BIG as u64 * BYTES_PER_ENTRY,
        "peak RSS grew by {grown} bytes: {per_entry} per entry, over BYTES_PER_ENTRY"
    );
}

#[test]
fn a_toc_past_the_entry_limit_is_refused_while_parsing_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, digest, json_len) = dirs_blob(BIG);
    let cap = BIG as u64 / 8;
    let (outcome, grown) = run_child(dir.path(), &blob, &digest, cap);
    println!(
        "{BIG} entries, limit {cap}: refused with peak RSS +{} MiB (JSON {} MiB)",
        grown >> 20,
        json_len >> 20
    );
    assert_eq!(
        outcome,
        format!("refused:more than remote.toc_max_entries = {cap} entries")
    );
    // The JSON, and at most `cap` decoded entries: never all of them.
    let bound = json_len as u64 + cap * BYTES_PER_ENTRY;
    assert!(
        grown <= bound,
        "peak RSS grew by {grown} bytes, bound {bound}"
    );
}

#[test]
fn each_limit_refuses_with_an_error_naming_it() {
    let layer = Layer::new(
        Format::ZstdChunked,
        DEFAULT_CHUNK,
        &[Entry::dir("a/"), Entry::file("a/f", "x"), Entry::dir("b/")],
    );
    let (blob, digest) = layer.blob();
    let size = blob.len() as u64;
    let footer = parse_footer(&blob[(size - FOOTER_FETCH) as usize..], size).unwrap();
    let toc = &blob[footer.toc_offset as usize..(footer.toc_offset + footer.toc_len) as usize];
    let json_len = zstd::decode_all(toc).unwrap().len() as u64;
    let parse = |limits: TocLimits| Toc::parse_with(toc, &footer, &digest, &limits);
    let exact = TocLimits {
        max_entries: 3,
        max_compressed_bytes: toc.len() as u64,
        max_json_bytes: json_len,
    };
    assert_eq!(parse(exact).unwrap().entries.len(), 3);
    let refused = |limits: TocLimits| match parse(limits) {
        Err(TocError::OverLimit(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(
        refused(TocLimits {
            max_entries: 2,
            ..exact
        }),
        "more than remote.toc_max_entries = 2 entries"
    );
    assert!(refused(TocLimits {
        max_compressed_bytes: toc.len() as u64 - 1,
        ..exact
    })
    .contains("exceeds remote.toc_max_compressed_bytes"));
    assert!(refused(TocLimits {
        max_json_bytes: json_len - 1,
        ..exact
    })
    .contains("larger than remote.toc_max_json_bytes"));
}

#[test]
fn a_layer_past_a_limit_falls_back_to_a_normal_pull_and_is_counted() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let entries: Vec<Entry> = (0..50).map(|i| Entry::dir(&format!("d{i}/"))).collect();
    let layer = Layer::new(Format::Estargz, DEFAULT_CHUNK, &entries);
    let (blob, digest) = layer.blob();
    let cases: [(&str, TocLimits, &str, u64); 4] = [
        ("within", TocLimits::default(), "", 0),
        (
            "entries",
            TocLimits {
                max_entries: 49,
                ..TocLimits::default()
            },
            "more than remote.toc_max_entries = 49 entries",
            2,
        ),
        (
            "JSON",
            TocLimits {
                max_json_bytes: 100,
                ..TocLimits::default()
            },
            "TOC JSON larger than remote.toc_max_json_bytes = 100",
            2,
        ),
        // Refused from the footer alone: the TOC itself is never fetched.
        (
            "compressed",
            TocLimits {
                max_compressed_bytes: 10,
                ..TocLimits::default()
            },
            "exceeds remote.toc_max_compressed_bytes = 10",
            1,
        ),
    ];
    for (what, limits, reason, range_requests) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mem = common::MemBlob::new(blob.clone());
        let sn = common::open_snapshotter_config(
            dir.path(),
            std::sync::Arc::new(common::MemBlobs(mem.clone())),
            &rt,
            64 << 20,
            std::sync::Arc::new(shoal::remote::clock::SystemClock),
            RemoteConfig {
                toc_limits: limits,
                ..common::test_config()
            },
        );
        let (r, logs) = common::capture_logs(|| {
            sn.create(
                Kind::Active,
                "extract-1",
                None,
                common::labels(&digest, "chain-1"),
            )
        });
        let stats = &sn.remote().unwrap().stats;
        if reason.is_empty() {
            assert!(matches!(r, Err(Error::AlreadyExists(_))), "{what}: {r:?}");
            assert_eq!(stats.fallbacks.load(Ordering::Relaxed), 0, "{what}");
            continue;
        }
        let m = r.unwrap_or_else(|e| panic!("{what}: Prepare failed instead of falling back: {e}"));
        assert_eq!(m[0].r#type, "bind", "{what}: a directory to unpack into");
        assert_eq!(stats.fallbacks.load(Ordering::Relaxed), 1, "{what}");
        assert_eq!(stats.fallbacks_toc.load(Ordering::Relaxed), 1, "{what}");
        assert_eq!(
            stats.fallbacks_toc_limit.load(Ordering::Relaxed),
            1,
            "{what}"
        );
        assert!(
            logs.contains("falling back to a normal pull") && logs.contains(reason),
            "{what}: expected {reason:?} in the log:\n{logs}"
        );
        assert_eq!(
            mem.requests.load(Ordering::SeqCst),
            range_requests,
            "{what}: range requests"
        );
        assert!(
            std::fs::read_dir(dir.path().join("tocs"))
                .unwrap()
                .next()
                .is_none(),
            "{what}: a refused TOC is not kept"
        );
    }
}
