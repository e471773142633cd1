//! The credential store: the pull credentials of each image pulled through
//! the CRI proxy, kept so that its lazy layers are fetched with them, also
//! after a restart of the daemon.
//!
//! # Where and who
//! One JSON file, `ROOT/cri/credentials.json` (mode 0600, in a 0700
//! directory; both are re-moded on open), written whole through a temporary
//! file and a rename, so a crash leaves the old or the new file. Only root
//! (the daemon's user) can read it. Secrets are never logged.
//!
//! # Invariants
//! - Entries are keyed by the normalised image reference
//!   (`host/repository:tag` or `@digest`) and carry the registry host and
//!   repository they are scoped to.
//! - An entry expires `ttl` after its last pull; an expired entry is never
//!   returned and is dropped at the next write or load. A new pull of the
//!   image replaces it (and its expiry).
//! - [`ScopedCredentials::lookup`] by host and repository returns the most
//!   recently pulled unexpired entry for that pair.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::registry::auth::normalize_host;
use crate::registry::{Credential, ImageCredential, Reference, ScopedCredentials};

/// The store's file name inside its directory.
pub const FILE_NAME: &str = "credentials.json";
/// The directory's mode.
pub const DIR_MODE: u32 = 0o700;
/// The file's mode.
pub const FILE_MODE: u32 = 0o600;

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not the store's JSON.
    #[error("{path}: not a credential store: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        reason: String,
    },
}

/// One image's credential, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    /// Registry host (`docker.io`, `127.0.0.1:5000`), normalised.
    host: String,
    repository: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    identity_token: String,
    #[serde(default)]
    registry_token: String,
    /// Seconds since the epoch of the pull that stored it.
    pulled: u64,
    /// Seconds since the epoch after which it is not used.
    expires: u64,
}

impl Entry {
    fn credential(&self) -> Arc<ImageCredential> {
        Arc::new(ImageCredential {
            credential: Credential {
                host: self.host.clone(),
                username: self.username.clone(),
                password: self.password.clone(),
                identity_token: self.identity_token.clone(),
            },
            registry_token: self.registry_token.clone(),
        })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    /// By normalised image reference.
    images: BTreeMap<String, Entry>,
}

/// The wall clock, replaceable in tests: expiry must hold across restarts,
/// so it is wall time, not `Instant`.
pub type Now = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Per-image pull credentials; see the module doc.
pub struct CredentialStore {
    dir: PathBuf,
    ttl: Duration,
    now: Now,
    /// One lock: lookups are in memory, writes replace the file while
    /// holding it so that the file follows the map's order of changes.
    images: Mutex<BTreeMap<String, Entry>>,
}

impl std::fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("CredentialStore")
            .field("dir", &self.dir)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// The normalised form of an image reference (`alpine` becomes
/// `docker.io/library/alpine:latest`); `None` for what is not a reference
/// (an image ID).
pub fn normalize_image(image: &str) -> Option<String> {
    image.parse::<Reference>().ok().map(|r| image_key(&r))
}

/// The store's key for `r`: its normalised form, with `:latest` when it
/// names neither tag nor digest (as containerd names such an image).
fn image_key(r: &Reference) -> String {
    if r.tag.is_none() && r.digest.is_none() {
        format!("{r}:latest")
    } else {
        r.to_string()
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl CredentialStore {
    /// Opens (creating) the store in `dir`; entries expire `ttl` after their
    /// pull.
    ///
    /// # Errors
    /// `dir` or the file cannot be created, re-moded or read, or the file is
    /// corrupt.
    pub fn open(dir: &Path, ttl: Duration) -> Result<CredentialStore, StoreError> {
        Self::open_with_clock(dir, ttl, Arc::new(SystemTime::now))
    }

    /// [`CredentialStore::open`] with a clock (tests).
    ///
    /// # Errors
    /// As [`CredentialStore::open`].
    pub fn open_with_clock(
        dir: &Path,
        ttl: Duration,
        now: Now,
    ) -> Result<CredentialStore, StoreError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
            .map_err(io(dir))?;
        let path = dir.join(FILE_NAME);
        let mut images = match std::fs::read(&path) {
            Ok(bytes) => {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(FILE_MODE))
                    .map_err(io(&path))?;
                serde_json::from_slice::<File>(&bytes)
                    .map_err(|e| StoreError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?
                    .images
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(&path)(e)),
        };
        let t = secs(now());
        images.retain(|_, e| e.expires > t);
        Ok(CredentialStore {
            dir: dir.to_owned(),
            ttl,
            now,
            images: Mutex::new(images),
        })
    }

    /// The store's file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Images with an unexpired credential, normalised, in order.
    pub fn images(&self) -> Vec<String> {
        let t = secs((self.now)());
        let images = self.images.lock().unwrap_or_else(|e| e.into_inner());
        images
            .iter()
            .filter(|(_, e)| e.expires > t)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Keeps `cred` for `image` (a reference), replacing what it had, and
    /// returns what it replaced (to [`CredentialStore::restore`] when the
    /// pull fails).
    ///
    /// # Errors
    /// `image` is not a reference, or the file cannot be written.
    pub fn put(
        &self,
        image: &str,
        cred: &ImageCredential,
    ) -> Result<Option<Arc<ImageCredential>>, PutError> {
        let reference: Reference = image
            .parse()
            .map_err(|e| PutError::Reference(format!("{image:?}: {e}")))?;
        let now = secs((self.now)());
        let c = &cred.credential;
        let entry = Entry {
            host: normalize_host(&reference.registry),
            repository: reference.repository.clone(),
            username: c.username.clone(),
            password: c.password.clone(),
            identity_token: c.identity_token.clone(),
            registry_token: cred.registry_token.clone(),
            pulled: now,
            expires: now.saturating_add(self.ttl.as_secs()),
        };
        let key = image_key(&reference);
        let mut images = self.images.lock().unwrap_or_else(|e| e.into_inner());
        let old = images.insert(key.clone(), entry);
        if let Err(e) = self.write(&mut images) {
            match &old {
                Some(o) => images.insert(key, o.clone()),
                None => images.remove(&key),
            };
            return Err(e.into());
        }
        Ok(old.filter(|o| o.expires > now).map(|o| o.credential()))
    }

    /// Puts back what [`CredentialStore::put`] replaced for `image` (or
    /// removes it when `old` is `None`).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn restore(
        &self,
        image: &str,
        old: Option<Arc<ImageCredential>>,
    ) -> Result<(), StoreError> {
        match old {
            Some(c) => match self.put(image, &c) {
                Ok(_) => Ok(()),
                Err(PutError::Store(e)) => Err(e),
                Err(PutError::Reference(_)) => Ok(()),
            },
            None => self.remove(&[image.to_string()]).map(|_| ()),
        }
    }

    /// Forgets the credentials of `images` (references, normalised here;
    /// other strings are ignored). Returns how many entries went.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn remove(&self, images: &[String]) -> Result<usize, StoreError> {
        let keys: Vec<String> = images.iter().filter_map(|i| normalize_image(i)).collect();
        let mut map = self.images.lock().unwrap_or_else(|e| e.into_inner());
        let before = map.len();
        map.retain(|k, _| !keys.contains(k));
        let gone = before - map.len();
        if gone > 0 {
            self.write(&mut map)?;
        }
        Ok(gone)
    }

    /// Replaces the file with `images` less expired entries (temporary file,
    /// fsync, rename).
    fn write(&self, images: &mut BTreeMap<String, Entry>) -> Result<(), StoreError> {
        let t = secs((self.now)());
        images.retain(|_, e| e.expires > t);
        let path = self.path();
        let file = File {
            images: images.clone(),
        };
        let bytes = serde_json::to_vec(&file).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        crate::secret_file::write(&path, &bytes, FILE_MODE)
            .map_err(|(path, source)| StoreError::Io { path, source })
    }
}

/// Why [`CredentialStore::put`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// The image is not a reference.
    #[error("not an image reference: {0}")]
    Reference(String),
    /// The file could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ScopedCredentials for CredentialStore {
    fn lookup(&self, host: &str, repository: &str) -> Option<Arc<ImageCredential>> {
        let t = secs((self.now)());
        let images = self.images.lock().unwrap_or_else(|e| e.into_inner());
        images
            .values()
            .filter(|e| e.expires > t && e.host == host && e.repository == repository)
            .max_by_key(|e| e.pulled)
            .map(Entry::credential)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    const TTL: Duration = Duration::from_secs(3600);

    /// A clock at `t` seconds, moved by the test.
    fn clock(t: &Arc<AtomicU64>) -> Now {
        let t = t.clone();
        Arc::new(move || UNIX_EPOCH + Duration::from_secs(t.load(Ordering::SeqCst)))
    }

    fn cred(user: &str) -> ImageCredential {
        ImageCredential {
            credential: Credential {
                host: "ignored".into(),
                username: user.into(),
                password: "pw".into(),
                identity_token: String::new(),
            },
            registry_token: String::new(),
        }
    }

    fn user(s: &CredentialStore, host: &str, repo: &str) -> Option<String> {
        s.lookup(host, repo).map(|c| c.credential.username.clone())
    }

    #[test]
    fn scoped_to_host_and_repository_and_normalised() {
        let dir = tempfile::tempdir().unwrap();
        let t = Arc::new(AtomicU64::new(1_000));
        let s = CredentialStore::open_with_clock(dir.path(), TTL, clock(&t)).unwrap();
        s.put("alpine", &cred("hub")).unwrap();
        // The same image by its full name is the same entry.
        s.put("docker.io/library/alpine:latest", &cred("hub"))
            .unwrap();
        s.put("127.0.0.1:5000/team/app:v1", &cred("local")).unwrap();
        assert_eq!(
            user(&s, "docker.io", "library/alpine").as_deref(),
            Some("hub")
        );
        assert_eq!(
            user(&s, "127.0.0.1:5000", "team/app").as_deref(),
            Some("local")
        );
        assert_eq!(
            user(&s, "127.0.0.1:5000", "team/other"),
            None,
            "other repository"
        );
        assert_eq!(user(&s, "mirror.local", "team/app"), None, "other host");
        // The most recent pull of the repository wins.
        t.store(1_010, Ordering::SeqCst);
        s.put("127.0.0.1:5000/team/app:v2", &cred("newer")).unwrap();
        assert_eq!(
            user(&s, "127.0.0.1:5000", "team/app").as_deref(),
            Some("newer")
        );
        assert_eq!(
            s.images(),
            [
                "127.0.0.1:5000/team/app:v1",
                "127.0.0.1:5000/team/app:v2",
                "docker.io/library/alpine:latest"
            ]
        );
        assert!(matches!(
            s.put("Not A Reference!", &cred("x")),
            Err(PutError::Reference(_))
        ));
    }

    #[test]
    fn entries_expire_and_a_new_pull_refreshes_them() {
        let dir = tempfile::tempdir().unwrap();
        let t = Arc::new(AtomicU64::new(1_000));
        let s = CredentialStore::open_with_clock(dir.path(), TTL, clock(&t)).unwrap();
        s.put("r.io/app:v1", &cred("a")).unwrap();
        t.store(1_000 + TTL.as_secs() - 1, Ordering::SeqCst);
        assert_eq!(user(&s, "r.io", "app").as_deref(), Some("a"));
        t.store(1_000 + TTL.as_secs(), Ordering::SeqCst);
        assert_eq!(user(&s, "r.io", "app"), None, "expired");
        assert!(s.images().is_empty());
        // The next pull stores it again with a new expiry; put reports no
        // live predecessor.
        let old = s.put("r.io/app:v1", &cred("b")).unwrap();
        assert!(old.is_none());
        t.store(1_000 + 2 * TTL.as_secs() - 1, Ordering::SeqCst);
        assert_eq!(user(&s, "r.io", "app").as_deref(), Some("b"));
        // Expired entries do not survive a reload either.
        t.store(1_000 + 3 * TTL.as_secs(), Ordering::SeqCst);
        let again = CredentialStore::open_with_clock(dir.path(), TTL, clock(&t)).unwrap();
        assert!(again.images().is_empty());
    }

    #[test]
    fn remove_and_restore() {
        let dir = tempfile::tempdir().unwrap();
        let t = Arc::new(AtomicU64::new(1_000));
        let s = CredentialStore::open_with_clock(dir.path(), TTL, clock(&t)).unwrap();
        s.put("r.io/app:v1", &cred("a")).unwrap();
        s.put("r.io/app:v2", &cred("a2")).unwrap();
        // A failed pull with other credentials puts the old ones back.
        let old = s.put("r.io/app:v1", &cred("wrong")).unwrap();
        s.restore("r.io/app:v1", old).unwrap();
        assert_eq!(s.lookup("r.io", "app").unwrap().credential.password, "pw");
        let old = s.put("r.io/new:v1", &cred("n")).unwrap();
        s.restore("r.io/new:v1", old).unwrap();
        assert_eq!(user(&s, "r.io", "new"), None);
        // RemoveImage: by any name, unnormalised; IDs are ignored.
        let gone = s
            .remove(&["sha256:0123".into(), "r.io/app:v1".into()])
            .unwrap();
        assert_eq!(gone, 1);
        assert_eq!(s.images(), ["r.io/app:v2"]);
        s.remove(&["r.io/app:v2".into()]).unwrap();
        assert_eq!(user(&s, "r.io", "app"), None);
        let reloaded = CredentialStore::open_with_clock(dir.path(), TTL, clock(&t)).unwrap();
        assert!(reloaded.images().is_empty(), "removal is persisted");
    }

    #[test]
    fn survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let t = Arc::new(AtomicU64::new(1_000));
        {
            let s = CredentialStore::open_with_clock(dir.path(), TTL, clock(&t)).unwrap();
            let mut c = cred("alice");
            c.registry_token = "rt".into();
            c.credential.identity_token = "it".into();
            s.put("r.io/private/app:v1", &c).unwrap();
        }
        t.store(1_100, Ordering::SeqCst);
        let s = CredentialStore::open_with_clock(dir.path(), TTL, clock(&t)).unwrap();
        let c = s.lookup("r.io", "private/app").unwrap();
        assert_eq!(c.credential.username, "alice");
        assert_eq!(c.credential.password, "pw");
        assert_eq!(c.credential.identity_token, "it");
        assert_eq!(c.registry_token, "rt");
        assert_eq!(c.credential.host, "r.io");
        // The expiry is the original pull's, not the restart's.
        t.store(1_000 + TTL.as_secs(), Ordering::SeqCst);
        assert!(s.lookup("r.io", "private/app").is_none());
    }

    #[test]
    fn root_only_file_modes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("cri");
        // A directory and file that someone made readable are re-moded.
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(d.join(FILE_NAME), r#"{"images":{}}"#).unwrap();
        std::fs::set_permissions(d.join(FILE_NAME), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let s = CredentialStore::open(&d, TTL).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&d), DIR_MODE);
        assert_eq!(mode(&s.path()), FILE_MODE);
        // A fresh file gets 0600 whatever the umask.
        std::fs::remove_file(s.path()).unwrap();
        s.put("r.io/app:v1", &cred("a")).unwrap();
        assert_eq!(mode(&s.path()), FILE_MODE);
        assert!(!d.join(format!(".{FILE_NAME}.tmp")).exists());
        // A fresh directory, nested, is 0700.
        let nested = dir.path().join("a/b");
        let s = CredentialStore::open(&nested, TTL).unwrap();
        assert_eq!(mode(&nested), DIR_MODE);
        drop(s);
        // A corrupt file is an error, not an empty store.
        std::fs::write(d.join(FILE_NAME), "{").unwrap();
        assert!(matches!(
            CredentialStore::open(&d, TTL),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn debug_never_shows_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let s = CredentialStore::open(dir.path(), TTL).unwrap();
        s.put("r.io/app:v1", &cred("alice")).unwrap();
        let d = format!("{s:?}");
        assert!(!d.contains("alice") && !d.contains("pw"), "{d}");
    }
}
