//! The snapshotter's error type and its one mapping onto gRPC status codes.
//!
//! containerd's proxy client turns gRPC codes back into `errdefs` errors, and
//! its unpacker and garbage collector branch on them, so each domain error
//! must reach containerd as the code containerd's own snapshotters return:
//! NotFound, AlreadyExists, FailedPrecondition or InvalidArgument. Anything
//! else is an internal error.

use std::io;

/// Errors from snapshot operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The named snapshot (or parent) does not exist.
    #[error("{0}: not found")]
    NotFound(String),
    /// A snapshot with that key or name already exists.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The snapshot is in the wrong state for the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request itself is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The metadata store failed.
    #[error("metadata store: {0}")]
    Store(#[from] redb::Error),
    /// A stored record could not be decoded.
    #[error("metadata record for {key:?} is corrupt: {cause}")]
    Corrupt {
        /// Snapshot key of the record.
        key: String,
        /// Decoding error (in the message, not `source()`, so that error
        /// chains print it once).
        cause: serde_json::Error,
    },
    /// A remote layer could not be mounted.
    #[error("remote layer: {0}")]
    Remote(String),
    /// A filesystem operation failed.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error (in the message, not `source()`).
        cause: io::Error,
    },
}

/// Result alias for snapshot operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, cause: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            cause,
        }
    }
}

macro_rules! store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(e.into())
            }
        }
    )*};
}
store_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::Store(_) | Error::Corrupt { .. } | Error::Io { .. } | Error::Remote(_) => {
                tonic::Status::internal(msg)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_errors_keep_their_grpc_codes() {
        let cases = [
            (Error::NotFound("a".into()), tonic::Code::NotFound),
            (Error::AlreadyExists("a".into()), tonic::Code::AlreadyExists),
            (
                Error::FailedPrecondition("a".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                Error::InvalidArgument("a".into()),
                tonic::Code::InvalidArgument,
            ),
            (
                Error::io("x", io::Error::other("boom")),
                tonic::Code::Internal,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(tonic::Status::from(err).code(), code);
        }
    }
}
