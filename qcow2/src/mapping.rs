//! What a guest range of a whole chain is made of: the answer `qemu-img map` gives.

use crate::format::entry::CompressedDesc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data at `host` in layer `depth` (its data file, for images with one).
    Data { host: u64 },
    /// Part of a compressed cluster of layer `depth`.
    Compressed {
        desc: CompressedDesc,
        offset_in_cluster: u64,
    },
    /// Reads as zeros because layer `depth` says so (ZERO flag); `host` for ZERO_ALLOC.
    Zero { host: Option<u64> },
    /// Allocated nowhere (or past a backing file's end): reads as zeros.
    Unallocated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
    /// Index in the chain where the range was resolved (0 = top).
    pub depth: usize,
    pub kind: ExtentKind,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// Whether the range reads as zeros without looking at any data.
    pub fn reads_as_zero(&self) -> bool {
        matches!(self.kind, ExtentKind::Zero { .. } | ExtentKind::Unallocated)
    }

    /// Allocated in some layer (data, compressed or a zero flag).
    pub fn present(&self) -> bool {
        !matches!(self.kind, ExtentKind::Unallocated)
    }

    pub fn host_offset(&self) -> Option<u64> {
        match self.kind {
            ExtentKind::Data { host } => Some(host),
            ExtentKind::Zero { host } => host,
            _ => None,
        }
    }

    /// Appends `next` to `self` when it continues it seamlessly (same layer, kind and
    /// contiguous host offsets). Compressed extents never merge.
    pub fn try_merge(&mut self, next: &Extent) -> bool {
        if self.end() != next.start || self.depth != next.depth {
            return false;
        }
        let ok = match (self.kind, next.kind) {
            (ExtentKind::Unallocated, ExtentKind::Unallocated) => true,
            (ExtentKind::Zero { host: None }, ExtentKind::Zero { host: None }) => true,
            (ExtentKind::Zero { host: Some(a) }, ExtentKind::Zero { host: Some(b) })
            | (ExtentKind::Data { host: a }, ExtentKind::Data { host: b }) => b == a + self.len,
            _ => false,
        };
        if ok {
            self.len += next.len;
        }
        ok
    }
}
