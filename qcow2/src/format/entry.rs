//! L1 and L2 table entries and compressed cluster descriptors.

use crate::error::bail_format;
use crate::error::FormatError;

pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
pub const L2E_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
pub const SUBCLUSTERS: u32 = 32;

/// The offset of the L2 table an L1 entry points to (0 = unallocated).
pub fn l1_l2_offset(entry: u64) -> u64 {
    entry & L1E_OFFSET_MASK
}

/// A compressed cluster's location: the byte offset where its data starts and how many bytes
/// from there may belong to it (known only to sector precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDesc {
    pub host_offset: u64,
    pub len: u64,
}

impl CompressedDesc {
    pub fn decode(entry: u64, cluster_bits: u32) -> Self {
        let x = 62 - (cluster_bits - 8);
        let host_offset = entry & ((1u64 << x) - 1);
        let nsec_extra = (entry >> x) & ((1u64 << (cluster_bits - 8)) - 1);
        let end = (host_offset & !511) + (nsec_extra + 1) * 512;
        CompressedDesc {
            host_offset,
            len: end - host_offset,
        }
    }

    /// Encodes a compressed cluster of `clen` bytes at `host_offset`.
    pub fn encode(host_offset: u64, clen: u64, cluster_bits: u32) -> u64 {
        let x = 62 - (cluster_bits - 8);
        let nsec_extra = ((host_offset + clen - 1) >> 9) - (host_offset >> 9);
        OFLAG_COMPRESSED | (nsec_extra << x) | host_offset
    }

    /// The host clusters whose refcount this compressed extent holds a reference on.
    pub fn host_clusters(&self, cluster_bits: u32) -> std::ops::RangeInclusive<u64> {
        let first = (self.host_offset & !511) >> cluster_bits;
        let last = (self.host_offset + self.len - 1) >> cluster_bits;
        first..=last
    }
}

/// What one (sub)cluster of a standard L2 entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// Falls through to the backing file.
    Unallocated,
    /// Reads as zeros; `host` is the still-owned cluster for ZERO_ALLOC.
    Zero {
        host: Option<u64>,
    },
    /// Data at this host offset (start of the cluster, or of the subcluster for extended L2).
    Data {
        host: u64,
    },
    Compressed(CompressedDesc),
}

/// A decoded L2 entry: the kind of the whole cluster, or per-subcluster state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Entry {
    pub word: u64,
    /// Extended L2 bitmap word (alloc bits 0-31, zero bits 32-63); None for standard entries.
    pub bitmap: Option<u64>,
}

impl L2Entry {
    pub fn copied(&self) -> bool {
        self.word & OFLAG_COPIED != 0
    }

    pub fn is_compressed(&self) -> bool {
        self.word & OFLAG_COMPRESSED != 0
    }

    /// Host cluster offset of a non-compressed entry (0 when none).
    pub fn host_offset(&self) -> u64 {
        if self.is_compressed() {
            0
        } else {
            self.word & L2E_OFFSET_MASK
        }
    }

    /// The kind of subcluster `sub` (always 0 for standard entries), validating the entry.
    /// `v3` says whether the ZERO flag exists; `cluster_bits` sizes subclusters;
    /// `data_file` makes host offset 0 with COPIED a valid (identity) mapping.
    pub fn kind(
        &self,
        sub: u32,
        cluster_bits: u32,
        v3: bool,
        data_file: bool,
    ) -> Result<ClusterKind, FormatError> {
        if self.is_compressed() {
            return Ok(ClusterKind::Compressed(CompressedDesc::decode(
                self.word,
                cluster_bits,
            )));
        }
        let host = self.word & L2E_OFFSET_MASK;
        if host & ((1u64 << cluster_bits) - 1) != 0 {
            bail_format!("cluster allocation offset {host:#x} unaligned");
        }
        match self.bitmap {
            None => {
                if self.word & OFLAG_ZERO != 0 {
                    if !v3 {
                        bail_format!("zero cluster entry found in pre-v3 image");
                    }
                    return Ok(ClusterKind::Zero {
                        host: (host != 0).then_some(host),
                    });
                }
                Ok(if host == 0 && !(data_file && self.copied()) {
                    ClusterKind::Unallocated
                } else {
                    ClusterKind::Data { host }
                })
            }
            Some(bm) => {
                let alloc = (bm >> sub) & 1 != 0;
                let zero = (bm >> (32 + sub)) & 1 != 0;
                if bm as u32 & (bm >> 32) as u32 != 0 {
                    bail_format!("invalid extended L2 entry: subcluster both allocated and zero");
                }
                if self.word & OFLAG_ZERO != 0 {
                    bail_format!("invalid extended L2 entry: reserved zero bit set");
                }
                let sc_size = (1u64 << cluster_bits) / SUBCLUSTERS as u64;
                let has_host = host != 0 || (data_file && self.copied());
                if zero {
                    return Ok(ClusterKind::Zero {
                        host: has_host.then_some(host + sub as u64 * sc_size),
                    });
                }
                if alloc {
                    if !has_host {
                        bail_format!(
                            "invalid extended L2 entry: allocated subcluster without host cluster"
                        );
                    }
                    return Ok(ClusterKind::Data {
                        host: host + sub as u64 * sc_size,
                    });
                }
                Ok(ClusterKind::Unallocated)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptor_examples_from_qemu() {
        let d = CompressedDesc::decode(0x4800_0000_0000_502a, 12);
        assert_eq!(d.host_offset, 0x502a);
        assert_eq!(d.host_offset + d.len, 0x5600);
        let d = CompressedDesc::decode(0x4000_0000_0000_0a15, 9);
        assert_eq!((d.host_offset, d.len), (0xa15, 0xc00 - 0xa15));
        let d = CompressedDesc::decode(0x4440_0000_0005_21c5, 16);
        assert_eq!(d.host_offset, 0x521c5);
        assert_eq!(d.host_offset + d.len, (0x52000 + 18 * 512));
    }

    #[test]
    fn compressed_round_trip() {
        for bits in 9..=21 {
            // Compressed data is always shorter than a cluster.
            let clen = 1000.min((1u64 << bits) - 1);
            let e = CompressedDesc::encode(0x12345, clen, bits);
            let d = CompressedDesc::decode(e, bits);
            assert_eq!(d.host_offset, 0x12345);
            assert!(d.len >= clen);
        }
    }
}
