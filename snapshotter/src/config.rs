//! The daemon's configuration file (`/etc/shoal/config.toml` by default).
//!
//! Loading is read → size cap → parse → [`Config::validate`]. Every key has a
//! default (the `DEFAULT_*` constants, which docs/configuration.md quotes), so
//! an empty file is a valid config. Unknown keys are errors, so that a typo
//! is caught instead of silently ignored. Command-line flags override the
//! file.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The config format version this build reads.
pub const CONFIG_VERSION: u32 = 1;
/// Default `root`: snapshots, metadata and (later) the chunk cache.
pub const DEFAULT_ROOT: &str = "/var/lib/shoal";
/// Default `address`: the gRPC socket containerd's `proxy_plugins` dials.
pub const DEFAULT_ADDRESS: &str = "/run/shoal/shoal.sock";
/// Default config file; a missing default file means all defaults.
pub const DEFAULT_CONFIG: &str = "/etc/shoal/config.toml";
/// Default `log_level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// A config file larger than this is refused before parsing.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Format version; must be [`CONFIG_VERSION`].
    pub version: u32,
    /// State directory.
    pub root: PathBuf,
    /// gRPC socket path.
    pub address: PathBuf,
    /// Log filter: a level (`info`) or `tracing` directives
    /// (`info,shoal::grpc=debug`).
    pub log_level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: CONFIG_VERSION,
            root: DEFAULT_ROOT.into(),
            address: DEFAULT_ADDRESS.into(),
            log_level: DEFAULT_LOG_LEVEL.into(),
        }
    }
}

/// Why a config file was refused. Each message names the file, and where it
/// can, the key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config file: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_CONFIG_BYTES`].
    #[error("{path}: config file is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: key `{key}`: {problem}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Dotted path of the offending key (`.` for the whole document).
        key: String,
        /// What is wrong, with the line and column.
        problem: String,
    },
    /// A value parsed but is not acceptable.
    #[error("{path}: key `{key}`: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The offending key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl Config {
    /// Loads `path`. When `explicit` is false (the default path was used) a
    /// missing file means all defaults; when true it is an error.
    ///
    /// # Errors
    /// See [`ConfigError`].
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default())
            }
            Err(e) => return Err(read_err(e)),
        };
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        let config = Config::parse(&text).map_err(|(key, problem)| ConfigError::Parse {
            path: path.to_owned(),
            key,
            problem,
        })?;
        config
            .validate()
            .map_err(|(key, problem)| ConfigError::Invalid {
                path: path.to_owned(),
                key,
                problem,
            })?;
        Ok(config)
    }

    /// Parses TOML text, returning `(key, problem)` on failure.
    fn parse(text: &str) -> Result<Config, (String, String)> {
        let de = toml::de::Deserializer::parse(text)
            .map_err(|e| (".".to_owned(), one_line(&e.to_string())))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            (key, one_line(&e.into_inner().to_string()))
        })
    }

    /// Checks values that parse but make no sense.
    ///
    /// # Errors
    /// `(key, problem)` for the first bad value.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.version != CONFIG_VERSION {
            return Err((
                "version",
                format!(
                    "unsupported version {}; this build reads version {CONFIG_VERSION}",
                    self.version
                ),
            ));
        }
        for (key, p) in [("root", &self.root), ("address", &self.address)] {
            if !p.is_absolute() {
                return Err((key, format!("{} is not an absolute path", p.display())));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err((
                "log_level",
                format!("{:?} is not a log level or filter: {e}", self.log_level),
            ));
        }
        Ok(())
    }
}

/// toml's messages span several lines (with a source excerpt); keep the
/// location and the problem on one line for logs and the terminal.
fn one_line(msg: &str) -> String {
    msg.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with('|')
                && !l.chars().next().is_some_and(|c| c.is_ascii_digit())
        })
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        fs::write(&p, text).unwrap();
        Config::load(&p, true)
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(load_text("").unwrap(), Config::default());
    }

    #[test]
    fn missing_default_file_is_defaults_but_missing_explicit_file_is_an_error() {
        let p = Path::new("/nonexistent/shoal/config.toml");
        assert_eq!(Config::load(p, false).unwrap(), Config::default());
        assert!(matches!(
            Config::load(p, true),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn errors_name_the_key_and_problem() {
        let e = load_text("version = 1\nlog_level = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("key `log_level`") && e.contains("invalid type"),
            "{e}"
        );
        let e = load_text("roots = \"/x\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `roots`"), "{e}");
        let e = load_text("version = 7\n").unwrap_err().to_string();
        assert!(
            e.contains("key `version`") && e.contains("unsupported version 7"),
            "{e}"
        );
        let e = load_text("root = \"relative\"\n").unwrap_err().to_string();
        assert!(e.contains("key `root`"), "{e}");
        let e = load_text("root = [\n").unwrap_err().to_string();
        assert!(e.contains("config.toml"), "{e}");
        let e = load_text("log_level = \"info,[\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `log_level`"), "{e}");
    }
}
