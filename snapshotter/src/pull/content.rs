//! Writing a blob into containerd's content store: the `Content.Write`
//! stream (stat, write at offset, commit with the expected digest and size),
//! as containerd's own `remoteWriter` drives it.
//!
//! Invariants:
//! - Opening the writer with the expected digest is also the existence
//!   check: containerd answers AlreadyExists for content it has, and first
//!   adds that content to the request's lease, so GC cannot take it while
//!   the pull runs.
//! - Writes are checked against the server's offset after every message;
//!   an interrupted earlier write of the same ref is resumed from the
//!   server's offset rather than duplicated.
//! - containerd verifies digest and size on commit; nothing unverified is
//!   ever committed.

use std::collections::HashMap;
use std::future::Future;

use bytes::Bytes;
use containerd_client::services::v1::{
    AbortRequest, WriteAction, WriteContentRequest, WriteContentResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use super::containerd::Session;
use super::PullError;

/// Largest data message sent to containerd (its default gRPC receive limit
/// is 16 MiB).
pub const WRITE_MESSAGE: usize = 1 << 20;

/// What [`write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The content was already there (now leased); nothing was fetched.
    Existed,
    /// Committed; `fetched` bytes were asked of the source.
    Committed {
        /// Bytes fetched (less than the size when resuming).
        fetched: u64,
    },
}

/// The blob to write.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Ingest ref (`layer-sha256:...`), shared by concurrent writers of the
    /// same blob so containerd serialises them.
    pub ref_key: &'a str,
    /// Expected digest.
    pub digest: &'a str,
    /// Expected size.
    pub size: u64,
}

struct Stream {
    tx: mpsc::Sender<WriteContentRequest>,
    rx: Streaming<WriteContentResponse>,
    what: String,
}

fn err(what: &str, s: Status) -> PullError {
    PullError::Containerd {
        op: format!("write content {what}"),
        code: s.code(),
        message: s.message().to_string(),
    }
}

impl Stream {
    async fn round(&mut self, req: WriteContentRequest) -> Result<WriteContentResponse, Status> {
        if self.tx.send(req).await.is_err() {
            // The request stream is gone: the server ended the call; its
            // status is on the response stream.
            return match self.rx.message().await {
                Err(s) => Err(s),
                _ => Err(Status::unknown("content write stream closed")),
            };
        }
        match self.rx.message().await? {
            Some(r) => Ok(r),
            None => Err(Status::unknown("content write stream ended early")),
        }
    }

    async fn finish(self) {
        let Stream { tx, mut rx, .. } = self;
        drop(tx);
        // Let the server end the call cleanly; its answer no longer matters.
        while let Ok(Some(_)) = rx.message().await {}
    }
}

/// Writes `target` into the content store with `labels`, getting its bytes
/// from `fetch(offset)` (any non-empty chunk starting at `offset`). The next
/// chunk is fetched while the current one is being written.
///
/// # Errors
/// containerd refused (including a digest or size mismatch on commit), or
/// `fetch` failed.
pub async fn write<F, Fut>(
    session: &Session,
    target: Target<'_>,
    labels: HashMap<String, String>,
    mut fetch: F,
) -> Result<Written, PullError>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<Bytes, PullError>>,
{
    let what = target.digest.to_string();
    let (tx, rx) = mpsc::channel(2);
    let open = WriteContentRequest {
        action: WriteAction::Stat as i32,
        r#ref: target.ref_key.to_string(),
        total: target.size as i64,
        expected: target.digest.to_string(),
        ..Default::default()
    };
    // Queued before the call: containerd answers (and sends headers) only
    // once it has the first message.
    tx.send(open)
        .await
        .map_err(|_| PullError::Internal("content write channel closed".into()))?;
    let rx = match session
        .content()
        .write(session.request(ReceiverStream::new(rx)))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == Code::AlreadyExists => return Ok(Written::Existed),
        Err(s) => return Err(err(&what, s)),
    };
    let mut stream = Stream { tx, rx, what };
    let status = match stream.rx.message().await {
        Ok(Some(r)) => r,
        Ok(None) => return Err(err(&stream.what, Status::unknown("no answer to stat"))),
        Err(s) if s.code() == Code::AlreadyExists => return Ok(Written::Existed),
        Err(s) => return Err(err(&stream.what, s)),
    };
    let result = write_from(&mut stream, target, status.offset, labels, &mut fetch).await;
    stream.finish().await;
    if let Err(PullError::Containerd {
        code: Code::FailedPrecondition | Code::InvalidArgument,
        ..
    }) = &result
    {
        // Commit refused the bytes (digest or size): drop the ingest so the
        // next attempt starts from zero instead of resuming bad data.
        let _ = session
            .content()
            .abort(session.request(AbortRequest {
                r#ref: target.ref_key.to_string(),
            }))
            .await;
    }
    result
}

async fn write_from<F, Fut>(
    stream: &mut Stream,
    target: Target<'_>,
    resume_at: i64,
    labels: HashMap<String, String>,
    fetch: &mut F,
) -> Result<Written, PullError>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<Bytes, PullError>>,
{
    let size = target.size;
    // A stale ingest longer than the blob cannot be resumed: start over.
    let mut offset = if resume_at > 0 && (resume_at as u64) <= size {
        resume_at as u64
    } else {
        0
    };
    let start = offset;
    let mut pending = if offset < size {
        Some(fetch(offset).await?)
    } else {
        None
    };
    while let Some(data) = pending.take() {
        if data.is_empty() {
            return Err(PullError::Internal(format!(
                "{}: source returned no bytes at offset {offset}",
                stream.what
            )));
        }
        let end = offset + data.len() as u64;
        if end > size {
            return Err(PullError::Internal(format!(
                "{}: source returned {} bytes past the size {size}",
                stream.what,
                end - size
            )));
        }
        let send = async {
            let mut at = offset;
            for piece in data.chunks(WRITE_MESSAGE) {
                let r = stream
                    .round(WriteContentRequest {
                        action: WriteAction::Write as i32,
                        offset: at as i64,
                        data: piece.to_vec(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| err(&stream.what, s))?;
                let want = at + piece.len() as u64;
                if r.offset as u64 != want {
                    return Err(PullError::Internal(format!(
                        "{}: containerd is at offset {} after writing up to {want}",
                        stream.what, r.offset
                    )));
                }
                at = want;
            }
            Ok(())
        };
        if end < size {
            let (sent, next) = tokio::join!(send, fetch(end));
            sent?;
            pending = Some(next?);
        } else {
            send.await?;
        }
        offset = end;
    }
    let r = stream
        .round(WriteContentRequest {
            action: WriteAction::Commit as i32,
            total: size as i64,
            offset: offset as i64,
            expected: target.digest.to_string(),
            labels,
            ..Default::default()
        })
        .await;
    match r {
        Ok(r) => {
            if r.digest != target.digest || r.offset as u64 != size {
                return Err(PullError::Internal(format!(
                    "{}: containerd committed {} ({} bytes)",
                    stream.what, r.digest, r.offset
                )));
            }
        }
        // Another writer committed it first.
        Err(s) if s.code() == Code::AlreadyExists => {}
        Err(s) => return Err(err(&stream.what, s)),
    }
    Ok(Written::Committed {
        fetched: offset - start,
    })
}
