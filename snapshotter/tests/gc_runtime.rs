//! GC's database work runs off the async runtime: while another writer
//! holds the database (redb has one writer at a time), a GC run waits on the
//! blocking pool and a runtime with a single thread still runs its other
//! tasks.

use std::sync::Arc;
use std::time::Duration;

use shoal::metadata::RemoteRef;
use shoal::remote::cache::Cache;
use shoal::remote::fetch::{BoxFuture, RangeSource};
use shoal::remote::layers::Blobs;
use shoal::remote::store::ChunkStore;
use shoal::remote::tocs::KeptTocs;

/// No layer is mounted, so GC asks nothing of the registry.
struct NoBlobs;

impl Blobs for NoBlobs {
    fn source(&self, _: &RemoteRef) -> Arc<dyn RangeSource> {
        unreachable!("no layer is mounted")
    }
    fn size<'a>(&'a self, _: &'a RemoteRef) -> BoxFuture<'a, Result<u64, String>> {
        Box::pin(async { Err("no registry".to_owned()) })
    }
}

#[test]
fn a_gc_waiting_for_the_database_does_not_stall_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(redb::Database::create(dir.path().join("m.redb")).unwrap());
    let store = Arc::new(ChunkStore::open(&dir.path().join("chunks"), 0).unwrap());
    store.attach_index(db.clone()).unwrap();
    let tocs = Arc::new(KeptTocs::new(dir.path().join("tocs")).unwrap());
    let cache = Arc::new(Cache::new(store, Arc::new(NoBlobs), tocs));

    // Another writer holds the database until told to let go.
    let (held_tx, held) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let txn = db.begin_write().unwrap();
        held_tx.send(()).unwrap();
        let _ = release_rx.recv();
        txn.abort().unwrap();
    });
    held.recv().unwrap();

    let (alive_tx, alive) = std::sync::mpsc::channel();
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let gc = tokio::spawn(async move { cache.gc(false, "test").await });
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = alive_tx.send(gc.is_finished());
            let _ = done_tx.send(gc.await.unwrap());
        });
    });
    let alive = alive.recv_timeout(Duration::from_secs(5));
    release.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(
        alive,
        Ok(false),
        "the runtime must run other tasks while GC waits for the database"
    );
    let report = done.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(!report.dry_run);
    assert_eq!(report.evicted_chunks, 0);
}
