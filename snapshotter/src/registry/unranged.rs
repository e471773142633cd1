//! Hosts that ignore `Range`: they answer a Range request with `200` and the
//! whole blob. Reading such an answer up to the window and dropping it would
//! cost `offset + len` bytes per request, so fetching a layer in blob order
//! (the background fetch) would cost O(N²).
//!
//! Instead, the answer is *parked* once the window is read: the response
//! (with the bytes of its last chunk past the window) is kept, positioned
//! at the end of the window, and the next Range request of that blob on
//! that host whose offset is at or past the position continues it, skipping
//! only the gap. A layer fetched in blob order thus streams in one pass, in
//! one response. A request before every parked position starts a new
//! answer (its cost is bounded by the blob's size) and parks that one too.
//!
//! Invariants:
//! - A parked stream is used by one request at a time (it is taken out of
//!   the map) and is dropped, not reused, after any error.
//! - At most [`MAX_PARKED_PER_BLOB`] streams per blob and host and
//!   [`MAX_PARKED`] in all are kept (the oldest go first), and none longer
//!   than the request timeout unused: a parked stream holds a connection
//!   but no request slot.
//! - A host is remembered as ignoring `Range` from its first `200` answer,
//!   for the life of the client (logged once); every request to it still
//!   asks for a range, since a server may serve some blobs by range and
//!   not others.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::Response;
use tracing::{debug, warn};

use super::body::{content_length, read_body, BodySink};
use super::error::{RegistryError, Site};
use super::Registry;

/// Parked streams kept per blob and host.
pub const MAX_PARKED_PER_BLOB: usize = 4;
/// Parked streams kept in all.
pub const MAX_PARKED: usize = 64;

/// A full-body answer, read up to `pos`.
#[derive(Debug)]
pub(crate) struct Parked {
    /// The answer, its next byte at blob offset `pos + rest.len()`.
    pub resp: Response,
    /// Blob offset of the first byte not yet handed out.
    pub pos: u64,
    /// Bytes already received from `pos` on.
    pub rest: Bytes,
    at: Instant,
}

impl Parked {
    /// A stream positioned at `pos`, with `rest` received past it.
    pub fn new(resp: Response, pos: u64, rest: Bytes) -> Parked {
        Parked {
            resp,
            pos,
            rest,
            at: Instant::now(),
        }
    }
}

type Key = (String, String);

/// Hosts seen ignoring `Range`, and their parked answers.
#[derive(Debug, Default)]
pub(crate) struct Unranged {
    hosts: Mutex<HashSet<String>>,
    parked: Mutex<HashMap<Key, Vec<Parked>>>,
}

impl Unranged {
    /// Notes that `host` answered a Range request with the whole blob.
    pub fn note(&self, host: &str) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if hosts.insert(host.to_string()) {
            warn!(host, "registry host ignores Range requests; serving ranges from one streamed answer per blob");
        }
    }

    /// Whether `host` has been seen ignoring `Range`.
    pub fn ignores_range(&self, host: &str) -> bool {
        self.hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(host)
    }

    /// Takes the parked stream of `digest` on `host` nearest before
    /// `offset` (at most `max_idle` unused), if any.
    pub fn take(
        &self,
        host: &str,
        digest: &str,
        offset: u64,
        max_idle: Duration,
    ) -> Option<Parked> {
        let mut map = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let key = (host.to_string(), digest.to_string());
        let list = map.get_mut(&key)?;
        list.retain(|p| p.at.elapsed() <= max_idle);
        let best = list
            .iter()
            .enumerate()
            .filter(|(_, p)| p.pos <= offset)
            .max_by_key(|(_, p)| p.pos)
            .map(|(i, _)| i);
        let got = best.map(|i| list.swap_remove(i));
        if list.is_empty() {
            map.remove(&key);
        }
        got
    }

    /// Keeps `p` for the next request of `digest` on `host`.
    pub fn park(&self, host: &str, digest: &str, p: Parked) {
        let mut map = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = map.values().map(Vec::len).sum();
        if total >= MAX_PARKED {
            // Drop the oldest stream of all.
            let oldest = map
                .iter()
                .flat_map(|(k, v)| v.iter().enumerate().map(move |(i, p)| (p.at, k.clone(), i)))
                .min_by_key(|(at, _, _)| *at);
            if let Some((_, k, i)) = oldest {
                if let Some(v) = map.get_mut(&k) {
                    v.swap_remove(i);
                    if v.is_empty() {
                        map.remove(&k);
                    }
                }
            }
        }
        let list = map
            .entry((host.to_string(), digest.to_string()))
            .or_default();
        if list.len() >= MAX_PARKED_PER_BLOB {
            if let Some(i) = list
                .iter()
                .enumerate()
                .min_by_key(|(_, p)| p.at)
                .map(|(i, _)| i)
            {
                list.swap_remove(i);
            }
        }
        list.push(p);
    }

    /// Parked streams kept now.
    pub fn parked(&self) -> usize {
        self.parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }
}

impl Registry {
    /// The range from a parked answer of `digest` on `site.host` that is at
    /// or before `offset`, if there is one. `None`: none, or it failed (it
    /// is dropped, and the caller sends a request).
    pub(super) async fn continue_parked(
        &self,
        site: &Site,
        digest: &str,
        offset: u64,
        len: u64,
        sink: Option<&BodySink>,
    ) -> Option<Bytes> {
        let unranged = &self.inner.unranged;
        let timeout = self.inner.cfg.request_timeout;
        let mut p = unranged.take(&site.host, digest, offset, timeout)?;
        let mut rest = std::mem::take(&mut p.rest);
        let r = read_body(
            &mut p.resp,
            site,
            self.pace(),
            offset - p.pos,
            len,
            false,
            sink.map(|s| (s, offset)),
            Some(&mut rest),
        )
        .await;
        match r {
            Ok(b) => {
                debug!(host = %site.host, from = p.pos, offset, len, "range served from a parked full-body answer");
                let end = offset + len;
                if content_length(&p.resp).is_none_or(|t| t > end) {
                    unranged.park(&site.host, digest, Parked::new(p.resp, end, rest));
                }
                Some(b)
            }
            Err(e) => {
                debug!(host = %site.host, error = %e, "parked full-body answer failed; sending a new request");
                None
            }
        }
    }

    /// The range from `resp`, a `200` with the whole blob answering a Range
    /// request; the answer is then parked for the blob's next range.
    pub(super) async fn read_unranged(
        &self,
        mut resp: Response,
        site: &Site,
        digest: &str,
        offset: u64,
        len: u64,
        sink: Option<&BodySink>,
    ) -> Result<Bytes, RegistryError> {
        let end = offset + len;
        let total = content_length(&resp);
        if let Some(cl) = total.filter(|cl| *cl < end) {
            return Err(site.bad(format!("blob has {cl} bytes, range ends at {end}")));
        }
        self.inner.unranged.note(&site.host);
        debug!(host = %site.host, offset, len, "server ignored Range; skipping to the window in the full body");
        let mut rest = Bytes::new();
        let b = read_body(
            &mut resp,
            site,
            self.pace(),
            offset,
            len,
            false,
            sink.map(|s| (s, offset)),
            Some(&mut rest),
        )
        .await?;
        if total.is_none_or(|t| t > end) {
            self.inner
                .unranged
                .park(&site.host, digest, Parked::new(resp, end, rest));
        }
        Ok(b)
    }

    /// Whether `host` (`host[:port]`) has answered a Range request with the
    /// whole blob.
    pub fn ignores_range(&self, host: &str) -> bool {
        self.inner.unranged.ignores_range(host)
    }

    /// Full-body answers of hosts that ignore `Range` kept for the next
    /// range of their blob.
    pub fn parked_streams(&self) -> usize {
        self.inner.unranged.parked()
    }
}
