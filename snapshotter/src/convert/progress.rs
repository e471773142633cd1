//! Progress display on stderr: one line per step; on a terminal, the line
//! of the running step is redrawn with its percentage.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Where progress goes.
#[derive(Clone, Debug)]
pub struct Progress {
    enabled: bool,
    tty: bool,
}

impl Progress {
    /// Progress on stderr (`quiet`: none).
    pub fn new(quiet: bool) -> Progress {
        Progress {
            enabled: !quiet,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Prints one line.
    pub fn note(&self, msg: &str) {
        if self.enabled {
            eprintln!("convert: {msg}");
        }
    }

    /// A step over `total` bytes.
    pub fn bar(&self, label: &str, total: u64) -> Bar {
        Bar {
            p: self.clone(),
            label: label.to_string(),
            total,
            started: Instant::now(),
            last_pct: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }
}

/// One step's progress; cheap to move into a blocking task.
pub struct Bar {
    p: Progress,
    label: String,
    total: u64,
    started: Instant,
    last_pct: Arc<AtomicU64>,
}

impl Bar {
    /// `n` of the step's bytes are done.
    pub fn set(&self, n: u64) {
        if !self.p.enabled || !self.p.tty {
            return;
        }
        let pct = (n.saturating_mul(100))
            .checked_div(self.total)
            .unwrap_or(100)
            .min(100);
        if self.last_pct.swap(pct, Ordering::Relaxed) != pct {
            eprint!("\r\x1b[Kconvert: {} {pct:>3}%", self.label);
            let _ = std::io::stderr().flush();
        }
    }

    /// The step finished.
    pub fn done(&self) {
        if !self.p.enabled {
            return;
        }
        let clear = if self.p.tty { "\r\x1b[K" } else { "" };
        eprintln!(
            "{clear}convert: {} done ({:.1} MiB, {:.1}s)",
            self.label,
            self.total as f64 / f64::from(1u32 << 20),
            self.started.elapsed().as_secs_f64()
        );
    }
}
