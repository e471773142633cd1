//! Per-inode I/O mode: kernel passthrough to a backing file, or the FUSE
//! page cache fed by [`crate::ChunkSource::read`].
//!
//! The kernel refuses to mix modes on one inode: while any open of it is in
//! one mode, an open answered in the other fails with `EIO` (Linux 6.9+
//! `fs/fuse/iomode.c`). The daemon cannot see when the kernel drops its last
//! reference after a restart, so the rule here is simple and safe: an inode's
//! mode is decided at its first open on this mount and never changes for the
//! mount's life, even across a daemon restart. Decisions are appended to a
//! small log next to the mount (one `write(2)` per first open; it survives a
//! `kill -9` in the page cache), and a resumed mount ([`crate::attach`]) reads
//! it back. A file first opened before it was all local thus stays on the
//! page-cache path until the layer is mounted again.
//!
//! The table's lock is held across `backing` so two first opens of one inode
//! agree; a panic in there (caught by the worker loop, answered `EIO`) leaves
//! the inode undecided and the lock usable (poisoning is ignored: the table
//! is only ever changed by single inserts).
//!
//! Backing ids are kept for the mount's life: the kernel looks an id up after
//! our reply, so closing it right after answering the open could fail it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuser::BackingId;

const HEADER_ON: &str = "passthrough 1\n";

/// How an inode is opened for this mount's life.
#[derive(Debug)]
enum Mode {
    Cached,
    /// `None`: decided by an earlier process; its backing id is re-made on
    /// the next open.
    Passthrough(Option<Arc<BackingId>>),
}

/// The answer for one open.
pub(crate) enum Decision {
    Cached,
    Passthrough(Arc<BackingId>),
}

/// The mode table of one mount.
#[derive(Debug)]
pub(crate) struct IoModes {
    /// Passthrough was negotiated at INIT (and the mount asked for it).
    enabled: AtomicBool,
    wanted: bool,
    table: Mutex<HashMap<u64, Mode>>,
    log: Mutex<Option<File>>,
}

impl IoModes {
    /// A fresh mount's table: an empty log at `path` (if any).
    pub(crate) fn fresh(wanted: bool, path: Option<&Path>) -> IoModes {
        let log = path.and_then(|p| {
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(p)
                .map_err(|e| tracing::warn!(path = %p.display(), cause = %e, "cannot write the I/O mode log; passthrough off"))
                .ok()
        });
        IoModes {
            enabled: AtomicBool::new(false),
            // Without a log a restart could not keep decisions: stay cached.
            wanted: wanted && log.is_some(),
            table: Mutex::new(HashMap::new()),
            log: Mutex::new(log),
        }
    }

    /// A resumed mount's table, read back from the log at `path`. Without a
    /// readable log every inode is answered cached (an earlier process may
    /// have answered passthrough: those opens then fail with `EIO`, which is
    /// logged).
    pub(crate) fn resumed(path: Option<&Path>) -> IoModes {
        let mut table = HashMap::new();
        let mut enabled = false;
        let text = path.map(std::fs::read_to_string);
        if let Some(Ok(text)) = &text {
            // Only whole lines: a last line without its newline was torn.
            for line in text.split_inclusive('\n') {
                let Some(line) = line.strip_suffix('\n') else {
                    break;
                };
                let mut it = line.split(' ');
                match (it.next(), it.next().and_then(|n| n.parse::<u64>().ok())) {
                    (Some("passthrough"), Some(1)) => enabled = true,
                    (Some("C"), Some(ino)) => {
                        table.insert(ino, Mode::Cached);
                    }
                    (Some("P"), Some(ino)) => {
                        table.insert(ino, Mode::Passthrough(None));
                    }
                    _ => {}
                }
            }
        } else if let Some(Err(e)) = &text {
            tracing::warn!(cause = %e, "no I/O mode log for a resumed mount; answering every open cached");
        }
        let log = path.and_then(|p| OpenOptions::new().append(true).open(p).ok());
        let wanted = enabled && log.is_some();
        IoModes {
            enabled: AtomicBool::new(wanted),
            wanted,
            table: Mutex::new(table),
            log: Mutex::new(log),
        }
    }

    /// Whether to ask the kernel for passthrough at INIT.
    pub(crate) fn wanted(&self) -> bool {
        self.wanted
    }

    /// Records what INIT negotiated.
    pub(crate) fn set_enabled(&self, on: bool) {
        let on = on && self.wanted;
        self.enabled.store(on, Ordering::Relaxed);
        if on {
            self.append(HEADER_ON);
        }
    }

    fn append(&self, line: &str) {
        if let Some(f) = self.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            if let Err(e) = f.write_all(line.as_bytes()) {
                tracing::warn!(cause = %e, "cannot append to the I/O mode log");
            }
        }
    }

    /// The mode for an open of `ino`. `backing` supplies the backing file
    /// and registers it with the kernel; it is called only when the inode has
    /// no mode yet (or an earlier process chose passthrough).
    pub(crate) fn decide(
        &self,
        ino: u64,
        backing: impl FnOnce() -> Option<io::Result<BackingId>>,
    ) -> Decision {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.get(&ino) {
            Some(Mode::Cached) => return Decision::Cached,
            Some(Mode::Passthrough(Some(id))) => return Decision::Passthrough(id.clone()),
            Some(Mode::Passthrough(None)) => {
                return match backing() {
                    Some(Ok(id)) => {
                        let id = Arc::new(id);
                        table.insert(ino, Mode::Passthrough(Some(id.clone())));
                        Decision::Passthrough(id)
                    }
                    other => {
                        tracing::error!(ino, cause = ?other.map(|r| r.map(drop)),
                            "backing file of a passthrough inode is gone; answering cached (fails with EIO while an earlier open is alive)");
                        Decision::Cached
                    }
                };
            }
            None => {}
        }
        let decision = if self.enabled.load(Ordering::Relaxed) {
            match backing() {
                Some(Ok(id)) => Some(Arc::new(id)),
                Some(Err(e)) => {
                    tracing::warn!(ino, cause = %e, "cannot register a backing file; serving through the page cache");
                    None
                }
                None => None,
            }
        } else {
            None
        };
        match decision {
            Some(id) => {
                self.append(&format!("P {ino}\n"));
                table.insert(ino, Mode::Passthrough(Some(id.clone())));
                Decision::Passthrough(id)
            }
            None => {
                self.append(&format!("C {ino}\n"));
                table.insert(ino, Mode::Cached);
                Decision::Cached
            }
        }
    }

    /// Inodes in passthrough mode decided by an earlier process.
    pub(crate) fn pending_passthrough(&self) -> Vec<u64> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table
            .iter()
            .filter_map(|(ino, m)| matches!(m, Mode::Passthrough(None)).then_some(*ino))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_fixed_and_a_resumed_mount_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("iomodes");
        let m = IoModes::fresh(true, Some(&log));
        assert!(m.wanted());
        // INIT did not grant passthrough: everything is cached.
        m.set_enabled(false);
        assert!(matches!(
            m.decide(5, || panic!("not asked")),
            Decision::Cached
        ));
        let m = IoModes::fresh(true, Some(&log));
        m.set_enabled(true);
        // No backing file yet: cached, and it stays cached even once one
        // exists (an open in the other mode may still be alive).
        assert!(matches!(m.decide(7, || None), Decision::Cached));
        assert!(matches!(
            m.decide(7, || panic!("decided")),
            Decision::Cached
        ));
        // A torn last line (a crash mid-append) is ignored on resume.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"P 9")
            .unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text, "passthrough 1\nC 7\nP 9");
        let r = IoModes::resumed(Some(&log));
        assert!(r.wanted());
        assert!(matches!(
            r.decide(7, || panic!("decided")),
            Decision::Cached
        ));
        assert!(r.pending_passthrough().is_empty());
        // No log at all: a resumed mount never offers passthrough.
        let r = IoModes::resumed(Some(&dir.path().join("missing")));
        assert!(!r.wanted());
        assert!(matches!(
            r.decide(1, || panic!("not asked")),
            Decision::Cached
        ));
    }
}
