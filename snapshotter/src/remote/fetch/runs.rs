//! Cutting led chunks into requests ([`runs`]) and putting a streamed
//! range back together ([`extend_contiguous`]).

use bytes::Bytes;

use super::{Route, MAX_MERGED_BYTES};
use crate::remote::toc::Chunk;

/// Appends the part of `piece` (blob offset, bytes) that continues `buf`,
/// which holds the blob's bytes from offset `base`: a retried request sends
/// its range again from the start, and what is already in is skipped.
/// Returns whether `buf` grew.
pub(crate) fn extend_contiguous(buf: &mut Vec<u8>, base: u64, (pos, piece): (u64, Bytes)) -> bool {
    let have_end = base + buf.len() as u64;
    let piece_end = pos + piece.len() as u64;
    if pos <= have_end && piece_end > have_end {
        buf.extend_from_slice(&piece[(have_end - pos) as usize..]);
        return true;
    }
    false
}

/// Splits `leads` (indices into `chunks`, ascending) into runs of chunks that
/// are adjacent in the blob and go to the same route (`routes`, one per
/// lead), each at most [`MAX_MERGED_BYTES`] long.
pub(super) fn runs<T>(
    chunks: &[Chunk],
    leads: &[(usize, T)],
    routes: &[Route],
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for k in 1..=leads.len() {
        let split = k == leads.len() || {
            let prev = &chunks[leads[k - 1].0];
            let cur = &chunks[leads[k].0];
            let first = &chunks[leads[start].0];
            prev.blob_end != cur.blob_offset
                || cur.blob_end - first.blob_offset > MAX_MERGED_BYTES
                || routes[k] != routes[k - 1]
        };
        if split {
            out.push(start..k);
            start = k;
        }
    }
    out
}
