//! Docker's `config.json` and Kubernetes' forms of it (a mounted
//! `.dockerconfigjson`, a legacy `.dockercfg`, or a Secret's directory), read
//! into [`Credential`]s. Credential helpers (`credsStore`, `credHelpers`) are
//! not run.

use std::collections::HashMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;

use super::Credential;

#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    identitytoken: String,
}

/// The file a Kubernetes `kubernetes.io/dockerconfigjson` Secret mounted as
/// a volume holds (`{"auths": ...}`, as Docker's `config.json`).
pub const DOCKERCONFIGJSON: &str = ".dockerconfigjson";
/// The file of a legacy `kubernetes.io/dockercfg` Secret (the host map
/// without the `auths` wrapper).
pub const DOCKERCFG: &str = ".dockercfg";

/// Reads Docker's `config.json` into credentials, in no particular order.
/// Kubernetes' forms are read too: a `.dockerconfigjson` file (the same
/// JSON), a legacy `.dockercfg` (hosts at the top level, no `auths`), or a
/// directory holding either (a Secret mounted as a volume).
///
/// # Errors
/// The file is unreadable (other than missing), not JSON, or has an `auth`
/// field that is not base64 `user:password`.
pub fn load_docker_config(path: &Path) -> Result<Vec<Credential>, String> {
    if path.is_dir() {
        let mut out = Vec::new();
        for name in [DOCKERCONFIGJSON, DOCKERCFG] {
            out.extend(load_docker_config(&path.join(name))?);
        }
        return Ok(out);
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.to_string()),
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let legacy = value.as_object().is_some_and(|o| {
        !o.contains_key("auths") && !o.is_empty() && o.values().all(|v| v.is_object())
    });
    let cfg: DockerConfig = if legacy {
        DockerConfig {
            auths: serde_json::from_value(value).map_err(|e| e.to_string())?,
            ..DockerConfig::default()
        }
    } else {
        serde_json::from_value(value).map_err(|e| e.to_string())?
    };
    if cfg.creds_store.is_some() || !cfg.cred_helpers.is_empty() {
        tracing::debug!(path = %path.display(), "credential helpers are not supported; using only inline auths");
    }
    let mut out = Vec::new();
    for (host, a) in cfg.auths {
        let (mut username, mut password) = (a.username, a.password);
        if !a.auth.is_empty() {
            let raw = B64
                .decode(a.auth.trim())
                .map_err(|e| format!("auths.{host}.auth: not base64: {e}"))?;
            let raw =
                String::from_utf8(raw).map_err(|_| format!("auths.{host}.auth: not UTF-8"))?;
            let (u, p) = raw
                .split_once(':')
                .ok_or_else(|| format!("auths.{host}.auth: not user:password"))?;
            username = u.to_string();
            password = p.to_string();
        }
        if username.is_empty() && password.is_empty() && a.identitytoken.is_empty() {
            continue;
        }
        out.push(Credential {
            host,
            username,
            password,
            identity_token: a.identitytoken,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_docker_config_forms() {
        let dir = tempfile::tempdir().unwrap();
        let ab = B64.encode("alice:pw");
        // A Secret of type kubernetes.io/dockerconfigjson, mounted: a
        // directory with .dockerconfigjson.
        let secret = dir.path().join("secret");
        std::fs::create_dir(&secret).unwrap();
        std::fs::write(
            secret.join(DOCKERCONFIGJSON),
            format!(r#"{{"auths":{{"r.io":{{"auth":"{ab}"}}}}}}"#),
        )
        .unwrap();
        let c = load_docker_config(&secret).unwrap();
        assert_eq!(
            (
                c[0].host.as_str(),
                c[0].username.as_str(),
                c[0].password.as_str()
            ),
            ("r.io", "alice", "pw")
        );
        // The file itself, and the legacy .dockercfg (no "auths").
        assert_eq!(
            load_docker_config(&secret.join(DOCKERCONFIGJSON)).unwrap(),
            c
        );
        let legacy = dir.path().join(DOCKERCFG);
        std::fs::write(
            &legacy,
            format!(r#"{{"https://old.io":{{"auth":"{ab}","email":"a@b"}}}}"#),
        )
        .unwrap();
        let c = load_docker_config(&legacy).unwrap();
        assert_eq!(
            (c[0].host.as_str(), c[0].username.as_str()),
            ("https://old.io", "alice")
        );
        // An empty directory holds nothing; a broken file is an error.
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(load_docker_config(&empty).unwrap().is_empty());
        std::fs::write(secret.join(DOCKERCFG), "{").unwrap();
        assert!(load_docker_config(&secret).is_err());
    }

    #[test]
    fn docker_config_forms() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths":{{"a.io":{{"auth":"{}"}},"b.io":{{"username":"u","password":"p"}},
                "c.io":{{"identitytoken":"tok"}},"d.io":{{}}}},"credsStore":"desktop"}}"#,
                B64.encode("alice:s3:cret")
            ),
        )
        .unwrap();
        let mut creds = load_docker_config(&p).unwrap();
        creds.sort_by(|a, b| a.host.cmp(&b.host));
        assert_eq!(creds.len(), 3);
        assert_eq!(
            (creds[0].username.as_str(), creds[0].password.as_str()),
            ("alice", "s3:cret")
        );
        assert_eq!(creds[1].password, "p");
        assert_eq!(creds[2].identity_token, "tok");
        assert!(load_docker_config(&dir.path().join("missing"))
            .unwrap()
            .is_empty());
        std::fs::write(&p, r#"{"auths":{"a.io":{"auth":"!!"}}}"#).unwrap();
        assert!(load_docker_config(&p).unwrap_err().contains("a.io"));
    }
}
