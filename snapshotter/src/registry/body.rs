//! Reading registry responses: headers that matter (`Content-Length`,
//! `Content-Range`, `Retry-After`), error bodies, and bodies with a timeout
//! between chunks and a floor on their average rate ([`Pace`]).
//!
//! Invariant: [`read_body`] returns exactly the bytes asked for or an error;
//! a body that ends early is [`RegistryError::ShortRead`], one slower than
//! its [`Pace`] allows is [`RegistryError::Timeout`] or
//! [`RegistryError::TooSlow`].

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::header::HeaderValue;
use reqwest::Response;
use tracing::debug;

use super::error::{error_chain, RegistryError, Site};
use super::MAX_MANIFEST_BYTES;

/// Bytes of an error body kept for the error message.
const ERROR_DETAIL_BYTES: usize = 512;
/// Largest buffer reserved up front for a body (it grows past this).
const MAX_PREALLOC: u64 = 16 << 20;

pub(crate) fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("header built from valid ASCII")
}

pub(crate) fn header_str(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `Content-Length` from the header itself (reqwest reports 0 for HEAD).
pub(crate) fn content_length(resp: &Response) -> Option<u64> {
    header_str(resp, "content-length").and_then(|v| v.trim().parse().ok())
}

/// `bytes a-b/total` (total may be `*`).
pub(crate) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.trim().split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    (a <= b).then_some((a, b, total))
}

pub(crate) fn parse_retry_after(resp: &Response) -> Option<Duration> {
    header_str(resp, "retry-after")?
        .trim()
        .parse()
        .ok()
        .map(Duration::from_secs)
}

/// Turns a non-success response into an error, with the start of its body.
pub(crate) async fn status_error(
    mut resp: Response,
    site: &Site,
    timeout: Duration,
) -> RegistryError {
    let status = resp.status().as_u16();
    let retry_after = parse_retry_after(&resp);
    let mut detail = Vec::new();
    while detail.len() < ERROR_DETAIL_BYTES {
        match tokio::time::timeout(timeout, resp.chunk()).await {
            Ok(Ok(Some(c))) => detail.extend_from_slice(&c),
            _ => break,
        }
    }
    detail.truncate(ERROR_DETAIL_BYTES);
    let detail = String::from_utf8_lossy(&detail).trim().replace('\n', " ");
    site.status(status, detail, retry_after)
}

/// Reads a body of unknown length, up to `limit` bytes.
pub(crate) async fn read_to_end(
    resp: &mut Response,
    site: &Site,
    timeout: Duration,
    limit: u64,
) -> Result<Bytes, RegistryError> {
    let mut buf = BytesMut::new();
    loop {
        match tokio::time::timeout(timeout, resp.chunk()).await {
            Err(_) => return Err(site.timeout(timeout, "body bytes")),
            Ok(Err(e)) => {
                debug!(host = %site.host, error = %error_chain(&e), "body ended with an error");
                return Err(site.bad(format!("body broke off after {} bytes", buf.len())));
            }
            Ok(Ok(None)) => return Ok(buf.freeze()),
            Ok(Ok(Some(c))) => {
                if buf.len() as u64 + c.len() as u64 > limit {
                    return Err(site.bad(format!("body exceeds {limit} bytes")));
                }
                buf.extend_from_slice(&c);
            }
        }
    }
}

/// How long a body may take: at most `gap` between chunks and, with a
/// `min_rate` (bytes/s, 0: none), on average at least `min_rate` once
/// `grace` has passed. So a body of `n` bytes is abandoned after
/// `max(grace, n / min_rate)` at the latest, however it trickles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pace {
    pub gap: Duration,
    pub min_rate: u64,
    pub grace: Duration,
}

impl Pace {
    /// How long to wait for more bytes with `got` in after `elapsed`, and
    /// whether the rate floor (not `gap`) sets that bound.
    fn wait(&self, got: u64, elapsed: Duration) -> (Duration, bool) {
        if self.min_rate == 0 {
            return (self.gap, false);
        }
        let earned = Duration::from_secs_f64(got as f64 / self.min_rate as f64);
        let left = self.grace.max(earned).saturating_sub(elapsed);
        if left < self.gap {
            (left, true)
        } else {
            (self.gap, false)
        }
    }
}

/// Where a body's bytes go as they arrive, besides the returned buffer:
/// each piece with the blob offset of its first byte. A retried request
/// sends its range again from the start; a receiver keeps what it has.
pub type BodySink = tokio::sync::mpsc::UnboundedSender<(u64, Bytes)>;

/// Reads `want` bytes after skipping `skip`, as fast as `pace` demands
/// (skipped bytes count towards the rate). With `rest`, its bytes come
/// first, before the response's, and on success it holds what the last
/// chunk had past the window (so a caller can go on reading the body).
/// With `exact`, a body longer than `skip + want` is an error; otherwise
/// the rest is left unread (the connection is dropped). With `sink`
/// (and the blob offset of the first wanted byte), every piece kept is also
/// sent there as it arrives, unverified and possibly followed by an error.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn read_body(
    resp: &mut Response,
    site: &Site,
    pace: Pace,
    mut skip: u64,
    want: u64,
    exact: bool,
    sink: Option<(&BodySink, u64)>,
    mut rest: Option<&mut Bytes>,
) -> Result<Bytes, RegistryError> {
    let cap = usize::try_from(want.min(MAX_PREALLOC.max(MAX_MANIFEST_BYTES))).unwrap_or(0);
    let mut buf = BytesMut::with_capacity(cap);
    let started = Instant::now();
    let mut got = 0u64;
    let mut carried = rest.as_deref_mut().map(std::mem::take);
    while (buf.len() as u64) < want {
        if let Some(c) = carried.take().filter(|c| !c.is_empty()) {
            take_window(&mut buf, &mut skip, want, sink, &c, &mut rest);
            continue;
        }
        let (wait, floor) = pace.wait(got, started.elapsed());
        let chunk = match tokio::time::timeout(wait, resp.chunk()).await {
            Err(_) if floor => return Err(site.too_slow(got, started.elapsed(), pace.min_rate)),
            Err(_) => return Err(site.timeout(pace.gap, "body bytes")),
            Ok(Err(e)) => {
                debug!(host = %site.host, error = %error_chain(&e), "body ended with an error");
                return Err(site.short(buf.len() as u64, want));
            }
            Ok(Ok(None)) => return Err(site.short(buf.len() as u64, want)),
            Ok(Ok(Some(c))) => c,
        };
        got += chunk.len() as u64;
        if exact && skip + (want - buf.len() as u64) < chunk.len() as u64 {
            return Err(site.bad(format!("body longer than the {want} bytes asked for")));
        }
        take_window(&mut buf, &mut skip, want, sink, &chunk, &mut rest);
    }
    if exact {
        if let Ok(Ok(Some(c))) = tokio::time::timeout(pace.gap, resp.chunk()).await {
            if !c.is_empty() {
                return Err(site.bad(format!("body longer than the {want} bytes asked for")));
            }
        }
    }
    Ok(buf.freeze())
}

/// Appends to `buf` the part of `chunk` after `skip` bytes, up to `want`
/// in all (sending it to `sink` too), and leaves in `rest` what is past it.
fn take_window(
    buf: &mut BytesMut,
    skip: &mut u64,
    want: u64,
    sink: Option<(&BodySink, u64)>,
    chunk: &Bytes,
    rest: &mut Option<&mut Bytes>,
) {
    let from = (*skip).min(chunk.len() as u64) as usize;
    *skip -= from as u64;
    let room = (want - buf.len() as u64) as usize;
    let to = chunk.len().min(from + room);
    if let Some((sink, base)) = sink {
        if to > from {
            // A receiver that went away only stops wanting the pieces.
            let _ = sink.send((base + buf.len() as u64, chunk.slice(from..to)));
        }
    }
    buf.extend_from_slice(&chunk[from..to]);
    if let Some(r) = rest {
        **r = chunk.slice(to..);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((0, 9, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        assert_eq!(parse_content_range("bytes 9-0/100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
    }
}
