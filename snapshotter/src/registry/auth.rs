//! Registry authentication: `WWW-Authenticate` challenges, credentials
//! (Shoal's config first, then Docker's `config.json`), and a token cache.
//!
//! Requests go out anonymously until a host answers 401. A `Bearer`
//! challenge is answered by fetching a token from its realm (GET with basic
//! credentials, or the OAuth2 refresh-token POST for an identity token); a
//! `Basic` challenge by sending the credentials. Tokens are cached per
//! (host, scope) until shortly before they expire; a host that asked for
//! Basic gets it up front afterwards.
//!
//! Invariants: credentials are looked up by the host actually contacted, so
//! a mirror never receives the upstream registry's credentials (give the
//! mirror its own entry). An anonymous request (a host an image annotation
//! chose, see `remote::annotations`) sends none and never uses a token
//! that credentials bought: anonymous tokens are cached apart. An image's own
//! credential (see [`super::scoped`]) is used instead of the node's for its
//! host and repository, and its tokens are cached apart too ([`Who`]), so a
//! token bought with a pod's pull secret never serves a request made with the
//! node's credentials, nor the other way round. Credential helpers
//! (`credsStore`, `credHelpers`) are not run. One token fetch runs at a time, and waiters re-check the
//! cache, so a burst of 401s costs one token request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;

use super::body::read_to_end;
use super::error::{error_chain, RegistryError, Site};
use super::reference::{DOCKER_HUB, DOCKER_HUB_HOST};
use super::scoped::ImageCredential;
use super::Credential;

/// Whose credentials a request carries; tokens are cached per `Who`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Who {
    /// The node's: `RegistryConfig::credentials`, then Docker's config.
    Node,
    /// None (a host that an image annotation chose).
    Anonymous,
    /// An image's own (from a CRI `PullImage`), for its host and repository.
    Image(Arc<ImageCredential>),
}

/// Lifetime assumed for a token whose response has no `expires_in`, and the
/// minimum the distribution spec allows.
const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// A cached token is dropped this long before it expires.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// A token is reused for at most this long, whatever its `expires_in`.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Token responses larger than this are refused (counted as they arrive).
const MAX_TOKEN_RESPONSE: u64 = 1 << 20;

/// When a token fetched at `started` with `expires_in` seconds of life
/// stops being used: the lifetime is clamped to
/// [`MIN_TOKEN_LIFETIME`]..=[`MAX_TOKEN_LIFETIME`] (a hostile `expires_in`
/// must not overflow `Instant`), less [`TOKEN_EXPIRY_MARGIN`].
fn token_expiry(started: Instant, expires_in: u64) -> Instant {
    let life = Duration::from_secs(expires_in).clamp(MIN_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME);
    started
        .checked_add(life - TOKEN_EXPIRY_MARGIN)
        .unwrap_or(started)
}

/// One parsed challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lower-cased scheme: `bearer`, `basic`, ...
    pub scheme: String,
    /// Parameters, keys lower-cased.
    pub params: HashMap<String, String>,
}

/// Every challenge in a 401 response's `WWW-Authenticate` headers.
pub fn challenges(headers: &reqwest::header::HeaderMap) -> Vec<Challenge> {
    headers
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(parse_www_authenticate)
        .collect()
}

/// Parses every challenge in a `WWW-Authenticate` value (RFC 7235):
/// `Bearer realm="https://a/token",service="reg",scope="repository:x:pull"`.
/// Quoted values may contain commas and `\`-escapes.
pub fn parse_www_authenticate(header: &str) -> Vec<Challenge> {
    let s = header.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t' || s[*i] == b',') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while *i < s.len() && !b" \t,=\"".contains(&s[*i]) {
            *i += 1;
        }
        header[start..*i].to_string()
    };
    loop {
        skip_ws(&mut i);
        if i >= s.len() {
            break;
        }
        let word = token(&mut i);
        if word.is_empty() {
            i += 1;
            continue;
        }
        // Look past spaces for '=': a parameter of the current challenge.
        let mut j = i;
        while j < s.len() && s[j] == b' ' {
            j += 1;
        }
        if j < s.len() && s[j] == b'=' && !out.is_empty() {
            i = j + 1;
            while i < s.len() && s[i] == b' ' {
                i += 1;
            }
            let value = if i < s.len() && s[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    let ch = header[i..].chars().next().unwrap_or(' ');
                    v.push(ch);
                    i += ch.len_utf8();
                }
                i += 1;
                v
            } else {
                token(&mut i)
            };
            if let Some(c) = out.last_mut() {
                c.params.insert(word.to_ascii_lowercase(), value);
            }
        } else {
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: HashMap::new(),
            });
        }
    }
    out
}

/// The name credentials are filed under: Docker Hub's aliases become
/// `docker.io`; scheme and path (`https://index.docker.io/v1/`) are dropped.
pub fn normalize_host(key: &str) -> String {
    let k = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match k.as_str() {
        "index.docker.io" | DOCKER_HUB_HOST => DOCKER_HUB.to_string(),
        _ => k,
    }
}

/// A cached token.
#[derive(Debug, Clone)]
struct Token {
    value: String,
    expires: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// By (host, scope, whose credentials bought it).
    tokens: HashMap<(String, String, Who), Token>,
    basic_hosts: HashMap<String, ()>,
}

/// Credentials and cached authorizations of one `Registry`.
#[derive(Debug)]
pub(crate) struct Auth {
    creds: Vec<(String, Credential)>,
    state: Mutex<State>,
    fetching: tokio::sync::Mutex<()>,
    token_requests: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: String,
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    expires_in: u64,
}

impl Auth {
    /// `creds` in priority order (Shoal's own first).
    pub fn new(creds: Vec<Credential>) -> Auth {
        Auth {
            creds: creds
                .into_iter()
                .map(|c| (normalize_host(&c.host), c))
                .collect(),
            state: Mutex::new(State::default()),
            fetching: tokio::sync::Mutex::new(()),
            token_requests: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Token requests made so far (for status and tests).
    pub fn token_requests(&self) -> u64 {
        self.token_requests
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn credential<'a>(&'a self, host: &str, who: &'a Who) -> Option<&'a Credential> {
        match who {
            Who::Anonymous => return None,
            Who::Image(c) => return Some(&c.credential),
            Who::Node => {}
        }
        let h = normalize_host(host);
        self.creds.iter().find(|(k, _)| *k == h).map(|(_, c)| c)
    }

    fn basic_value(c: &Credential) -> String {
        format!(
            "Basic {}",
            B64.encode(format!("{}:{}", c.username, c.password))
        )
    }

    /// The `Authorization` value to send up front to `host` for `scope`, if
    /// a token is cached or the host asked for Basic before.
    /// An image's `registry_token` is sent as is.
    pub fn cached(&self, host: &str, scope: &str, who: &Who) -> Option<String> {
        if let Who::Image(c) = who {
            if !c.registry_token.is_empty() {
                return Some(format!("Bearer {}", c.registry_token));
            }
        }
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = state
            .tokens
            .get(&(host.to_string(), scope.to_string(), who.clone()))
        {
            if Instant::now() < t.expires {
                return Some(format!("Bearer {}", t.value));
            }
        }
        if state.basic_hosts.contains_key(host) {
            return self.credential(host, who).map(Self::basic_value);
        }
        None
    }

    /// Forgets `used` for (`host`, `scope`) after the host refused it.
    pub fn invalidate(&self, host: &str, scope: &str, who: &Who, used: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let key = (host.to_string(), scope.to_string(), who.clone());
        if state
            .tokens
            .get(&key)
            .is_some_and(|t| used == format!("Bearer {}", t.value))
        {
            state.tokens.remove(&key);
        }
    }

    /// Answers a 401 from `site.host`: returns the `Authorization` value to
    /// retry with, using `who`'s credentials ([`Who::Anonymous`]: none; a
    /// token is then asked for anonymously).
    ///
    /// # Errors
    /// No usable challenge, no credentials for a Basic challenge, or the
    /// token endpoint failing or refusing the credentials.
    pub async fn answer(
        &self,
        client: &reqwest::Client,
        site: &Site,
        scope: &str,
        challenges: &[Challenge],
        timeout: Duration,
        who: &Who,
    ) -> Result<String, RegistryError> {
        let anonymous = *who == Who::Anonymous;
        let cred = self.credential(&site.host, who);
        if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = c
                .params
                .get("realm")
                .ok_or_else(|| site.auth("Bearer challenge without realm"))?;
            let _one = self.fetching.lock().await;
            if let Some(v) = self.cached(&site.host, scope, who) {
                if v.starts_with("Bearer ") {
                    return Ok(v);
                }
            }
            let want_scope = c.params.get("scope").map_or(scope, String::as_str);
            let service = c.params.get("service").map(String::as_str);
            let token = self
                .fetch_token(client, site, realm, service, want_scope, cred, timeout)
                .await?;
            let value = format!("Bearer {}", token.value);
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state
                .tokens
                .insert((site.host.clone(), scope.to_string(), who.clone()), token);
            return Ok(value);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            if anonymous {
                return Err(site.auth(format!(
                    "registry asks for Basic auth, and credentials are not sent to {}: an image annotation chose it (remote.source_credentials)",
                    site.host
                )));
            }
            let c = cred.filter(|c| !c.username.is_empty()).ok_or_else(|| {
                site.auth(format!(
                    "registry asks for Basic auth and no username/password is configured for {}",
                    site.host
                ))
            })?;
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.basic_hosts.insert(site.host.clone(), ());
            return Ok(Self::basic_value(c));
        }
        Err(site.auth(if challenges.is_empty() {
            "HTTP 401 without a WWW-Authenticate challenge".to_string()
        } else {
            format!("unsupported challenge scheme {:?}", challenges[0].scheme)
        }))
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_token(
        &self,
        client: &reqwest::Client,
        site: &Site,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        cred: Option<&Credential>,
        timeout: Duration,
    ) -> Result<Token, RegistryError> {
        let mut url = reqwest::Url::parse(realm)
            .map_err(|e| site.auth(format!("invalid token realm {realm:?}: {e}")))?;
        self.token_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        let req = match cred {
            Some(c) if !c.identity_token.is_empty() => {
                let mut form = reqwest::Url::parse("x:/").expect("static URL");
                {
                    let mut q = form.query_pairs_mut();
                    q.append_pair("grant_type", "refresh_token")
                        .append_pair("refresh_token", &c.identity_token)
                        .append_pair("client_id", "shoal");
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    for s in scope.split_whitespace() {
                        q.append_pair("scope", s);
                    }
                }
                client
                    .post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(form.query().unwrap_or("").to_string())
            }
            _ => {
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    for s in scope.split_whitespace() {
                        q.append_pair("scope", s);
                    }
                    if let Some(c) = cred.filter(|c| !c.username.is_empty()) {
                        q.append_pair("account", &c.username);
                    }
                }
                let req = client.get(url);
                match cred.filter(|c| !c.username.is_empty()) {
                    Some(c) => req.basic_auth(&c.username, Some(&c.password)),
                    None => req,
                }
            }
        };
        let mut resp = tokio::time::timeout(timeout, req.send())
            .await
            .map_err(|_| site.timeout(timeout, "the token endpoint"))?
            .map_err(|e| site.auth(format!("token endpoint {realm}: {}", error_chain(&e))))?;
        let status = resp.status().as_u16();
        tracing::debug!(host = %site.host, realm, status, ms = started.elapsed().as_millis() as u64, "token request");
        let who = cred.map_or("anonymous".to_string(), |c| {
            format!("user {:?}", c.username)
        });
        if status >= 500 {
            return Err(site.status(status, format!("token endpoint {realm}"), None));
        }
        if status == 401 || status == 403 {
            return Err(site.auth(format!(
                "token endpoint {realm} refused {who} (HTTP {status})"
            )));
        }
        if !(200..300).contains(&status) {
            return Err(site.auth(format!("token endpoint {realm} answered HTTP {status}")));
        }
        // Counted as it arrives: an endless body stops at the cap, and the
        // whole read (not only each gap) is bounded by the timeout.
        let body = tokio::time::timeout(
            timeout,
            read_to_end(&mut resp, site, timeout, MAX_TOKEN_RESPONSE),
        )
        .await
        .map_err(|_| site.timeout(timeout, "the token endpoint"))?
        .map_err(|e| site.auth(format!("token endpoint {realm}: {e}")))?;
        let (value, expires) = parse_token_response(&body, started)
            .map_err(|e| site.auth(format!("token endpoint {realm}{e}")))?;
        Ok(Token { value, expires })
    }
}

/// The token in a token endpoint's JSON `body` (`token`, or OAuth2's
/// `access_token`) and when to stop using it, for a request sent at
/// `started`. Public for the fuzz targets.
///
/// # Errors
/// The body is not such JSON or has no token (the message continues
/// "token endpoint REALM").
pub fn parse_token_response(body: &[u8], started: Instant) -> Result<(String, Instant), String> {
    let t: TokenResponse = serde_json::from_slice(body).map_err(|e| format!(": bad JSON: {e}"))?;
    let value = if t.token.is_empty() {
        t.access_token
    } else {
        t.token
    };
    if value.is_empty() {
        return Err(" returned no token".to_string());
    }
    Ok((value, token_expiry(started, t.expires_in)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lifetime_is_clamped() {
        // Found by the auth_token fuzz target's input: `expires_in` of
        // u64::MAX seconds overflowed `Instant` (a panic in the daemon).
        let now = Instant::now();
        let body = include_bytes!("../../tests/fixtures/fuzz/auth_token-huge-expiry.json");
        let (token, expires) = parse_token_response(body, now).unwrap();
        assert_eq!(token, "t");
        assert_eq!(expires, now + MAX_TOKEN_LIFETIME - TOKEN_EXPIRY_MARGIN);
        let (_, expires) = parse_token_response(br#"{"access_token":"a"}"#, now).unwrap();
        assert_eq!(expires, now + MIN_TOKEN_LIFETIME - TOKEN_EXPIRY_MARGIN);
        let (_, expires) = parse_token_response(br#"{"token":"a","expires_in":300}"#, now).unwrap();
        assert_eq!(
            expires,
            now + Duration::from_secs(300) - TOKEN_EXPIRY_MARGIN
        );
        assert!(parse_token_response(br#"{"token":""}"#, now).is_err());
    }

    #[test]
    fn bearer_challenge_with_quoted_commas() {
        let c = parse_www_authenticate(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.docker.io/token");
        assert_eq!(c[0].params["service"], "registry.docker.io");
        assert_eq!(c[0].params["scope"], "repository:library/alpine:pull,push");
    }

    #[test]
    fn basic_and_multiple_challenges() {
        let c = parse_www_authenticate(r#"Basic realm="Registry Realm""#);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].params["realm"], "Registry Realm");
        let c = parse_www_authenticate(
            r#"Basic realm="x", Bearer realm="https://t/token", service=svc , error="invalid_token""#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].params["service"], "svc");
        assert_eq!(c[1].params["error"], "invalid_token");
        let c = parse_www_authenticate(r#"Bearer realm="a\"b""#);
        assert_eq!(c[0].params["realm"], "a\"b");
        assert!(parse_www_authenticate("").is_empty());
        assert_eq!(parse_www_authenticate("Negotiate")[0].scheme, "negotiate");
    }

    #[test]
    fn hosts_normalise_for_credentials() {
        assert_eq!(normalize_host("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalize_host("registry-1.docker.io"), "docker.io");
        assert_eq!(normalize_host("http://127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(normalize_host("Ghcr.io"), "ghcr.io");
    }

    #[test]
    fn shoal_credentials_win_over_later_ones() {
        let c = |h: &str, u: &str| Credential {
            host: h.into(),
            username: u.into(),
            password: "p".into(),
            identity_token: String::new(),
        };
        let auth = Auth::new(vec![
            c("docker.io", "first"),
            c("https://index.docker.io/v1/", "second"),
        ]);
        assert_eq!(
            auth.credential("registry-1.docker.io", &Who::Node)
                .unwrap()
                .username,
            "first"
        );
        assert!(auth.credential("mirror.local", &Who::Node).is_none());
        assert!(
            auth.credential("docker.io", &Who::Anonymous).is_none(),
            "anonymous"
        );
    }

    #[test]
    fn tokens_are_cached_per_host_and_scope_until_expiry() {
        let auth = Auth::new(Vec::new());
        let put = |host: &str, scope: &str, value: &str, expires: Instant| {
            let mut st = auth.state.lock().unwrap();
            st.tokens.insert(
                (host.into(), scope.into(), Who::Node),
                Token {
                    value: value.into(),
                    expires,
                },
            );
        };
        let later = Instant::now() + Duration::from_secs(60);
        put("r.io", "repository:a:pull", "A", later);
        put("r.io", "repository:old:pull", "OLD", Instant::now());
        assert_eq!(
            auth.cached("r.io", "repository:a:pull", &Who::Node)
                .as_deref(),
            Some("Bearer A")
        );
        assert_eq!(auth.cached("r.io", "repository:b:pull", &Who::Node), None);
        assert_eq!(auth.cached("m.io", "repository:a:pull", &Who::Node), None);
        assert_eq!(
            auth.cached("r.io", "repository:old:pull", &Who::Node),
            None,
            "expired"
        );
        // Invalidation only drops the token that was refused.
        auth.invalidate("r.io", "repository:a:pull", &Who::Node, "Bearer STALE");
        assert!(auth
            .cached("r.io", "repository:a:pull", &Who::Node)
            .is_some());
        auth.invalidate("r.io", "repository:a:pull", &Who::Node, "Bearer A");
        assert_eq!(auth.cached("r.io", "repository:a:pull", &Who::Node), None);
    }

    #[test]
    fn token_expiry_is_clamped() {
        let now = Instant::now();
        assert_eq!(
            token_expiry(now, u64::MAX),
            now + MAX_TOKEN_LIFETIME - TOKEN_EXPIRY_MARGIN
        );
        assert_eq!(
            token_expiry(now, 0),
            now + MIN_TOKEN_LIFETIME - TOKEN_EXPIRY_MARGIN
        );
        assert_eq!(
            token_expiry(now, 300),
            now + Duration::from_secs(300) - TOKEN_EXPIRY_MARGIN
        );
    }
}
