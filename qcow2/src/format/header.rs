//! The qcow2 header (v2 and v3), its extensions and the backing file name, all of which live
//! in cluster 0. Pure functions over byte slices.

use super::geometry::Geometry;
use crate::error::bail_format;
use crate::error::FormatError;
use byteorder::{BigEndian as BE, ByteOrder};

pub const MAGIC: u32 = 0x5146_49fb;
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// The header QEMU writes for v3: 104 bytes + compression type byte + 7 padding bytes.
pub const V3_HEADER_LEN: u32 = 112;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits: L1 at most 32 MiB, refcount table at most 8 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_BACKING_NAME: u32 = 1023;
/// Host offsets are 56-bit in L1/L2 entries.
pub const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const INCOMPAT_KNOWN: u64 = 0x1f;

pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
pub const AUTOCLEAR_KNOWN: u64 = 0x3;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extension {
    BackingFormat(String),
    FeatureTable(Vec<FeatureName>),
    Bitmaps(BitmapsExt),
    DataFile(String),
    Crypto {
        offset: u64,
        length: u64,
    },
    /// Kept byte for byte so a rewrite preserves it.
    Unknown {
        kind: u32,
        data: Vec<u8>,
    },
}

/// Everything stored in cluster 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    /// Virtual size as stored (QEMU uses it rounded down to 512; see [`Header::virtual_size`]).
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Header bytes past the fields we know (between 112 and header_length), preserved.
    pub unknown_header_bytes: Vec<u8>,
    pub extensions: Vec<Extension>,
    pub backing_file: Option<String>,
}

fn read_string(bytes: &[u8], what: &str) -> Result<String, FormatError> {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => Ok(s.to_string()),
        _ => bail_format!("{what} is not a valid UTF-8 string without NUL bytes"),
    }
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The virtual disk size QEMU exposes: the stored size rounded down to 512 bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size & !511
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// The image's cluster arithmetic.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: self.cluster_bits,
            extended_l2: self.extended_l2(),
        }
    }

    pub fn l2_entries(&self) -> u64 {
        self.geometry().l2_entries()
    }

    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            Extension::BackingFormat(f) => Some(f.as_str()),
            _ => None,
        })
    }

    pub fn data_file(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            Extension::DataFile(f) => Some(f.as_str()),
            _ => None,
        })
    }

    pub fn bitmaps(&self) -> Option<BitmapsExt> {
        self.extensions.iter().find_map(|e| match e {
            Extension::Bitmaps(b) => Some(*b),
            _ => None,
        })
    }

    pub fn feature_table(&self) -> &[FeatureName] {
        self.extensions
            .iter()
            .find_map(|e| match e {
                Extension::FeatureTable(t) => Some(t.as_slice()),
                _ => None,
            })
            .unwrap_or(&[])
    }

    /// Number of L1 entries needed to map the virtual size.
    pub fn required_l1_entries(&self) -> u64 {
        let clusters = self.size.div_ceil(self.cluster_size());
        clusters.div_ceil(self.l2_entries())
    }

    /// Reads the fixed part to learn the cluster size; `bytes` needs at least 104 bytes
    /// (72 for v2). Returns (version, cluster_bits).
    pub fn peek_cluster_bits(bytes: &[u8]) -> Result<u32, FormatError> {
        if bytes.len() < V2_HEADER_LEN as usize {
            bail_format!("file too short for a qcow2 header ({} bytes)", bytes.len());
        }
        if BE::read_u32(&bytes[0..4]) != MAGIC {
            bail_format!("not a qcow2 image (bad magic)");
        }
        let cluster_bits = BE::read_u32(&bytes[20..24]);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            bail_format!(
                "unsupported cluster size: cluster_bits {cluster_bits} (must be 9 to 21, 512 B to 2 MiB)"
            );
        }
        Ok(cluster_bits)
    }

    /// Parses the header from cluster 0 (`cluster0` must hold the whole first cluster, or the
    /// whole file when it is shorter; missing bytes are treated as zeros by the caller).
    pub fn parse(cluster0: &[u8]) -> Result<Header, FormatError> {
        let cluster_bits = Self::peek_cluster_bits(cluster0)?;
        let cs = 1u64 << cluster_bits;
        if (cluster0.len() as u64) < cs.min(V3_HEADER_LEN as u64) {
            bail_format!("header truncated");
        }
        let version = BE::read_u32(&cluster0[4..8]);
        if version != 2 && version != 3 {
            bail_format!("unsupported qcow2 version {version} (only 2 and 3 exist)");
        }
        let mut h = Header {
            version,
            backing_file_offset: BE::read_u64(&cluster0[8..16]),
            backing_file_size: BE::read_u32(&cluster0[16..20]),
            cluster_bits,
            size: BE::read_u64(&cluster0[24..32]),
            crypt_method: BE::read_u32(&cluster0[32..36]),
            l1_size: BE::read_u32(&cluster0[36..40]),
            l1_table_offset: BE::read_u64(&cluster0[40..48]),
            refcount_table_offset: BE::read_u64(&cluster0[48..56]),
            refcount_table_clusters: BE::read_u32(&cluster0[56..60]),
            nb_snapshots: BE::read_u32(&cluster0[60..64]),
            snapshots_offset: BE::read_u64(&cluster0[64..72]),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            unknown_header_bytes: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if cluster0.len() < V3_MIN_HEADER_LEN as usize {
                bail_format!("v3 header truncated");
            }
            h.incompatible_features = BE::read_u64(&cluster0[72..80]);
            h.compatible_features = BE::read_u64(&cluster0[80..88]);
            h.autoclear_features = BE::read_u64(&cluster0[88..96]);
            h.refcount_order = BE::read_u32(&cluster0[96..100]);
            h.header_length = BE::read_u32(&cluster0[100..104]);
            if h.header_length < V3_MIN_HEADER_LEN {
                bail_format!(
                    "header_length {} is shorter than the v3 minimum of 104",
                    h.header_length
                );
            }
            if h.header_length as u64 > cs || h.header_length as usize > cluster0.len() {
                bail_format!(
                    "header_length {} does not fit in the first cluster",
                    h.header_length
                );
            }
            if !h.header_length.is_multiple_of(8) {
                bail_format!("header_length {} is not a multiple of 8", h.header_length);
            }
            if h.header_length > 104 {
                h.compression_type = match cluster0[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    n => bail_format!("unknown compression type {n}"),
                };
            }
            if h.header_length > V3_HEADER_LEN {
                h.unknown_header_bytes =
                    cluster0[V3_HEADER_LEN as usize..h.header_length as usize].to_vec();
            }
        }
        h.validate_fixed()?;
        h.parse_extensions(cluster0)?;
        h.validate_extensions()?;
        Ok(h)
    }

    fn validate_fixed(&self) -> Result<(), FormatError> {
        let cs = self.cluster_size();
        if self.crypt_method != 0 {
            bail_format!(
                "encrypted images are not supported (crypt_method {})",
                self.crypt_method
            );
        }
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            bail_format!("unsupported incompatible feature bits {unknown:#x}");
        }
        if self.refcount_order > 6 {
            bail_format!(
                "refcount_order {} is out of range (0 to 6)",
                self.refcount_order
            );
        }
        if self.version == 2 && self.refcount_order != 4 {
            bail_format!("v2 images must use 16-bit refcounts");
        }
        let ext_l2 = self.extended_l2();
        if ext_l2 && self.cluster_bits < 14 {
            bail_format!("extended L2 entries need clusters of at least 16 KiB");
        }
        let has_ctype_bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        if has_ctype_bit != (self.compression_type != CompressionType::Zlib) {
            bail_format!(
                "compression type incompatible feature bit must {}be set",
                if has_ctype_bit { "not " } else { "" }
            );
        }
        // 2^61 keeps every guest offset computation far from overflow.
        if self.size > (1 << 61) {
            bail_format!("virtual size {} is too large", self.size);
        }
        if self.l1_size as u64 * 8 > MAX_L1_BYTES {
            bail_format!(
                "L1 table too large: {} entries (at most {})",
                self.l1_size,
                MAX_L1_BYTES / 8
            );
        }
        if (self.l1_size as u64) < self.required_l1_entries() {
            bail_format!(
                "L1 table is too small: {} entries for a virtual size of {} (need {})",
                self.l1_size,
                self.size,
                self.required_l1_entries()
            );
        }
        if self.l1_size > 0 && !self.l1_table_offset.is_multiple_of(cs) {
            bail_format!(
                "L1 table offset {:#x} is not cluster aligned",
                self.l1_table_offset
            );
        }
        if self.l1_table_offset > MAX_HOST_OFFSET {
            bail_format!("L1 table offset {:#x} is invalid", self.l1_table_offset);
        }
        if self.refcount_table_clusters as u64 * cs > MAX_REFTABLE_BYTES {
            bail_format!(
                "refcount table too large: {} clusters",
                self.refcount_table_clusters
            );
        }
        if !self.refcount_table_offset.is_multiple_of(cs)
            || self.refcount_table_offset > MAX_HOST_OFFSET
        {
            bail_format!(
                "refcount table offset {:#x} is invalid",
                self.refcount_table_offset
            );
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            bail_format!("too many snapshots: {}", self.nb_snapshots);
        }
        if self.nb_snapshots > 0
            && (!self.snapshots_offset.is_multiple_of(cs)
                || self.snapshots_offset > MAX_HOST_OFFSET)
        {
            bail_format!(
                "snapshot table offset {:#x} is invalid",
                self.snapshots_offset
            );
        }
        if self.backing_file_offset != 0 {
            if self.backing_file_size > MAX_BACKING_NAME {
                bail_format!(
                    "backing file name too long: {} bytes",
                    self.backing_file_size
                );
            }
            let end = self
                .backing_file_offset
                .saturating_add(self.backing_file_size as u64);
            if self.backing_file_offset > cs || end > cs {
                bail_format!("backing file name does not fit in the first cluster");
            }
        }
        Ok(())
    }

    fn parse_extensions(&mut self, cluster0: &[u8]) -> Result<(), FormatError> {
        let cs = self.cluster_size() as usize;
        let limit = if self.backing_file_offset != 0 {
            self.backing_file_offset as usize
        } else {
            cs
        }
        .min(cluster0.len());
        let mut pos = self.header_length as usize;
        loop {
            if pos + 8 > limit {
                // Tolerate a missing end marker when the extension area is exactly full.
                break;
            }
            let kind = BE::read_u32(&cluster0[pos..pos + 4]);
            let len = BE::read_u32(&cluster0[pos + 4..pos + 8]) as usize;
            pos += 8;
            if kind == EXT_END {
                break;
            }
            if len > limit - pos {
                bail_format!("header extension {kind:#010x} too large ({len} bytes)");
            }
            let data = &cluster0[pos..pos + len];
            let ext = match kind {
                EXT_BACKING_FORMAT => {
                    Extension::BackingFormat(read_string(data, "backing file format")?)
                }
                EXT_DATA_FILE => Extension::DataFile(read_string(data, "data file name")?),
                EXT_FEATURE_TABLE => {
                    let entries = data
                        .chunks_exact(48)
                        .map(|e| {
                            let raw = &e[2..48];
                            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                            FeatureName {
                                kind: e[0],
                                bit: e[1],
                                name: String::from_utf8_lossy(&raw[..end]).into_owned(),
                            }
                        })
                        .collect();
                    Extension::FeatureTable(entries)
                }
                EXT_BITMAPS => {
                    if len < 24 {
                        bail_format!("bitmaps extension too short ({len} bytes)");
                    }
                    Extension::Bitmaps(BitmapsExt {
                        nb_bitmaps: BE::read_u32(&data[0..4]),
                        directory_size: BE::read_u64(&data[8..16]),
                        directory_offset: BE::read_u64(&data[16..24]),
                    })
                }
                EXT_CRYPTO if len >= 16 => Extension::Crypto {
                    offset: BE::read_u64(&data[0..8]),
                    length: BE::read_u64(&data[8..16]),
                },
                _ => Extension::Unknown {
                    kind,
                    data: data.to_vec(),
                },
            };
            self.extensions.push(ext);
            pos += len.div_ceil(8) * 8;
        }
        if self.backing_file_offset != 0 {
            let start = self.backing_file_offset as usize;
            let end = start + self.backing_file_size as usize;
            if end > cluster0.len() {
                bail_format!("backing file name lies past the end of the file");
            }
            let name = read_string(&cluster0[start..end], "backing file name")?;
            if !name.is_empty() {
                self.backing_file = Some(name);
            }
        }
        Ok(())
    }

    fn validate_extensions(&self) -> Result<(), FormatError> {
        if self.has_data_file() && self.data_file().is_none() {
            // QEMU needs the name from the command line then; we cannot find the data.
            bail_format!("image has an external data file but no data file name extension");
        }
        if let Some(b) = self.bitmaps() {
            if b.nb_bitmaps > 65535 {
                bail_format!("too many bitmaps: {}", b.nb_bitmaps);
            }
            if b.directory_size > 64 << 20 {
                bail_format!("bitmap directory too large: {} bytes", b.directory_size);
            }
            if b.directory_offset % self.cluster_size() != 0 {
                bail_format!(
                    "bitmap directory offset {:#x} is not cluster aligned",
                    b.directory_offset
                );
            }
        }
        Ok(())
    }

    /// Name of an incompatible feature bit, from the image's feature table or our own list.
    pub fn incompatible_feature_name(&self, bit: u8) -> String {
        if let Some(f) = self
            .feature_table()
            .iter()
            .find(|f| f.kind == 0 && f.bit == bit)
        {
            return f.name.clone();
        }
        match bit {
            0 => "dirty bit".into(),
            1 => "corrupt bit".into(),
            2 => "external data file".into(),
            3 => "compression type".into(),
            4 => "extended L2 entries".into(),
            _ => format!("unknown feature bit {bit}"),
        }
    }

    /// Serialises cluster 0 the way QEMU's full header rewrite does: fixed header, preserved
    /// unknown header bytes, backing format, data file name, feature table (v3 with clusters
    /// larger than 4 KiB), bitmaps, unknown extensions, end marker, backing file name.
    /// Returns a buffer of exactly one cluster. Fails if it does not fit.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let cs = self.cluster_size() as usize;
        let mut buf = Vec::with_capacity(cs);
        let header_length = if self.version == 3 {
            V3_HEADER_LEN as usize + self.unknown_header_bytes.len()
        } else {
            V2_HEADER_LEN as usize
        };
        buf.resize(header_length, 0);
        BE::write_u32(&mut buf[0..4], MAGIC);
        BE::write_u32(&mut buf[4..8], self.version);
        // backing offset/size filled in below
        BE::write_u32(&mut buf[20..24], self.cluster_bits);
        BE::write_u64(&mut buf[24..32], self.size);
        BE::write_u32(&mut buf[32..36], self.crypt_method);
        BE::write_u32(&mut buf[36..40], self.l1_size);
        BE::write_u64(&mut buf[40..48], self.l1_table_offset);
        BE::write_u64(&mut buf[48..56], self.refcount_table_offset);
        BE::write_u32(&mut buf[56..60], self.refcount_table_clusters);
        BE::write_u32(&mut buf[60..64], self.nb_snapshots);
        BE::write_u64(&mut buf[64..72], self.snapshots_offset);
        if self.version == 3 {
            BE::write_u64(&mut buf[72..80], self.incompatible_features);
            BE::write_u64(&mut buf[80..88], self.compatible_features);
            BE::write_u64(&mut buf[88..96], self.autoclear_features);
            BE::write_u32(&mut buf[96..100], self.refcount_order);
            BE::write_u32(&mut buf[100..104], header_length as u32);
            buf[104] = match self.compression_type {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            };
            buf[112..].copy_from_slice(&self.unknown_header_bytes);
        }
        let push_ext = |buf: &mut Vec<u8>, kind: u32, data: &[u8]| {
            let mut hdr = [0u8; 8];
            BE::write_u32(&mut hdr[0..4], kind);
            BE::write_u32(&mut hdr[4..8], data.len() as u32);
            buf.extend_from_slice(&hdr);
            buf.extend_from_slice(data);
            buf.resize(buf.len().div_ceil(8) * 8, 0);
        };
        if let Some(f) = self.backing_format() {
            if self.backing_file.is_some() {
                push_ext(&mut buf, EXT_BACKING_FORMAT, f.as_bytes());
            }
        }
        if let Some(d) = self.data_file() {
            push_ext(&mut buf, EXT_DATA_FILE, d.as_bytes());
        }
        for e in &self.extensions {
            if let Extension::Crypto { offset, length } = e {
                let mut d = [0u8; 16];
                BE::write_u64(&mut d[0..8], *offset);
                BE::write_u64(&mut d[8..16], *length);
                push_ext(&mut buf, EXT_CRYPTO, &d);
            }
        }
        if self.version == 3 && cs > 4096 {
            push_ext(&mut buf, EXT_FEATURE_TABLE, &qemu_feature_table());
        }
        if let Some(b) = self.bitmaps() {
            if b.nb_bitmaps > 0 {
                let mut d = [0u8; 24];
                BE::write_u32(&mut d[0..4], b.nb_bitmaps);
                BE::write_u64(&mut d[8..16], b.directory_size);
                BE::write_u64(&mut d[16..24], b.directory_offset);
                push_ext(&mut buf, EXT_BITMAPS, &d);
            }
        }
        // QEMU keeps unknown extensions in a head-inserted list: they come out reversed.
        for e in self.extensions.iter().rev() {
            if let Extension::Unknown { kind, data } = e {
                push_ext(&mut buf, *kind, data);
            }
        }
        buf.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let off = buf.len();
            buf.extend_from_slice(name.as_bytes());
            BE::write_u64(&mut buf[8..16], off as u64);
            BE::write_u32(&mut buf[16..20], name.len() as u32);
        }
        if buf.len() > cs {
            bail_format!(
                "header, extensions and backing file name ({} bytes) do not fit in one {cs}-byte cluster",
                buf.len()
            );
        }
        buf.resize(cs, 0);
        Ok(buf)
    }

    pub fn set_backing(&mut self, name: Option<String>, format: Option<String>) {
        self.extensions
            .retain(|e| !matches!(e, Extension::BackingFormat(_)));
        self.backing_file = name;
        if self.backing_file.is_some() {
            if let Some(f) = format {
                self.extensions.insert(0, Extension::BackingFormat(f));
            }
        }
        self.backing_file_offset = 0;
        self.backing_file_size = 0;
    }
}

/// The 8-entry feature name table QEMU writes (384 bytes).
pub fn qemu_feature_table() -> Vec<u8> {
    let entries: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut out = vec![0u8; 48 * entries.len()];
    for (i, (kind, bit, name)) in entries.iter().enumerate() {
        let e = &mut out[i * 48..(i + 1) * 48];
        e[0] = *kind;
        e[1] = *bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal_v3() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        BE::write_u32(&mut b[0..4], MAGIC);
        BE::write_u32(&mut b[4..8], 3);
        BE::write_u32(&mut b[20..24], 16);
        BE::write_u64(&mut b[24..32], 1 << 20);
        BE::write_u32(&mut b[36..40], 1);
        BE::write_u64(&mut b[40..48], 3 << 16);
        BE::write_u64(&mut b[48..56], 1 << 16);
        BE::write_u32(&mut b[56..60], 1);
        BE::write_u32(&mut b[96..100], 4);
        BE::write_u32(&mut b[100..104], 112);
        b
    }

    #[test]
    fn parses_minimal_and_round_trips() {
        let b = minimal_v3();
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.virtual_size(), 1 << 20);
        let enc = h.encode().unwrap();
        let h2 = Header::parse(&enc).unwrap();
        assert_eq!(h2.size, h.size);
        assert_eq!(h2.feature_table().len(), 8);
    }

    #[test]
    fn rejects_unknown_incompatible_bit() {
        let mut b = minimal_v3();
        BE::write_u64(&mut b[72..80], 1 << 10);
        let e = Header::parse(&b).unwrap_err();
        assert!(e.0.contains("0x400"), "{e}");
    }

    #[test]
    fn rejects_encryption_and_bad_cluster_bits() {
        let mut b = minimal_v3();
        BE::write_u32(&mut b[32..36], 2);
        assert!(Header::parse(&b).unwrap_err().0.contains("encrypted"));
        let mut b = minimal_v3();
        BE::write_u32(&mut b[20..24], 30);
        assert!(Header::parse(&b).is_err());
    }

    #[test]
    fn backing_name_round_trip() {
        let mut h = Header::parse(&minimal_v3()).unwrap();
        h.set_backing(Some("base.qcow2".into()), Some("qcow2".into()));
        let enc = h.encode().unwrap();
        let h2 = Header::parse(&enc).unwrap();
        assert_eq!(h2.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(h2.backing_format(), Some("qcow2"));
        // Same layout as QEMU: name at 0x210 for 64 KiB clusters.
        assert_eq!(h2.backing_file_offset, 0x210);
    }
}
