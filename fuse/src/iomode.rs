//! Per-inode I/O mode: kernel passthrough to a backing file, or the FUSE
//! page cache fed by [`crate::ChunkSource::read`].
//!
//! The kernel refuses to mix modes on one inode: while any open of it is in
//! one mode, an open answered in the other fails with `EIO` (Linux 6.9+
//! `fs/fuse/iomode.c`). So an inode's mode is decided at its first open, and
//! changes only from page cache to passthrough, and only when no open of it
//! is alive: this process counts opens and `release`s (the kernel sends one
//! `release` per open, after it has dropped that open's I/O mode, and only
//! once the last descriptor and memory mapping are gone). A process that
//! resumed a mount ([`crate::attach`]) cannot know the opens made before it,
//! so there no inode ever changes mode. Decisions are appended to a small
//! log next to the mount (one `write(2)` per decision; it survives a
//! `kill -9` in the page cache; a later line wins), and a resumed mount reads
//! it back.
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

/// How an inode is opened.
#[derive(Debug)]
enum Mode {
    Cached,
    /// `None`: decided by an earlier process; its backing id is re-made on
    /// the next open.
    Passthrough(Option<Arc<BackingId>>),
}

/// An inode's mode and the opens of it this process answered and has not
/// seen released.
#[derive(Debug)]
struct Slot {
    mode: Mode,
    open: u32,
}

impl Slot {
    fn new(mode: Mode) -> Slot {
        Slot { mode, open: 0 }
    }
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
    /// This process answered every open of this mount (a fresh mount), so
    /// its open counts are the kernel's.
    complete: bool,
    table: Mutex<HashMap<u64, Slot>>,
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
            complete: true,
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
                        table.insert(ino, Slot::new(Mode::Cached));
                    }
                    (Some("P"), Some(ino)) => {
                        table.insert(ino, Slot::new(Mode::Passthrough(None)));
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
            complete: false,
            table: Mutex::new(table),
            log: Mutex::new(log),
        }
    }

    /// Whether to ask the kernel for passthrough at INIT.
    pub(crate) fn wanted(&self) -> bool {
        self.wanted
    }

    /// Whether INIT negotiated passthrough (and the log still takes lines).
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
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
                // A restart could not trust the log: no new passthrough.
                self.enabled.store(false, Ordering::Relaxed);
                tracing::warn!(cause = %e, "cannot append to the I/O mode log; no more passthrough on this mount");
            }
        }
    }

    /// The mode for an open of `ino`, counted as alive until
    /// [`IoModes::released`]. `backing` supplies the backing file and
    /// registers it with the kernel; it is called only when the inode may
    /// take passthrough now: never opened on this mount, cached with every
    /// open released (fresh mounts only: see the module doc), or passthrough
    /// chosen by an earlier process.
    pub(crate) fn decide(
        &self,
        ino: u64,
        backing: impl FnOnce() -> Option<io::Result<BackingId>>,
    ) -> Decision {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let enabled = self.enabled.load(Ordering::Relaxed);
        let try_backing = |backing: Box<dyn FnOnce() -> Option<io::Result<BackingId>> + '_>| {
            match backing() {
                Some(Ok(id)) => Some(Arc::new(id)),
                Some(Err(e)) => {
                    tracing::warn!(ino, cause = %e, "cannot register a backing file; serving through the page cache");
                    None
                }
                None => None,
            }
        };
        let Some(slot) = table.get_mut(&ino) else {
            // Never opened on this mount (the log has every decision).
            let id = if enabled {
                try_backing(Box::new(backing))
            } else {
                None
            };
            let (line, mode, decision) = match id {
                Some(id) => (
                    "P",
                    Mode::Passthrough(Some(id.clone())),
                    Decision::Passthrough(id),
                ),
                None => ("C", Mode::Cached, Decision::Cached),
            };
            self.append(&format!("{line} {ino}\n"));
            table.insert(ino, Slot { mode, open: 1 });
            return decision;
        };
        slot.open += 1;
        match &slot.mode {
            Mode::Passthrough(Some(id)) => Decision::Passthrough(id.clone()),
            Mode::Passthrough(None) => match try_backing(Box::new(backing)) {
                Some(id) => {
                    slot.mode = Mode::Passthrough(Some(id.clone()));
                    Decision::Passthrough(id)
                }
                None => {
                    tracing::error!(ino, "backing file of a passthrough inode is gone; answering cached (fails with EIO while an earlier open is alive)");
                    Decision::Cached
                }
            },
            // Every earlier open released, all seen by this process.
            Mode::Cached if enabled && self.complete && slot.open == 1 => {
                match try_backing(Box::new(backing)) {
                    Some(id) => {
                        self.append(&format!("P {ino}\n"));
                        slot.mode = Mode::Passthrough(Some(id.clone()));
                        Decision::Passthrough(id)
                    }
                    None => Decision::Cached,
                }
            }
            Mode::Cached => Decision::Cached,
        }
    }

    /// One open of `ino` was released (the kernel has dropped its mode).
    pub(crate) fn released(&self, ino: u64) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = table.get_mut(&ino) {
            slot.open = slot.open.saturating_sub(1);
        }
    }

    /// Inodes in passthrough mode decided by an earlier process.
    pub(crate) fn pending_passthrough(&self) -> Vec<u64> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table
            .iter()
            .filter_map(|(ino, s)| matches!(s.mode, Mode::Passthrough(None)).then_some(*ino))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_change_only_with_no_open_alive_and_a_resumed_mount_never_changes_them() {
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
        // No backing file yet: cached.
        assert!(matches!(m.decide(7, || None), Decision::Cached));
        // While that open is alive, the inode is not offered passthrough.
        assert!(matches!(
            m.decide(7, || panic!("open alive")),
            Decision::Cached
        ));
        m.released(7);
        assert!(matches!(
            m.decide(7, || panic!("open alive")),
            Decision::Cached
        ));
        m.released(7);
        m.released(7);
        // Every open released: passthrough may start (no backing yet here).
        let mut asked = false;
        assert!(matches!(
            m.decide(7, || {
                asked = true;
                None
            }),
            Decision::Cached
        ));
        assert!(asked);
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
        // Opens of the earlier process are unknown: cached stays cached.
        assert!(matches!(
            r.decide(7, || panic!("decided")),
            Decision::Cached
        ));
        r.released(7);
        r.released(7);
        assert!(matches!(
            r.decide(7, || panic!("decided")),
            Decision::Cached
        ));
        assert!(r.pending_passthrough().is_empty());
        // An inode the log never mentions was never answered: free to decide.
        let mut asked = false;
        r.decide(9, || {
            asked = true;
            None
        });
        assert!(asked);
        // No log at all: a resumed mount never offers passthrough.
        let r = IoModes::resumed(Some(&dir.path().join("missing")));
        assert!(!r.wanted());
        assert!(matches!(
            r.decide(1, || panic!("not asked")),
            Decision::Cached
        ));
    }
}
