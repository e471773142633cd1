//! Decoding fetched chunks off the async runtime: decompression, the length
//! and sha256 checks, and the store's write (write, fsync, rename) run on
//! tokio's blocking pool, never on a runtime worker (there is one per core,
//! and they serve gRPC too).
//!
//! Invariants:
//! - A chunk is stored, and its bytes handed back, only after its length and
//!   sha256 match the TOC ([`decode_chunk`]).
//! - A [`Decoder`] settles its jobs one at a time, in the order they were
//!   sent: a merged run uses one blocking thread at most, as it used one
//!   runtime worker before, and decoding overlaps the rest of the transfer.

use std::io::{self, Read};
use std::sync::{mpsc, Arc};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc as tmpsc;

use crate::remote::store::ChunkStore;
use crate::remote::toc::{Chunk, Compression};

/// Decompresses one chunk and checks its length and digest.
///
/// # Errors
/// A message saying what did not match.
pub fn decode_chunk(c: Compression, compressed: &[u8], chunk: &Chunk) -> Result<Bytes, String> {
    let mut out = Vec::with_capacity(chunk.len as usize);
    let res = match c {
        Compression::Gzip => flate2::read::MultiGzDecoder::new(compressed)
            .take(chunk.len)
            .read_to_end(&mut out),
        Compression::Zstd => zstd::stream::read::Decoder::new(compressed)
            .and_then(|d| d.take(chunk.len).read_to_end(&mut out)),
    };
    res.map_err(|e| format!("decompression failed: {e}"))?;
    if out.len() as u64 != chunk.len {
        return Err(format!(
            "decompressed {} bytes, TOC says {}",
            out.len(),
            chunk.len
        ));
    }
    if Sha256::digest(&out).as_slice() != chunk.digest {
        return Err("sha256 does not match chunkDigest".into());
    }
    Ok(Bytes::from(out))
}

/// A verified chunk, and the error of its disk write if the store could not
/// keep it on disk (it is in memory either way).
pub type Kept = (Bytes, Option<io::Error>);

/// Decodes and verifies `compressed`; a good chunk is put in `store`.
/// Blocking: call it on the blocking pool.
///
/// # Errors
/// What did not verify.
pub fn decode_and_keep(
    store: &ChunkStore,
    compression: Compression,
    chunk: &Chunk,
    compressed: &[u8],
) -> Result<Kept, String> {
    let b = decode_chunk(compression, compressed, chunk)?;
    let not_cached = store.put(chunk.digest, b.clone()).err();
    Ok((b, not_cached))
}

/// [`decode_and_keep`] on the blocking pool.
///
/// # Errors
/// As [`decode_and_keep`]; a panic of the job is reported the same way.
pub async fn decode_and_keep_async(
    store: Arc<ChunkStore>,
    compression: Compression,
    chunk: Chunk,
    compressed: Bytes,
) -> Result<Kept, String> {
    tokio::task::spawn_blocking(move || decode_and_keep(&store, compression, &chunk, &compressed))
        .await
        .unwrap_or_else(|e| Err(format!("decode task failed: {e}")))
}

/// One job: the index of the chunk in its run, the chunk, its compressed
/// bytes.
type Job = (usize, Chunk, Bytes);

/// A job's outcome, by its index.
pub type Settled = (usize, Result<Kept, String>);

/// A blocking-pool thread that decodes, verifies and stores the chunks of
/// one run in order, started at the first job and ended when the sender is
/// dropped.
pub struct Decoder {
    store: Arc<ChunkStore>,
    compression: Compression,
    jobs: Option<mpsc::Sender<Job>>,
    settled: Option<tmpsc::UnboundedReceiver<Settled>>,
    pending: usize,
}

impl Decoder {
    /// A decoder storing into `store`; no thread until the first job.
    pub fn new(store: Arc<ChunkStore>, compression: Compression) -> Decoder {
        Decoder {
            store,
            compression,
            jobs: None,
            settled: None,
            pending: 0,
        }
    }

    /// Queues chunk `k` of the run with its compressed bytes.
    pub fn send(&mut self, k: usize, chunk: Chunk, compressed: Bytes) {
        if self.jobs.is_none() {
            let (jobs, rx) = mpsc::channel::<Job>();
            let (tx, settled) = tmpsc::unbounded_channel();
            let (store, compression) = (Arc::clone(&self.store), self.compression);
            tokio::task::spawn_blocking(move || {
                for (k, chunk, compressed) in rx {
                    let r = decode_and_keep(&store, compression, &chunk, &compressed);
                    // The run went away: what is verified is still stored.
                    let _ = tx.send((k, r));
                }
            });
            self.jobs = Some(jobs);
            self.settled = Some(settled);
        }
        if let Some(jobs) = &self.jobs {
            if jobs.send((k, chunk, compressed)).is_ok() {
                self.pending += 1;
            }
        }
    }

    /// Jobs sent and not yet settled.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// The next settled job; `None` when nothing is pending, or when the
    /// thread died (then the pending jobs never settle: the caller treats
    /// them as failed).
    pub async fn next(&mut self) -> Option<Settled> {
        if self.pending == 0 {
            return None;
        }
        let r = self.settled.as_mut()?.recv().await;
        match r {
            Some(s) => {
                self.pending -= 1;
                Some(s)
            }
            None => {
                self.pending = 0;
                None
            }
        }
    }
}
