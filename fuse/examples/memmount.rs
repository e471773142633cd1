//! Experiment: mount one in-memory file of N MiB and wait (Ctrl-C / kill).
use std::sync::Arc;
use shoal_fuse::test_util::MemSource;
use shoal_fuse::{Entry, EntryKind, MountOptions, Tree};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mp = std::path::PathBuf::from(&args[1]);
    let mib: usize = args[2].parse().unwrap();
    let bytes: Vec<u8> = (0..mib << 20).map(|i| (i * 7 % 251) as u8).collect();
    let mut src = MemSource::new();
    src.insert(1, bytes);
    let entries = vec![
        Entry { path: "./".into(), kind: EntryKind::Dir, mode: 0o755, ..Entry::default() },
        Entry { path: "big.bin".into(), kind: EntryKind::File, mode: 0o644, size: (mib << 20) as u64, data_id: 1, ..Entry::default() },
    ];
    let tree = Tree::build(entries).unwrap();
    struct Pt(MemSource, Option<String>);
    impl shoal_fuse::ChunkSource for Pt {
        fn read(&self, d: u64, fs: u64, o: u64, s: u32, r: shoal_fuse::ReadReply) { self.0.read(d, fs, o, s, r) }
        fn backing(&self, _d: u64) -> Option<std::os::fd::OwnedFd> {
            self.1.as_ref().map(|p| std::fs::File::open(p).unwrap().into())
        }
    }
    let opts = MountOptions { passthrough: args.len() > 3, iomode_log: Some("/tmp/lead/iomodes".into()), ..MountOptions::default() };
    let m = shoal_fuse::mount(tree, Arc::new(Pt(src, args.get(3).cloned())), &mp, opts).unwrap();
    eprintln!("mounted");
    std::thread::sleep(std::time::Duration::from_secs(3600));
    drop(m);
}
