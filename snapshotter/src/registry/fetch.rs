//! The request loop behind [`Registry`]'s public calls: host failover,
//! retry rounds with backoff, authentication on 401, redirects, timeouts,
//! and checking Range answers and body lengths.
//!
//! Invariants: a returned range is exactly the bytes asked for; a body that
//! ends early is [`RegistryError::ShortRead`], never a shorter `Bytes`. The
//! permits of `limits` are held for the whole of one attempt (headers and
//! body) and never across a backoff sleep. Neither `Authorization` nor a
//! `hosts.toml` `[header]` leaves the registry's origin on a redirect.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::HeaderMap;
use reqwest::{Method, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use tracing::{debug, instrument, warn};

use super::body::{
    content_length, header_str, hv, parse_content_range, read_body, read_to_end, status_error,
    BodySink,
};
use super::error::{RegistryError, Site};
use super::hosts::Capability;
use super::reference::validate_digest;
use super::{Host, Reference, Registry, MAX_MANIFEST_BYTES};

/// First backoff step; each retry round doubles it.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest backoff between rounds (before `Retry-After`).
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A server's `Retry-After` is honoured up to this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Redirect hops followed for one request.
pub const MAX_REDIRECTS: usize = 10;

/// Media types asked for when fetching a manifest, preferred first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Delay before retry round `round + 1`: exponential from [`BACKOFF_BASE`],
/// capped at [`BACKOFF_MAX`], with "equal jitter": half the step is fixed,
/// the other half scaled by `unit` (in `[0, 1]`).
pub fn backoff(round: u32, unit: f64) -> Duration {
    let step = BACKOFF_BASE
        .saturating_mul(1u32.checked_shl(round.min(20)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX);
    step / 2 + (step / 2).mul_f64(unit.clamp(0.0, 1.0))
}

fn jitter_unit() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

enum Op<'a> {
    Range {
        digest: &'a str,
        offset: u64,
        len: u64,
        sink: Option<&'a BodySink>,
    },
    Size {
        digest: &'a str,
    },
    Manifest,
}

enum Outcome {
    Bytes(Bytes),
    Size(u64),
    Manifest(String, String, Bytes),
}

impl Registry {
    /// GET bytes `[offset, offset + len)` of blob `digest` in `reference`'s
    /// repository. Returns exactly `len` bytes (empty for `len == 0`).
    ///
    /// # Errors
    /// Every host failed: the last host's error (status, timeout, auth,
    /// short read, mismatching `Content-Range`).
    pub async fn fetch_range(
        &self,
        reference: &Reference,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
        self.fetch_range_streamed(reference, digest, offset, len, None)
            .await
    }

    /// [`Registry::fetch_range`], also sending the body's pieces to `sink`
    /// as they arrive (see [`BodySink`]), so a caller can use the start of a
    /// large range before its end is in.
    ///
    /// # Errors
    /// As [`Registry::fetch_range`].
    #[instrument(skip_all, fields(registry = %reference.registry, repo = %reference.repository, digest, offset, len))]
    pub async fn fetch_range_streamed(
        &self,
        reference: &Reference,
        digest: &str,
        offset: u64,
        len: u64,
        sink: Option<&BodySink>,
    ) -> Result<Bytes, RegistryError> {
        self.check_digest(reference, digest)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        if offset.checked_add(len).is_none() {
            return Err(self
                .site(reference, &reference.registry, digest)
                .bad("offset + len overflows"));
        }
        match self
            .run(
                reference,
                Capability::Pull,
                Op::Range {
                    digest,
                    offset,
                    len,
                    sink,
                },
            )
            .await?
        {
            Outcome::Bytes(b) => Ok(b),
            _ => unreachable!("range op yields bytes"),
        }
    }

    /// The size of blob `digest` (HEAD's `Content-Length`; a one-byte Range
    /// GET when HEAD gives none).
    ///
    /// # Errors
    /// As [`Registry::fetch_range`].
    #[instrument(skip_all, fields(registry = %reference.registry, repo = %reference.repository, digest))]
    pub async fn blob_size(
        &self,
        reference: &Reference,
        digest: &str,
    ) -> Result<u64, RegistryError> {
        self.check_digest(reference, digest)?;
        match self
            .run(reference, Capability::Pull, Op::Size { digest })
            .await?
        {
            Outcome::Size(n) => Ok(n),
            _ => unreachable!("size op yields a size"),
        }
    }

    /// The manifest or index `reference` names (by digest if it has one,
    /// else by tag, else `latest`): (media type, digest, bytes). A digest in
    /// the reference is checked against the bytes; otherwise the digest is
    /// the sha256 of the bytes (a differing `Docker-Content-Digest` is an
    /// error). Tags go to `resolve` hosts, digests to `pull` hosts.
    ///
    /// # Errors
    /// As [`Registry::fetch_range`], plus [`RegistryError::BadResponse`] for a
    /// digest mismatch or a manifest over [`MAX_MANIFEST_BYTES`].
    #[instrument(skip_all, fields(reference = %reference))]
    pub async fn fetch_manifest(
        &self,
        reference: &Reference,
    ) -> Result<(String, String, Bytes), RegistryError> {
        let cap = if reference.digest.is_some() {
            Capability::Pull
        } else {
            Capability::Resolve
        };
        match self.run(reference, cap, Op::Manifest).await? {
            Outcome::Manifest(t, d, b) => Ok((t, d, b)),
            _ => unreachable!("manifest op yields a manifest"),
        }
    }

    fn check_digest(&self, reference: &Reference, digest: &str) -> Result<(), RegistryError> {
        validate_digest(digest).map_err(|reason| {
            self.site(reference, &reference.registry, digest)
                .bad(reason)
        })
    }

    fn site(&self, reference: &Reference, host: &str, object: &str) -> Site {
        Site {
            host: host.to_string(),
            repo: reference.repository.clone(),
            object: object.to_string(),
        }
    }

    async fn run(
        &self,
        reference: &Reference,
        cap: Capability,
        op: Op<'_>,
    ) -> Result<Outcome, RegistryError> {
        // Image-chosen names go into URL paths: only grammatical ones do.
        reference.validate()?;
        let hosts = self.hosts_for(reference, cap)?;
        let mut done = vec![false; hosts.len()];
        let mut errors: Vec<Option<RegistryError>> = (0..hosts.len()).map(|_| None).collect();
        let mut retry_after = None;
        for round in 0..=self.inner.cfg.retries {
            if round > 0 {
                let mut delay = backoff(round - 1, jitter_unit());
                if let Some(ra) = retry_after.take() {
                    delay = delay.max(std::cmp::min(ra, MAX_RETRY_AFTER));
                }
                let reason = errors.iter().rev().flatten().next().map(|e| e.to_string());
                warn!(
                    round,
                    delay_ms = delay.as_millis() as u64,
                    reason = reason.as_deref().unwrap_or(""),
                    "retrying registry request"
                );
                tokio::time::sleep(delay).await;
            }
            for (i, host) in hosts.iter().enumerate() {
                if done[i] {
                    continue;
                }
                match self.attempt(host, reference, &op).await {
                    Ok(out) => return Ok(out),
                    Err(e) => {
                        if !e.is_transient() {
                            done[i] = true;
                        }
                        if e.retry_after().is_some() {
                            retry_after = e.retry_after();
                        }
                        if let Some(next) = hosts[i + 1..]
                            .iter()
                            .zip(&done[i + 1..])
                            .find(|(_, d)| !**d)
                        {
                            warn!(host = %host.spec.host, next = %next.0.spec.host, reason = %e, "registry host failed; trying the next host");
                        }
                        errors[i] = Some(e);
                    }
                }
            }
            if done.iter().all(|d| *d) {
                break;
            }
        }
        Err(errors
            .into_iter()
            .rev()
            .flatten()
            .next()
            .expect("at least one host was tried"))
    }

    async fn attempt(
        &self,
        host: &Host,
        reference: &Reference,
        op: &Op<'_>,
    ) -> Result<Outcome, RegistryError> {
        let blob = match *op {
            Op::Range { digest, .. } | Op::Size { digest } => Some(digest),
            Op::Manifest => None,
        };
        let _permits = self.inner.limits.acquire(&host.spec.host, blob).await;
        let repo = &reference.repository;
        let timeout = self.inner.cfg.request_timeout;
        let pace = self.pace();
        match *op {
            Op::Range {
                digest,
                offset,
                len,
                sink,
            } => {
                let site = self.site(reference, &host.spec.host, digest);
                if let Some(b) = self.continue_parked(&site, digest, offset, len, sink).await {
                    return Ok(Outcome::Bytes(b));
                }
                let last = offset + len - 1;
                let mut headers = HeaderMap::new();
                headers.insert("range", hv(&format!("bytes={offset}-{last}")));
                let path = format!("{}/{repo}/blobs/{digest}", host.spec.path);
                let mut resp = self.send(host, &site, Method::GET, &path, headers).await?;
                match resp.status() {
                    StatusCode::PARTIAL_CONTENT => {
                        let cr = header_str(&resp, "content-range");
                        match cr.as_deref().and_then(parse_content_range) {
                            Some((a, b, _)) if a == offset && b == last => {}
                            _ => {
                                return Err(site.bad(format!(
                                    "asked for bytes={offset}-{last}, got Content-Range {cr:?}"
                                )));
                            }
                        }
                        if let Some(cl) = content_length(&resp) {
                            if cl != len {
                                return Err(site
                                    .bad(format!("206 with Content-Length {cl}, expected {len}")));
                            }
                        }
                        read_body(
                            &mut resp,
                            &site,
                            pace,
                            0,
                            len,
                            true,
                            sink.map(|s| (s, offset)),
                            None,
                        )
                        .await
                        .map(Outcome::Bytes)
                    }
                    StatusCode::OK => self
                        .read_unranged(resp, &site, digest, offset, len, sink)
                        .await
                        .map(Outcome::Bytes),
                    StatusCode::RANGE_NOT_SATISFIABLE => Err(site.bad(format!(
                        "range bytes={offset}-{last} not satisfiable (Content-Range {:?})",
                        header_str(&resp, "content-range")
                    ))),
                    _ => Err(status_error(resp, &site, timeout).await),
                }
            }
            Op::Size { digest } => {
                let site = self.site(reference, &host.spec.host, digest);
                let path = format!("{}/{repo}/blobs/{digest}", host.spec.path);
                let resp = self
                    .send(host, &site, Method::HEAD, &path, HeaderMap::new())
                    .await?;
                if !resp.status().is_success() {
                    return Err(status_error(resp, &site, timeout).await);
                }
                if let Some(n) = content_length(&resp) {
                    return Ok(Outcome::Size(n));
                }
                let mut headers = HeaderMap::new();
                headers.insert("range", hv("bytes=0-0"));
                let resp = self.send(host, &site, Method::GET, &path, headers).await?;
                let total = match resp.status() {
                    StatusCode::PARTIAL_CONTENT => header_str(&resp, "content-range")
                        .as_deref()
                        .and_then(parse_content_range)
                        .and_then(|(_, _, t)| t),
                    StatusCode::OK => content_length(&resp),
                    _ => return Err(status_error(resp, &site, timeout).await),
                };
                total
                    .map(Outcome::Size)
                    .ok_or_else(|| site.bad("neither HEAD nor a Range GET tells the blob's size"))
            }
            Op::Manifest => {
                let object = reference.object();
                let site = self.site(reference, &host.spec.host, object);
                let mut headers = HeaderMap::new();
                headers.insert("accept", hv(MANIFEST_ACCEPT));
                let path = format!("{}/{repo}/manifests/{object}", host.spec.path);
                let mut resp = self.send(host, &site, Method::GET, &path, headers).await?;
                if !resp.status().is_success() {
                    return Err(status_error(resp, &site, timeout).await);
                }
                let media_type = header_str(&resp, "content-type")
                    .map(|t| t.split(';').next().unwrap_or("").trim().to_string())
                    .unwrap_or_default();
                let header_digest = header_str(&resp, "docker-content-digest");
                let body = match content_length(&resp) {
                    Some(n) if n > MAX_MANIFEST_BYTES => {
                        return Err(site.bad(format!(
                            "manifest of {n} bytes exceeds {MAX_MANIFEST_BYTES}"
                        )));
                    }
                    Some(n) => read_body(&mut resp, &site, pace, 0, n, true, None, None).await?,
                    None => read_to_end(&mut resp, &site, timeout, MAX_MANIFEST_BYTES).await?,
                };
                if body.len() as u64 > MAX_MANIFEST_BYTES {
                    return Err(site.bad(format!("manifest exceeds {MAX_MANIFEST_BYTES} bytes")));
                }
                let computed = format!("sha256:{:x}", Sha256::digest(&body));
                let expected = reference
                    .digest
                    .clone()
                    .or(header_digest.filter(|d| d.starts_with("sha256:")));
                if let Some(exp) = expected {
                    if exp.starts_with("sha256:") && exp != computed {
                        return Err(site.bad(format!(
                            "manifest digest mismatch: expected {exp}, content is {computed}"
                        )));
                    }
                }
                Ok(Outcome::Manifest(media_type, computed, body))
            }
        }
    }

    /// The `Authorization` value that answers `resp`'s 401 challenges for
    /// `scope` (fetch and push share it).
    pub(super) async fn answer(
        &self,
        host: &Host,
        site: &Site,
        scope: &str,
        resp: &Response,
        timeout: Duration,
        who: &super::auth::Who,
    ) -> Result<String, RegistryError> {
        let challenges = super::auth::challenges(resp.headers());
        self.inner
            .auth
            .answer(&host.client, site, scope, &challenges, timeout, who)
            .await
    }

    /// Sends one request to `host` (path relative to its origin), answering a
    /// 401 once with credentials, falling back to plain HTTP for loopback
    /// hosts, and following redirects. Returns the final response, whatever
    /// its status.
    async fn send(
        &self,
        host: &Host,
        site: &Site,
        method: Method,
        path: &str,
        headers: HeaderMap,
    ) -> Result<Response, RegistryError> {
        let scope = format!("repository:{}:pull", site.repo);
        let timeout = self.inner.cfg.request_timeout;
        let who = self.who(&host.spec.host, &site.repo);
        let mut auth = self.inner.auth.cached(&host.spec.host, &scope, &who);
        let mut answered = false;
        loop {
            let plain = host.spec.http_fallback && host.plain_http.load(Ordering::Relaxed);
            let scheme = if plain {
                "http"
            } else {
                host.spec.scheme.as_str()
            };
            let mut url = format!("{scheme}://{}{path}", host.spec.host);
            let first = self
                .hop(host, site, &method, &url, &headers, auth.as_deref())
                .await;
            let resp = match first {
                Err(RegistryError::Transport { reason, .. })
                    if host.spec.http_fallback && !plain && scheme == "https" =>
                {
                    debug!(host = %host.spec.host, %reason, "HTTPS failed on a loopback host; trying plain HTTP");
                    url = format!("http://{}{path}", host.spec.host);
                    let r = self
                        .hop(host, site, &method, &url, &headers, auth.as_deref())
                        .await?;
                    host.plain_http.store(true, Ordering::Relaxed);
                    r
                }
                other => other?,
            };
            // Only the registry's own 401 is answered with its credentials.
            let from_registry =
                reqwest::Url::parse(&url).is_ok_and(|u| u.origin() == resp.url().origin());
            if resp.status() == StatusCode::UNAUTHORIZED && from_registry {
                if answered {
                    let why = match &auth {
                        Some(a) if a.starts_with("Basic") => {
                            "registry refused the username/password"
                        }
                        Some(_) => "registry refused the token",
                        None => "registry demands credentials",
                    };
                    return Err(site.auth(format!("{why} (HTTP 401)")));
                }
                if let Some(used) = &auth {
                    self.inner
                        .auth
                        .invalidate(&host.spec.host, &scope, &who, used);
                }
                auth = Some(
                    self.answer(host, site, &scope, &resp, timeout, &who)
                        .await?,
                );
                answered = true;
                continue;
            }
            return Ok(resp);
        }
    }

    /// One request plus its redirect chain.
    async fn hop(
        &self,
        host: &Host,
        site: &Site,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        auth: Option<&str>,
    ) -> Result<Response, RegistryError> {
        let timeout = self.inner.cfg.request_timeout;
        let mut url =
            reqwest::Url::parse(url).map_err(|e| site.bad(format!("invalid URL {url}: {e}")))?;
        let origin = url.origin();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = host
                .client
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            // hosts.toml headers are for the registry, like Authorization:
            // neither follows a redirect to another origin.
            let same_origin = url.origin() == origin;
            if same_origin {
                for (k, v) in &host.spec.header {
                    req = req.header(k.as_str(), v.as_str());
                }
                if let Some(a) = auth {
                    req = req.header("authorization", a);
                }
            }
            let started = Instant::now();
            let resp = match tokio::time::timeout(timeout, req.send()).await {
                Err(_) => return Err(site.timeout(timeout, "response headers")),
                Ok(Err(e)) => return Err(site.transport(&e)),
                Ok(Ok(r)) => r,
            };
            debug!(
                host = %url.host_str().unwrap_or(""),
                method = %method,
                path = %url.path(),
                range = ?headers.get("range"),
                status = resp.status().as_u16(),
                ms = started.elapsed().as_millis() as u64,
                "registry request"
            );
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let Some(loc) = header_str(&resp, "location") else {
                return Ok(resp);
            };
            url = url
                .join(&loc)
                .map_err(|e| site.bad(format!("redirect to invalid location {loc:?}: {e}")))?;
            debug!(to = %url.origin().ascii_serialization(), cross_origin = url.origin() != origin, "following redirect");
        }
        Err(site.bad(format!("more than {MAX_REDIRECTS} redirects")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_within_bounds() {
        let ms = Duration::from_millis;
        // (round, with no jitter, with full jitter): 100 ms doubling per
        // round up to 5 s; half of each step is fixed, half is jitter.
        let expected = [
            (0, ms(50), ms(100)),
            (1, ms(100), ms(200)),
            (2, ms(200), ms(400)),
            (3, ms(400), ms(800)),
            (4, ms(800), ms(1600)),
            (5, ms(1600), ms(3200)),
            (6, ms(2500), ms(5000)),
            (7, ms(2500), ms(5000)),
            (20, ms(2500), ms(5000)),
            (21, ms(2500), ms(5000)),
            (32, ms(2500), ms(5000)),
            (u32::MAX, ms(2500), ms(5000)),
        ];
        for (round, lo, hi) in expected {
            assert_eq!(backoff(round, 0.0), lo, "round {round}, no jitter");
            assert_eq!(backoff(round, 1.0), hi, "round {round}, full jitter");
        }
        assert_eq!(backoff(3, 0.5), ms(600));
        assert_eq!(backoff(0, 0.25), Duration::from_micros(62_500));
        // Out-of-range jitter is clamped.
        assert_eq!(backoff(2, 7.0), ms(400));
        assert_eq!(backoff(2, -1.0), ms(200));
        // The real jitter source stays within the fixed bounds.
        for _ in 0..100 {
            let d = backoff(4, jitter_unit());
            assert!(ms(800) <= d && d <= ms(1600), "{d:?}");
        }
    }
}
