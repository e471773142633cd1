//! [`Blobs`] backed by the registry client: layer bytes by HTTP Range
//! requests to the registry (through its mirrors, auth and redirects).
//! A layer whose host an image annotation chose is fetched with no
//! credentials ([`RemoteRef::anonymous`]).

use std::sync::Arc;

use bytes::Bytes;

use super::source::{BoxFuture, RangeSource, Sink, SourceError};
use crate::metadata::RemoteRef;
use crate::registry::{Reference, Registry};
use crate::remote::layers::Blobs;

/// Layer blobs from registries.
pub struct RegistryBlobs {
    registry: Registry,
}

impl RegistryBlobs {
    /// Blobs fetched through `registry`.
    pub fn new(registry: Registry) -> Self {
        RegistryBlobs { registry }
    }
}

struct BlobSource {
    registry: Registry,
    reference: Result<Reference, String>,
    digest: String,
}

impl BlobSource {
    fn reference(&self) -> Result<&Reference, SourceError> {
        self.reference
            .as_ref()
            .map_err(|e| SourceError::Fatal(e.clone()))
    }
}

impl RangeSource for BlobSource {
    fn fetch(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            let reference = self.reference()?;
            Ok(self
                .registry
                .fetch_range(reference, &self.digest, offset, len)
                .await?)
        })
    }

    fn fetch_streamed(
        &self,
        offset: u64,
        len: u64,
        sink: Sink,
    ) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            let reference = self.reference()?;
            Ok(self
                .registry
                .fetch_range_streamed(reference, &self.digest, offset, len, Some(&sink))
                .await?)
        })
    }

    fn name(&self) -> &str {
        "registry"
    }
}

fn reference(r: &RemoteRef) -> Result<Reference, String> {
    r.image_ref
        .parse::<Reference>()
        .map_err(|e| format!("image reference {:?}: {e}", r.image_ref))
}

impl RegistryBlobs {
    fn client(&self, r: &RemoteRef) -> Registry {
        if r.anonymous {
            self.registry.anonymous()
        } else {
            self.registry.clone()
        }
    }
}

impl Blobs for RegistryBlobs {
    fn source(&self, r: &RemoteRef) -> Arc<dyn RangeSource> {
        Arc::new(BlobSource {
            registry: self.client(r),
            reference: reference(r),
            digest: r.layer_digest.clone(),
        })
    }

    fn size<'a>(&'a self, r: &'a RemoteRef) -> BoxFuture<'a, Result<u64, String>> {
        Box::pin(async move {
            let reference = reference(r)?;
            self.client(r)
                .blob_size(&reference, &r.layer_digest)
                .await
                .map_err(|e| e.to_string())
        })
    }
}
