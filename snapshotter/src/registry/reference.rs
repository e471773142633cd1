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

/// Longest repository name the distribution spec allows.
const MAX_REPOSITORY_LEN: usize = 255;

/// The distribution spec's repository name: path components
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` separated by `/`.
fn repository_grammar() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        let component = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*";
        regex::Regex::new(&format!("^{component}(?:/{component})*$")).expect("static regex")
    })
}

fn validate_repository(repo: &str) -> Result<(), String> {
    if repo.is_empty() {
        return Err("empty repository".into());
    }
    if repo.len() > MAX_REPOSITORY_LEN {
        return Err(format!(
            "repository name longer than {MAX_REPOSITORY_LEN} bytes"
        ));
    }
    if !repository_grammar().is_match(repo) {
        return Err(format!(
            "invalid repository {repo:?} (components of lowercase letters and digits, \
             joined by '.', '_', '__' or dashes, separated by '/')"
        ));
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

/// Checks a digest against the OCI grammar: `algorithm:encoded`, the
/// algorithm `[a-z0-9]+([+._-][a-z0-9]+)*`, the encoded part
/// `[a-zA-Z0-9=_-]+`; sha256, sha384 and sha512 must be lowercase hex of
/// their length. Digests are pasted into URL paths, so nothing else passes.
pub(crate) fn validate_digest(d: &str) -> Result<(), String> {
    oci_spec::image::Digest::try_from(d)
        .map(drop)
        .map_err(|e| format!("invalid digest {d:?}: {e}"))
}

impl Reference {
    /// Checks every part against its grammar. The fields are public, so a
    /// `Reference` built by hand (not parsed) is checked again here before
    /// any of it goes into a URL.
    ///
    /// # Errors
    /// [`RegistryError::InvalidReference`] naming the part.
    pub fn validate(&self) -> Result<(), RegistryError> {
        let check = || {
            validate_host(&self.registry)?;
            validate_repository(&self.repository)?;
            if let Some(t) = &self.tag {
                validate_tag(t)?;
            }
            if let Some(d) = &self.digest {
                validate_digest(d)?;
            }
            Ok::<_, String>(())
        };
        check().map_err(|reason| RegistryError::InvalidReference {
            reference: self.to_string(),
            reason,
        })
    }
}

/// Checks what goes after `/manifests/`: a tag or a digest.
pub(crate) fn validate_object(object: &str) -> Result<(), String> {
    if object.contains(':') {
        validate_digest(object)
    } else {
        validate_tag(object)
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

    #[test]
    fn digests_follow_the_oci_grammar() {
        let sha512 = format!("sha512:{}", "ab".repeat(64));
        for good in [
            D,
            sha512.as_str(),
            "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
            "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564",
            "a.b_c-d:x=Y_z-0",
        ] {
            assert_eq!(validate_digest(good), Ok(()), "{good}");
        }
        let short = format!("sha256:{}", "a".repeat(63));
        let upper = format!("sha256:{}", "A".repeat(64));
        let sha512_short = format!("sha512:{}", "a".repeat(64));
        for bad in [
            "x:/../../admin?a=b",
            "x:..",
            "x:a/b",
            "x:a?b",
            "x:a#b",
            "x:a%2fb",
            "x:a b",
            "x:",
            ":abc",
            "X:abc",
            "a..b:abc",
            "a+:abc",
            "+a:abc",
            "nocolon",
            "sha256:/../../v2/_catalog",
            short.as_str(),
            upper.as_str(),
            sha512_short.as_str(),
        ] {
            let err = validate_digest(bad).unwrap_err();
            assert!(err.contains("invalid digest"), "{bad}: {err}");
        }
    }

    #[test]
    fn repositories_follow_the_distribution_grammar() {
        for good in ["a", "library/alpine", "a.b/c_d/e__f/g-h/i---j", "0/9"] {
            assert_eq!(validate_repository(good), Ok(()), "{good}");
        }
        let long = "a".repeat(256);
        for bad in [
            "",
            "a/../b",
            "..",
            "a..b",
            "a._b",
            "a___b",
            "a-",
            "_a",
            "a/",
            "/a",
            "a//b",
            "A",
            "a?b",
            "a%2fb",
            "a b",
            long.as_str(),
        ] {
            assert!(validate_repository(bad).is_err(), "{bad:?}");
        }
        // A hand-built reference is checked too, before any URL is made.
        let r = Reference {
            registry: "127.0.0.1:5000".into(),
            repository: "a/../../admin".into(),
            tag: None,
            digest: None,
        };
        let err = r.validate().unwrap_err().to_string();
        assert!(err.contains("invalid repository"), "{err}");
        let r = Reference {
            repository: "a".into(),
            digest: Some("x:/../admin".into()),
            ..r
        };
        assert!(r.validate().is_err());
        assert_eq!(validate_object("latest"), Ok(()));
        assert!(validate_object("../x").is_err());
        assert!(validate_object("x:/../y").is_err());
    }
}
