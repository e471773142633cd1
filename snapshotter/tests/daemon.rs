//! Integration tests against the real `shoal-snapshotter` binary on a temp
//! socket, driven through the same gRPC API containerd's proxy client uses.
//! Nothing here is mocked: each test starts, signals and kills real daemon
//! processes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use shoal::client::connect;
use shoal_proto::prost_types::FieldMask;
use shoal_proto::snapshots::snapshots_client::SnapshotsClient;
use shoal_proto::snapshots::{
    CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest, UpdateSnapshotRequest, ViewSnapshotRequest,
};
use tonic::transport::Channel;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_shoal-snapshotter");

/// One daemon process; killed on drop if still running.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn spawn(root: &Path, socket: &Path, log: &Path) -> Child {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Command::new(BIN)
            .args(["--root".as_ref(), root.as_os_str()])
            .args(["--address".as_ref(), socket.as_os_str()])
            .args(["--config".as_ref(), empty_config(root).as_os_str()])
            .args(["--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Starts a daemon and waits until it accepts connections.
    fn start(dir: &Path) -> Daemon {
        let (root, socket, log) = (dir.join("root"), dir.join("shoal.sock"), dir.join("log"));
        let mut child = Self::spawn(&root, &socket, &log);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "daemon exited with {st}: {}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not listen within 20s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon { child, socket, log }
    }

    async fn client(&self) -> SnapshotsClient<Channel> {
        connect(&self.socket).await.unwrap()
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn signal(&mut self, sig: nix::sys::signal::Signal) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
        wait_timeout(&mut self.child, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("daemon did not exit after {sig}: {}", self.log()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// An empty (all defaults) config file beside `root`, so a config in /etc on
/// the test machine cannot change the daemon under test.
fn empty_config(root: &Path) -> PathBuf {
    let p = root.with_extension("toml");
    std::fs::write(&p, "").unwrap();
    p
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn prepare(key: &str, parent: &str) -> PrepareSnapshotRequest {
    PrepareSnapshotRequest {
        snapshotter: "shoal".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    }
}

fn commit(name: &str, key: &str) -> CommitSnapshotRequest {
    CommitSnapshotRequest {
        snapshotter: "shoal".into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::from([("containerd.io/gc.root".into(), name.into())]),
    }
}

async fn stat(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<Info, tonic::Status> {
    let r = c
        .stat(StatSnapshotRequest {
            snapshotter: "shoal".into(),
            key: key.into(),
        })
        .await?;
    Ok(r.into_inner().info.unwrap())
}

async fn list(
    c: &mut SnapshotsClient<Channel>,
    filters: &[&str],
) -> Result<Vec<Info>, tonic::Status> {
    let mut stream = c
        .list(ListSnapshotsRequest {
            snapshotter: "shoal".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await? {
        out.extend(batch.info);
    }
    Ok(out)
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("expected an error").code()
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_reach_the_client_with_containerds_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut c = d.client().await;

    assert_eq!(code(stat(&mut c, "nope").await), Code::NotFound);
    assert_eq!(
        code(
            c.mounts(MountsRequest {
                snapshotter: "shoal".into(),
                key: "nope".into()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(c.prepare(prepare("x", "no-parent")).await),
        Code::NotFound
    );

    c.prepare(prepare("a", "")).await.unwrap();
    assert_eq!(code(c.prepare(prepare("a", "")).await), Code::AlreadyExists);
    // A parent must be committed.
    assert_eq!(
        code(c.prepare(prepare("b", "a")).await),
        Code::InvalidArgument
    );
    c.commit(commit("base", "a")).await.unwrap();
    assert_eq!(code(c.commit(commit("base2", "a")).await), Code::NotFound);

    c.view(ViewSnapshotRequest {
        snapshotter: "shoal".into(),
        key: "v".into(),
        parent: "base".into(),
        labels: HashMap::new(),
    })
    .await
    .unwrap();
    // Committing a view (not active) is a failed precondition.
    assert_eq!(
        code(c.commit(commit("vc", "v")).await),
        Code::FailedPrecondition
    );
    c.prepare(prepare("b", "base")).await.unwrap();
    assert_eq!(
        code(c.commit(commit("base", "b")).await),
        Code::AlreadyExists
    );
    // Removing a snapshot with children is a failed precondition.
    let rm = |k: &str| RemoveSnapshotRequest {
        snapshotter: "shoal".into(),
        key: k.into(),
    };
    assert_eq!(code(c.remove(rm("base")).await), Code::FailedPrecondition);
    assert_eq!(code(c.remove(rm("nope")).await), Code::NotFound);

    let mut info = stat(&mut c, "b").await.unwrap();
    info.parent = "other".into();
    let upd = |info: Info, paths: &[&str]| UpdateSnapshotRequest {
        snapshotter: "shoal".into(),
        info: Some(info),
        update_mask: Some(FieldMask {
            paths: paths.iter().map(|s| s.to_string()).collect(),
        }),
    };
    assert_eq!(
        code(c.update(upd(info.clone(), &["parent"])).await),
        Code::InvalidArgument
    );
    info.labels.insert("l".into(), "1".into());
    let got = c
        .update(upd(info, &["labels.l"]))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(got.labels.get("l").map(String::as_str), Some("1"));
    assert_eq!(got.parent, "base", "parent is immutable");

    assert_eq!(code(list(&mut c, &["kind=="]).await), Code::InvalidArgument);
    let names = |v: Vec<Info>| {
        let mut n: Vec<String> = v.into_iter().map(|i| i.name).collect();
        n.sort();
        n
    };
    assert_eq!(names(list(&mut c, &["kind==active"]).await.unwrap()), ["b"]);
    assert_eq!(
        names(list(&mut c, &["parent==base"]).await.unwrap()),
        ["b", "v"]
    );
    assert_eq!(
        names(
            list(&mut c, &["labels.\"containerd.io/gc.root\"==base"])
                .await
                .unwrap()
        ),
        ["base"]
    );
    assert_eq!(names(list(&mut c, &[]).await.unwrap()), ["b", "base", "v"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_and_sigint_shut_down_cleanly_and_keep_state() {
    let dir = tempfile::tempdir().unwrap();
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        let mut d = Daemon::start(dir.path());
        let mut c = d.client().await;
        let key = format!("k-{sig}");
        c.prepare(prepare(&key, "")).await.unwrap();
        let st = d.signal(sig);
        assert!(st.success(), "exit status {st} after {sig}: {}", d.log());
        assert!(!d.socket.exists(), "socket removed on clean shutdown");
        let d = Daemon::start(dir.path());
        let mut c = d.client().await;
        assert_eq!(stat(&mut c, &key).await.unwrap().kind, Kind::Active as i32);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_socket_is_never_taken_over_and_a_stale_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::start(dir.path());
    // Second daemon, other root, same socket: refused.
    let other = tempfile::tempdir().unwrap();
    let mut b = Daemon::spawn(
        &other.path().join("root"),
        &a.socket,
        &other.path().join("log"),
    );
    let st = wait_timeout(&mut b, Duration::from_secs(10)).expect("second daemon must exit");
    assert!(!st.success());
    let log = std::fs::read_to_string(other.path().join("log")).unwrap();
    assert!(log.contains("in use by another live process"), "{log}");
    // The first one still serves.
    let mut c = a.client().await;
    c.prepare(prepare("still-here", "")).await.unwrap();

    // Same root, other socket: refused by the root lock.
    let mut b = Daemon::spawn(
        &dir.path().join("root"),
        &other.path().join("s.sock"),
        &other.path().join("log2"),
    );
    let st = wait_timeout(&mut b, Duration::from_secs(10)).expect("second daemon must exit");
    assert!(!st.success());
    let log = std::fs::read_to_string(other.path().join("log2")).unwrap();
    assert!(
        log.contains("another shoal-snapshotter using this root"),
        "{log}"
    );

    // A stale socket (its listener is gone) is replaced.
    a.kill9();
    assert!(
        dir.path().join("shoal.sock").exists(),
        "kill -9 leaves the socket file"
    );
    let d = Daemon::start(dir.path());
    let mut c = d.client().await;
    assert_eq!(
        stat(&mut c, "still-here").await.unwrap().kind,
        Kind::Active as i32
    );
}

#[test]
fn a_malformed_config_exits_2_naming_file_key_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .args(["--root", dir.path().join("root").to_str().unwrap()])
            .args(["--address", dir.path().join("s.sock").to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    std::fs::write(&cfg, "version = 1\nlog_level = 7\n").unwrap();
    let (status, err) = run(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(status, Some(2), "{err}");
    assert!(
        err.contains(cfg.to_str().unwrap())
            && err.contains("log_level")
            && err.contains("invalid type"),
        "{err}"
    );

    std::fs::write(&cfg, "[unknown_section]\nx = 1\n").unwrap();
    let (status, err) = run(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("unknown field `unknown_section`"), "{err}");

    let missing = dir.path().join("missing.toml");
    let (status, err) = run(&["--config", missing.to_str().unwrap()]);
    assert_eq!(status, Some(2), "{err}");
    assert!(
        err.contains("missing.toml") && err.contains("cannot read"),
        "{err}"
    );
}

/// Cheap jitter without a PRNG dependency.
fn jitter_ms(max: u64) -> u64 {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    n % max
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_burst_of_prepare_and_commit_loses_no_committed_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    // Committed names whose Commit was acknowledged, in chain order.
    let mut acked: Vec<String> = Vec::new();
    // Active keys whose Prepare was acknowledged but whose Commit was not:
    // the commit may or may not have landed before the kill, so after a
    // restart either the key is active or the name is committed.
    let mut in_doubt: Vec<(String, String)> = Vec::new();
    for round in 0..6u32 {
        let d = Daemon::start(dir.path());
        let mut c = d.client().await;

        for (i, name) in acked.iter().enumerate() {
            let info = stat(&mut c, name)
                .await
                .unwrap_or_else(|e| panic!("round {round}: lost committed {name}: {e}"));
            assert_eq!(info.kind, Kind::Committed as i32, "{name}");
            let parent = if i == 0 {
                String::new()
            } else {
                acked[i - 1].clone()
            };
            assert_eq!(info.parent, parent, "{name}");
            assert_eq!(info.labels.get("containerd.io/gc.root"), Some(name));
        }
        let mut landed = 0;
        for (key, name) in &in_doubt {
            match (stat(&mut c, key).await, stat(&mut c, name).await) {
                (Ok(a), Err(_)) => assert_eq!(a.kind, Kind::Active as i32),
                (Err(_), Ok(b)) => {
                    assert_eq!(b.kind, Kind::Committed as i32);
                    landed += 1;
                }
                (a, b) => panic!("{key}/{name}: exactly one must exist: {a:?} {b:?}"),
            }
        }
        let committed = list(&mut c, &["kind==committed"]).await.unwrap();
        assert_eq!(
            committed.len(),
            acked.len() + landed,
            "List agrees with Stat"
        );
        // Every layer directory exists: a child of the tip mounts real paths.
        if let Some(tip) = acked.last() {
            let key = format!("probe-{round}");
            let m = c
                .prepare(prepare(&key, tip))
                .await
                .unwrap()
                .into_inner()
                .mounts;
            let opts = m[0].options.join(",");
            let lowers = opts
                .split("lowerdir=")
                .nth(1)
                .expect("overlay with lowerdir");
            assert_eq!(lowers.split(':').count(), acked.len());
            for lower in lowers.split(':') {
                assert!(Path::new(lower).is_dir(), "missing layer dir {lower}");
            }
            c.remove(RemoveSnapshotRequest {
                snapshotter: "shoal".into(),
                key,
            })
            .await
            .unwrap();
        }

        // A burst of Prepare/Commit in the background; kill -9 at a random
        // moment in it.
        let socket = d.socket.clone();
        let tip = acked.last().cloned().unwrap_or_default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let burst = tokio::spawn(async move {
            let mut c = connect(&socket).await.unwrap();
            let mut parent = tip;
            for i in 0.. {
                let (key, name) = (format!("active-{round}-{i}"), format!("layer-{round}-{i}"));
                if c.prepare(prepare(&key, &parent)).await.is_err() {
                    return;
                }
                let _ = tx.send((key.clone(), name.clone(), false));
                if c.commit(commit(&name, &key)).await.is_err() {
                    return;
                }
                let _ = tx.send((key, name.clone(), true));
                parent = name;
            }
        });
        tokio::time::sleep(Duration::from_millis(150 + jitter_ms(350))).await;
        d.kill9();
        let _ = burst.await;
        let mut pending = None;
        while let Ok((key, name, committed)) = rx.try_recv() {
            if committed {
                pending = None;
                acked.push(name);
            } else {
                pending = Some((key, name));
            }
        }
        in_doubt.extend(pending);
    }
    assert!(
        acked.len() >= 6,
        "the bursts made progress: {} commits",
        acked.len()
    );
}

/// A Prepare makes its directory durable before it is acknowledged: the new
/// directory is fsynced before its rename into place, and `snapshots/` after
/// it (a power cut otherwise can lose a snapshot whose record redb kept).
/// Observed with strace on the real daemon.
#[tokio::test(flavor = "multi_thread")]
async fn a_prepare_fsyncs_the_new_directory_and_snapshots_before_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (root, socket, log) = (
        dir.path().join("root"),
        dir.path().join("s.sock"),
        dir.path().join("log"),
    );
    let trace = dir.path().join("strace");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-y",
            "-e",
            "trace=fsync,rename,renameat,renameat2",
            "-o",
        ])
        .arg(&trace)
        .arg(BIN)
        .args(["--root".as_ref(), root.as_os_str()])
        .args(["--address".as_ref(), socket.as_os_str()])
        .args(["--config".as_ref(), empty_config(&root).as_os_str()])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("strace (scripts/deps.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(
            Instant::now() < deadline,
            "daemon did not listen within 30s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = connect(&socket).await.unwrap();
    c.prepare(prepare("durable", "")).await.unwrap();
    assert_eq!(list(&mut c, &[]).await.unwrap().len(), 1);
    // Stop the daemon itself (strace's child), so strace exits with it and
    // never leaves it running detached.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id())).unwrap();
    let daemon: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(
        wait_timeout(&mut child, Duration::from_secs(20)).is_some(),
        "daemon did not stop"
    );
    let text = std::fs::read_to_string(&trace).unwrap();
    let snapshots = root.canonicalize().unwrap().join("snapshots");
    let lines: Vec<&str> = text.lines().collect();
    // rename(".../snapshots/new-ID", ".../snapshots/ID")
    let (renamed, id) = lines
        .iter()
        .enumerate()
        .find_map(|(i, l)| {
            let rest = l.split("/snapshots/new-").nth(1)?.split('"').next()?;
            (l.contains("rename") && l.contains(&format!("/snapshots/{rest}\"")))
                .then(|| (i, rest.to_owned()))
        })
        .unwrap_or_else(|| panic!("no rename of snapshots/new-ID to ID in:\n{text}"));
    let synced_new = lines.iter().position(|l| {
        l.contains("fsync(") && l.contains(&format!("{}/new-{id}>", snapshots.display()))
    });
    let synced_parent = lines
        .iter()
        .skip(renamed)
        .any(|l| l.contains("fsync(") && l.contains(&format!("{}>", snapshots.display())));
    assert!(
        synced_new.is_some_and(|i| i < renamed),
        "new-{id} was not fsynced before its rename:\n{text}"
    );
    assert!(
        synced_parent,
        "snapshots/ was not fsynced after the rename:\n{text}"
    );
}
