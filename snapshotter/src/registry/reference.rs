//! Image references (`[HOST[:PORT]/]REPO[:TAG][@DIGEST]`), parsed the way
//! Docker and containerd normalise them.
//!
//! Invariants: `registry` is the name used for `hosts.toml` lookup and
//! credentials (`docker.io`, never `index.docker.io`); the host that requests
//! go to without a hosts file is [`Reference::default_host`]. A reference
//! without a host lives on `docker.io`, and a one-component repository there
//! gets the `library/` prefix.

use std::fmt;
use std::str::FromStr;

use super::RegistryError;

/// The registry name of Docker Hub, as used in `hosts.toml` directories.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_HOST: &str = "registry-1.docker.io";

/// Parsed image reference, e.g. `127.0.0.1:5000/busybox:1` or
/// `docker.io/library/alpine@sha256:...`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]`; Docker Hub is always `docker.io` here.
    pub registry: String,
    /// Repository path inside the registry, e.g. `library/alpine`.
    pub repository: String,
    /// Tag, if the reference names one.
    pub tag: Option<String>,
    /// Digest (`algorithm:hex`), if the reference names one.
    pub digest: Option<String>,
}

impl Reference {
    /// The host that requests go to when no `hosts.toml` names a server:
    /// `registry-1.docker.io` for Docker Hub, otherwise `registry`.
    pub fn default_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_HOST
        } else {
            &self.registry
        }
    }

    /// What a manifest request names: the digest if there is one, else the
    /// tag, else `latest`.
    pub fn object(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s).map_err(|reason| RegistryError::InvalidReference {
            reference: s.to_string(),
            reason,
        })
    }
}

fn parse(s: &str) -> Result<Reference, String> {
    if s.is_empty() {
        return Err("empty reference".into());
    }
    let (name_tag, digest) = match s.split_once('@') {
        Some((n, d)) => {
            validate_digest(d)?;
            (n, Some(d.to_string()))
        }
        None => (s, None),
    };
    // A ':' after the last '/' starts the tag; earlier ones belong to a port.
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].find(':') {
        Some(i) => {
            let i = last_slash + i;
            (&name_tag[..i], Some(name_tag[i + 1..].to_string()))
        }
        None => (name_tag, None),
    };
    if let Some(tag) = &tag {
        validate_tag(tag)?;
    }
    let (registry, mut repository) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), rest.to_string())
        }
        _ => (DOCKER_HUB.to_string(), name.to_string()),
    };
    validate_host(&registry)?;
    let registry = match registry.as_str() {
        "index.docker.io" | DOCKER_HUB_HOST => DOCKER_HUB.to_string(),
        _ => registry,
    };
    if registry == DOCKER_HUB && !repository.contains('/') {
        repository = format!("library/{repository}");
    }
    validate_repository(&repository)?;
    Ok(Reference {
        registry,
        repository,
        tag,
        digest,
    })
}

fn validate_host(host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid registry host {host:?}"))
    }
}

fn validate_repository(repo: &str) -> Result<(), String> {
    if repo.is_empty() {
        return Err("empty repository".into());
    }
    for component in repo.split('/') {
        let ok = !component.is_empty()
            && component
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            && component.starts_with(|c: char| c.is_ascii_alphanumeric())
            && component.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !ok {
            return Err(format!(
                "invalid repository component {component:?} (lowercase letters, digits, '.', '_', '-')"
            ));
        }
    }
    Ok(())
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid tag {tag:?}"))
    }
}

/// Checks `algorithm:encoded`; sha256 and sha512 must be lowercase hex of the
/// right length.
pub(crate) fn validate_digest(d: &str) -> Result<(), String> {
    let (algo, hex) = d
        .split_once(':')
        .ok_or_else(|| format!("invalid digest {d:?}: no algorithm"))?;
    let want = match algo {
        "sha256" => Some(64),
        "sha512" => Some(128),
        _ => None,
    };
    let hex_ok = hex
        .chars()
        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    match want {
        Some(n) if hex.len() == n && hex_ok => Ok(()),
        None if !algo.is_empty() && !hex.is_empty() => Ok(()),
        _ => Err(format!("invalid digest {d:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn p(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_short_names_are_normalised() {
        let r = p("alpine");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/alpine");
        assert_eq!(r.tag, None);
        assert_eq!(r.default_host(), "registry-1.docker.io");
        assert_eq!(r.object(), "latest");
        assert_eq!(p("alpine:3.19").tag.as_deref(), Some("3.19"));
        assert_eq!(p("user/app:v1").repository, "user/app");
        assert_eq!(p("docker.io/library/alpine").repository, "library/alpine");
        assert_eq!(p("index.docker.io/alpine").registry, "docker.io");
        assert_eq!(p("registry-1.docker.io/x/y").registry, "docker.io");
    }

    #[test]
    fn hosts_with_ports() {
        let r = p("127.0.0.1:5000/busybox:1");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "busybox");
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.default_host(), "127.0.0.1:5000");
        let r = p("localhost/a/b");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost", "a/b")
        );
        let r = p("localhost:5000/a");
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.tag, None);
        assert_eq!(p("[::1]:5000/a:t").registry, "[::1]:5000");
        assert_eq!(p("ghcr.io/o/r/deep:x").repository, "o/r/deep");
    }

    #[test]
    fn digests() {
        let r = p(&format!("docker.io/library/alpine@{D}"));
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.tag, None);
        assert_eq!(r.object(), D);
        let r = p(&format!("127.0.0.1:5000/busybox:1@{D}"));
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.object(), D);
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/busybox:1@{D}"));
    }

    #[test]
    fn invalid_references_are_refused() {
        for bad in [
            "",
            "UPPER/case",
            "a@sha256:abc",
            "a@nocolon",
            "a:bad tag",
            "host.io/",
            "a//b",
            "-a",
        ] {
            let err = bad.parse::<Reference>().unwrap_err();
            assert!(err.to_string().contains("reference"), "{bad}: {err}");
        }
    }
}
