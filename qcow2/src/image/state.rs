//! What an image open for writing keeps beside the read-only state: the refcounts, the dirty
//! L2 tables and which other metadata must be written at the next flush.

use crate::alloc::Refcounts;
use std::collections::HashMap;
use std::sync::Arc;

pub struct RwState {
    pub(crate) refcounts: Refcounts,
    pub(crate) dirty_l2: HashMap<u64, Arc<Vec<u64>>>,
    pub(crate) l1_dirty: bool,
    /// The L1 table moved: it must be on disk before the header points at it.
    pub(crate) l1_moved: bool,
    pub(crate) header_dirty: bool,
    /// Next free byte for compressed data (0 = start a new cluster), valid while no cluster
    /// has been freed since (`cursor_frees`): a freed cluster may hold other data now.
    pub(crate) compressed_cursor: u64,
    pub(crate) cursor_frees: u64,
    /// Persistent bitmaps exist: data writes would leave them stale.
    pub(crate) has_bitmaps: bool,
}

impl RwState {
    pub(crate) fn new(refcounts: Refcounts, header_dirty: bool, has_bitmaps: bool) -> RwState {
        RwState {
            refcounts,
            dirty_l2: HashMap::new(),
            l1_dirty: false,
            l1_moved: false,
            header_dirty,
            compressed_cursor: 0,
            cursor_frees: 0,
            has_bitmaps,
        }
    }
}
