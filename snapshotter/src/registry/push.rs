//! Writing to a registry: blob uploads, manifest PUTs and tag checks, for
//! `shoal convert`.
//!
//! Invariants: uploads go to the registry's own server (the last host
//! `hosts.toml` resolution yields), never to a pull mirror. A blob is sent in
//! [`UPLOAD_PIECE`]-sized `PATCH` requests read from a file, so memory stays
//! bounded whatever the blob's size; the final `PUT ?digest=` lets the
//! registry check the digest. A blob the registry already has is not sent
//! again (`HEAD` first), so a retried conversion is idempotent.

use std::io::Read;
use std::path::Path;

use bytes::Bytes;
use reqwest::header::HeaderMap;
use reqwest::{Method, Response, StatusCode};

use super::body::{header_str, hv, status_error};
use super::error::{RegistryError, Site};
use super::hosts::Capability;
use super::reference::{validate_digest, validate_object};
use super::{Host, Reference, Registry};

/// Bytes sent per `PATCH` of a blob upload.
pub const UPLOAD_PIECE: usize = 16 << 20;

impl Registry {
    fn push_host(&self, reference: &Reference) -> Result<std::sync::Arc<Host>, RegistryError> {
        reference.validate()?;
        let hosts = self.hosts_for(reference, Capability::Resolve)?;
        Ok(hosts
            .last()
            .expect("hosts_for never returns an empty list")
            .clone())
    }

    fn push_site(&self, host: &Host, reference: &Reference, object: &str) -> Site {
        Site {
            host: host.spec.host.clone(),
            repo: reference.repository.clone(),
            object: object.to_string(),
        }
    }

    /// One request to the push host with `pull,push` scope, answering a 401
    /// once. `target` is a path on the host or an absolute URL (upload
    /// locations). Loopback hosts use plain HTTP if HTTPS fails.
    async fn push_send(
        &self,
        host: &Host,
        site: &Site,
        method: Method,
        target: &str,
        headers: HeaderMap,
        body: Option<Bytes>,
    ) -> Result<Response, RegistryError> {
        let scope = format!("repository:{}:pull,push", site.repo);
        let timeout = self.inner.cfg.request_timeout;
        // Pushes (`shoal convert`) use the node's credentials only.
        let who = if self.anonymous {
            super::auth::Who::Anonymous
        } else {
            super::auth::Who::Node
        };
        let mut auth = self.inner.auth.cached(&host.spec.host, &scope, &who);
        let mut answered = false;
        loop {
            let url = self.push_url(host, target);
            let resp = match self
                .push_once(
                    host,
                    site,
                    &method,
                    &url,
                    &headers,
                    body.clone(),
                    auth.as_deref(),
                )
                .await
            {
                Err(RegistryError::Transport { .. })
                    if host.spec.http_fallback
                        && url.starts_with("https://")
                        && !host.plain_http.load(std::sync::atomic::Ordering::Relaxed) =>
                {
                    host.plain_http
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                other => other?,
            };
            if resp.status() == StatusCode::UNAUTHORIZED && !answered {
                auth = Some(
                    self.answer(host, site, &scope, &resp, timeout, &who)
                        .await?,
                );
                answered = true;
                continue;
            }
            if resp.status() == StatusCode::UNAUTHORIZED {
                return Err(site.auth("registry refused the credentials for push (HTTP 401)"));
            }
            return Ok(resp);
        }
    }

    fn push_url(&self, host: &Host, target: &str) -> String {
        if target.starts_with("http://") || target.starts_with("https://") {
            return target.to_string();
        }
        let plain =
            host.spec.http_fallback && host.plain_http.load(std::sync::atomic::Ordering::Relaxed);
        let scheme = if plain {
            "http"
        } else {
            host.spec.scheme.as_str()
        };
        format!("{scheme}://{}{target}", host.spec.host)
    }

    #[allow(clippy::too_many_arguments)]
    async fn push_once(
        &self,
        host: &Host,
        site: &Site,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        body: Option<Bytes>,
        auth: Option<&str>,
    ) -> Result<Response, RegistryError> {
        let _permits = self.inner.limits.acquire(&host.spec.host, None).await;
        let mut req = host
            .client
            .request(method.clone(), url)
            .headers(headers.clone());
        for (k, v) in &host.spec.header {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        // Uploads of a piece may take longer than waiting for headers usually
        // does; allow for a slow link at 1 MB/s.
        let timeout = self.inner.cfg.request_timeout + std::time::Duration::from_secs(16);
        match tokio::time::timeout(timeout, req.send()).await {
            Err(_) => Err(site.timeout(timeout, "response to an upload")),
            Ok(Err(e)) => Err(site.transport(&e)),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// Whether blob `digest` exists in `reference`'s repository on the push host.
    ///
    /// # Errors
    /// The registry answered neither 200 nor 404, or could not be reached.
    pub async fn blob_exists(
        &self,
        reference: &Reference,
        digest: &str,
    ) -> Result<bool, RegistryError> {
        validate_digest(digest).map_err(|reason| RegistryError::InvalidReference {
            reference: reference.to_string(),
            reason,
        })?;
        let host = self.push_host(reference)?;
        let site = self.push_site(&host, reference, digest);
        let path = format!("{}/{}/blobs/{digest}", host.spec.path, reference.repository);
        let resp = self
            .push_send(&host, &site, Method::HEAD, &path, HeaderMap::new(), None)
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_error(resp, &site, self.inner.cfg.request_timeout).await),
        }
    }

    /// Uploads the file at `path` as blob `digest` (skipped if the registry
    /// has it). The registry checks the digest when the upload completes.
    ///
    /// # Errors
    /// Reading the file, or any request failing (the error names the blob).
    pub async fn push_blob(
        &self,
        reference: &Reference,
        digest: &str,
        path: &Path,
    ) -> Result<(), RegistryError> {
        if self.blob_exists(reference, digest).await? {
            return Ok(());
        }
        let host = self.push_host(reference)?;
        let site = self.push_site(&host, reference, digest);
        let timeout = self.inner.cfg.request_timeout;
        let start = format!("{}/{}/blobs/uploads/", host.spec.path, reference.repository);
        let resp = self
            .push_send(
                &host,
                &site,
                Method::POST,
                &start,
                HeaderMap::new(),
                Some(Bytes::new()),
            )
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(status_error(resp, &site, timeout).await);
        }
        let mut location = next_location(&resp, &site, &self.push_url(&host, &start))?;
        let mut file = std::fs::File::open(path)
            .map_err(|e| site.bad(format!("read {}: {e}", path.display())))?;
        let mut offset = 0u64;
        let mut buf = vec![0u8; UPLOAD_PIECE];
        loop {
            let n = read_full(&mut file, &mut buf)
                .map_err(|e| site.bad(format!("read {}: {e}", path.display())))?;
            if n == 0 {
                break;
            }
            let mut headers = HeaderMap::new();
            headers.insert("content-type", hv("application/octet-stream"));
            headers.insert(
                "content-range",
                hv(&format!("{offset}-{}", offset + n as u64 - 1)),
            );
            let body = Bytes::copy_from_slice(&buf[..n]);
            let resp = self
                .push_send(&host, &site, Method::PATCH, &location, headers, Some(body))
                .await?;
            if resp.status() != StatusCode::ACCEPTED {
                return Err(status_error(resp, &site, timeout).await);
            }
            location = next_location(&resp, &site, &location)?;
            offset += n as u64;
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        let done = format!("{location}{sep}digest={digest}");
        let mut headers = HeaderMap::new();
        headers.insert("content-type", hv("application/octet-stream"));
        let resp = self
            .push_send(
                &host,
                &site,
                Method::PUT,
                &done,
                headers,
                Some(Bytes::new()),
            )
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(status_error(resp, &site, timeout).await);
        }
        Ok(())
    }

    /// Whether `reference`'s tag (or digest) names a manifest on the push host.
    ///
    /// # Errors
    /// The registry answered neither 200 nor 404, or could not be reached.
    pub async fn manifest_exists(&self, reference: &Reference) -> Result<bool, RegistryError> {
        let host = self.push_host(reference)?;
        let object = reference.object().to_string();
        let site = self.push_site(&host, reference, &object);
        let path = format!(
            "{}/{}/manifests/{object}",
            host.spec.path, reference.repository
        );
        let mut headers = HeaderMap::new();
        headers.insert("accept", hv(super::MANIFEST_ACCEPT));
        let resp = self
            .push_send(&host, &site, Method::HEAD, &path, headers, None)
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_error(resp, &site, self.inner.cfg.request_timeout).await),
        }
    }

    /// PUTs a manifest or index under `object` (a tag or its digest).
    ///
    /// # Errors
    /// The registry refused it (the error names the object).
    pub async fn put_manifest(
        &self,
        reference: &Reference,
        object: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), RegistryError> {
        validate_object(object).map_err(|reason| RegistryError::InvalidReference {
            reference: reference.to_string(),
            reason,
        })?;
        let host = self.push_host(reference)?;
        let site = self.push_site(&host, reference, object);
        let path = format!(
            "{}/{}/manifests/{object}",
            host.spec.path, reference.repository
        );
        let mut headers = HeaderMap::new();
        headers.insert("content-type", hv(media_type));
        let resp = self
            .push_send(&host, &site, Method::PUT, &path, headers, Some(bytes))
            .await?;
        if !resp.status().is_success() {
            return Err(status_error(resp, &site, self.inner.cfg.request_timeout).await);
        }
        Ok(())
    }
}

/// The upload URL the registry wants next (its `Location`), made absolute.
fn next_location(resp: &Response, site: &Site, base: &str) -> Result<String, RegistryError> {
    let loc = header_str(resp, "location")
        .ok_or_else(|| site.bad("upload response without a Location"))?;
    let base = reqwest::Url::parse(base).map_err(|e| site.bad(format!("bad URL {base}: {e}")))?;
    base.join(&loc)
        .map(|u| u.to_string())
        .map_err(|e| site.bad(format!("bad upload Location {loc:?}: {e}")))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
