//! The cluster arithmetic of one image, in one place: which L1 and L2 entry maps a guest
//! offset, where a cluster starts, how many clusters a range touches. A header gives its
//! image's geometry with [`super::header::Header::geometry`].

/// Where an image's clusters fall, derived from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    /// Extended L2 entries (32 subclusters per cluster, two words per entry).
    pub extended_l2: bool,
}

impl Geometry {
    pub fn cluster_size(self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries in one L2 table (an entry is 8 bytes, 16 with extended L2).
    pub fn l2_entries(self) -> u64 {
        let entry_bytes = if self.extended_l2 { 16 } else { 8 };
        self.cluster_size() / entry_bytes
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_span(self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// The unit of allocation: a cluster, or a subcluster with extended L2 entries.
    pub fn unit_bits(self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }

    /// Index of the (guest or host) cluster holding byte `offset`.
    pub fn cluster_index(self, offset: u64) -> u64 {
        offset >> self.cluster_bits
    }

    /// Offset of the first byte of cluster `index`.
    pub fn cluster_offset(self, index: u64) -> u64 {
        index << self.cluster_bits
    }

    /// Position of `offset` within its cluster.
    pub fn offset_in_cluster(self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    pub fn is_cluster_aligned(self, offset: u64) -> bool {
        self.offset_in_cluster(offset) == 0
    }

    /// `offset` rounded down to its cluster's start.
    pub fn align_down(self, offset: u64) -> u64 {
        offset & !(self.cluster_size() - 1)
    }

    /// `offset` rounded up to a cluster boundary (saturating at the top of u64's range).
    pub fn align_up(self, offset: u64) -> u64 {
        offset
            .checked_next_multiple_of(self.cluster_size())
            .unwrap_or(!(self.cluster_size() - 1))
    }

    /// The L1 index and L2 index of guest cluster `index`.
    pub fn table_indexes(self, guest_cluster: u64) -> TableIndex {
        let n = self.l2_entries();
        TableIndex {
            l1: (guest_cluster / n) as usize,
            l2: (guest_cluster % n) as usize,
        }
    }

    /// The guest offset where the L2 table `l1_index` starts mapping.
    pub fn l2_start(self, l1_index: usize) -> u64 {
        l1_index as u64 * self.l2_span()
    }

    /// First guest byte past the L2 table that maps `guest`.
    pub fn l2_end(self, guest: u64) -> u64 {
        let span = self.l2_span();
        (guest / span + 1).saturating_mul(span)
    }

    /// The clusters `[start, end)` touches, as a range of cluster indexes.
    pub fn clusters_touched(self, start: u64, end: u64) -> std::ops::Range<u64> {
        if end <= start {
            return 0..0;
        }
        self.cluster_index(start)..self.cluster_index(end - 1) + 1
    }
}

/// Where a guest cluster's entry lives: entry `l2` of the L2 table at L1 entry `l1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableIndex {
    pub l1: usize,
    pub l2: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(bits: u32, ext: bool) -> Geometry {
        Geometry {
            cluster_bits: bits,
            extended_l2: ext,
        }
    }

    #[test]
    fn standard_and_extended_l2_tables() {
        let std64k = g(16, false);
        assert_eq!(std64k.cluster_size(), 65536);
        assert_eq!(std64k.l2_entries(), 8192);
        assert_eq!(std64k.l2_span(), 512 << 20);
        assert_eq!(std64k.unit_bits(), 16);
        let ext64k = g(16, true);
        assert_eq!(ext64k.l2_entries(), 4096);
        assert_eq!(ext64k.l2_span(), 256 << 20);
        assert_eq!(ext64k.unit_bits(), 11);
    }

    #[test]
    fn indexes_and_alignment() {
        let geo = g(16, false);
        let off = (3 << 29) + 5 * 65536 + 17;
        let c = geo.cluster_index(off);
        assert_eq!(geo.table_indexes(c), TableIndex { l1: 3, l2: 5 });
        assert_eq!(geo.offset_in_cluster(off), 17);
        assert_eq!(geo.align_down(off), off - 17);
        assert_eq!(geo.align_up(off), off - 17 + 65536);
        assert_eq!(geo.align_up(65536), 65536);
        assert_eq!(geo.l2_start(3), 3 << 29);
        assert_eq!(geo.l2_end(off), 4 << 29);
        assert_eq!(geo.clusters_touched(65535, 65537), 0..2);
        assert_eq!(geo.clusters_touched(65536, 131072), 1..2);
        assert_eq!(geo.clusters_touched(7, 7), 0..0);
        assert_eq!(geo.align_up(u64::MAX), !65535);
        assert_eq!(geo.l2_end(u64::MAX), u64::MAX);
    }
}
