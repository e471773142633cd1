//! Credentials scoped to one registry host and repository, supplied from
//! outside the registry client: the CRI image-service proxy (`crate::cri`)
//! keeps those of each `PullImage`, so the lazy layers of that image are
//! fetched with the pod's pull secret instead of the node's credentials.
//!
//! Invariants: a scoped credential is only looked up by the host actually
//! contacted (so a mirror, whose host differs, never receives it) and the
//! repository of the request; it wins over the node's credentials for that
//! pair; an anonymous client ([`super::Registry::anonymous`]) never uses it.
//! Tokens bought with it are cached apart from the node's (see
//! `auth::Who`).

use std::fmt::Debug;
use std::sync::Arc;

use super::Credential;

/// A credential for one image, as CRI's `AuthConfig` carries it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ImageCredential {
    /// User name, password or identity token (`credential.host` is the
    /// registry host the image names).
    pub credential: Credential,
    /// A bearer token sent to the registry as is; empty for none.
    pub registry_token: String,
}

/// Where the registry client finds credentials scoped to an image.
pub trait ScopedCredentials: Send + Sync + Debug {
    /// The credential to send to `host` (`host[:port]`, normalised as
    /// `auth::normalize_host` does: Docker Hub is `docker.io`) for
    /// `repository`, if any is in force.
    fn lookup(&self, host: &str, repository: &str) -> Option<Arc<ImageCredential>>;
}
