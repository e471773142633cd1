//! Test doubles for [`ChunkSource`] (feature `test-util`).
//!
//! [`MemSource`] serves file bytes from memory and can be told, per
//! `data_id`, to fail, panic, answer a wrong length, or answer later from
//! another thread. It is the contract the snapshotter implements, in small.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{ChunkSource, ReadReply};

/// How [`MemSource`] answers reads of one `data_id`.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Answer from memory on the calling thread.
    Serve,
    /// Answer with this errno.
    Fail(i32),
    /// Panic inside `read`.
    Panic,
    /// Answer one byte short (the filesystem must turn this into EIO).
    Short,
    /// Answer from a new thread after this delay.
    Delay(Duration),
    /// Serve by passthrough from this file ([`ChunkSource::backing`]);
    /// `read` answers from memory as [`Behaviour::Serve`].
    Backing(std::path::PathBuf),
    /// Panic inside [`ChunkSource::backing`], i.e. in the `open` handler.
    PanicOnOpen,
    /// As [`Behaviour::Backing`], but [`ChunkSource::prepare_backing`]
    /// answers the open from another thread once the gate is opened (a slow
    /// first check of the file).
    SlowBacking(std::path::PathBuf, Arc<Gate>),
}

/// A gate that threads wait at until it is opened.
#[derive(Debug, Default)]
pub struct Gate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    /// Threads that have arrived at the gate.
    pub arrived: AtomicU64,
}

impl Gate {
    /// Lets every waiting (and later) thread through.
    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn pass(&self) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }
}

/// An in-memory [`ChunkSource`].
#[derive(Debug, Default)]
pub struct MemSource {
    files: HashMap<u64, (Arc<[u8]>, Behaviour)>,
    reads: AtomicU64,
}

impl MemSource {
    pub fn new() -> MemSource {
        MemSource::default()
    }

    /// Serves `bytes` for `data_id`.
    pub fn insert(&mut self, data_id: u64, bytes: impl Into<Arc<[u8]>>) -> &mut Self {
        self.files.insert(data_id, (bytes.into(), Behaviour::Serve));
        self
    }

    /// Serves `bytes` for `data_id` with the given behaviour.
    pub fn insert_with(
        &mut self,
        data_id: u64,
        bytes: impl Into<Arc<[u8]>>,
        behaviour: Behaviour,
    ) -> &mut Self {
        self.files.insert(data_id, (bytes.into(), behaviour));
        self
    }

    /// Number of `read` calls so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }
}

fn slice(bytes: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let end = start.saturating_add(size as usize).min(bytes.len());
    &bytes[start..end]
}

impl ChunkSource for MemSource {
    fn read(&self, data_id: u64, _file_size: u64, offset: u64, size: u32, reply: ReadReply) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let Some((bytes, behaviour)) = self.files.get(&data_id) else {
            return reply.error(libc::EIO);
        };
        match behaviour {
            Behaviour::Serve
            | Behaviour::Backing(_)
            | Behaviour::SlowBacking(..)
            | Behaviour::PanicOnOpen => reply.data(slice(bytes, offset, size)),
            Behaviour::Fail(errno) => reply.error(*errno),
            Behaviour::Panic => panic!("MemSource told to panic for data_id {data_id}"),
            Behaviour::Short => {
                let s = slice(bytes, offset, size);
                reply.data(&s[..s.len().saturating_sub(1)]);
            }
            Behaviour::Delay(d) => {
                let (bytes, d) = (bytes.clone(), *d);
                std::thread::spawn(move || {
                    std::thread::sleep(d);
                    reply.data(slice(&bytes, offset, size));
                });
            }
        }
    }

    fn backing(&self, data_id: u64) -> Option<std::os::fd::OwnedFd> {
        match self.files.get(&data_id) {
            Some((_, Behaviour::Backing(path) | Behaviour::SlowBacking(path, _))) => {
                std::fs::File::open(path).ok().map(Into::into)
            }
            Some((_, Behaviour::PanicOnOpen)) => {
                panic!("MemSource told to panic opening data_id {data_id}")
            }
            _ => None,
        }
    }

    fn prepare_backing(&self, data_id: u64, answer: Box<dyn FnOnce() + Send>) {
        match self.files.get(&data_id) {
            Some((_, Behaviour::SlowBacking(_, gate))) => {
                let gate = gate.clone();
                std::thread::spawn(move || {
                    gate.pass();
                    answer();
                });
            }
            _ => answer(),
        }
    }
}
