//! Creating images: qcow2 with qemu-img's defaults and options, or raw.

use crate::error::{Error, IoContext, Result};
use crate::format::header::{
    CompressionType, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2,
    MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, V2_HEADER_LEN, V3_HEADER_LEN,
};
use crate::format::refcount;
use crate::image::Qcow2;
use crate::storage::{FileStorage, Storage};
use byteorder::{BigEndian as BE, ByteOrder};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    pub extended_l2: bool,
    pub compression: CompressionType,
    pub backing: Option<(String, String)>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression: CompressionType::Zlib,
            backing: None,
        }
    }
}

impl CreateOptions {
    /// Applies one `-o key=value` option in qemu-img's spelling.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bad = || Error::bad_request(format!("invalid value {value:?} for option {key}"));
        let onoff = |v: &str| match v {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            _ => Err(bad()),
        };
        match key {
            "cluster_size" => self.cluster_size = parse_size(value).ok_or_else(bad)?,
            "compat" => {
                self.version = match value {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(bad()),
                }
            }
            "refcount_bits" => self.refcount_bits = value.parse().map_err(|_| bad())?,
            "lazy_refcounts" => self.lazy_refcounts = onoff(value)?,
            "extended_l2" => self.extended_l2 = onoff(value)?,
            "compression_type" => {
                self.compression = match value {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    _ => return Err(bad()),
                }
            }
            "size" => self.size = parse_size(value).ok_or_else(bad)?,
            _ => {
                return Err(Error::bad_request(format!(
                    "unknown option {key} (known: cluster_size, compat, refcount_bits, lazy_refcounts, extended_l2, compression_type, size)"
                )))
            }
        }
        Ok(())
    }

    /// Parses a comma-separated `-o` list.
    pub fn apply_list(&mut self, list: &str) -> Result<()> {
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| Error::bad_request(format!("option {item:?} needs a value")))?;
            self.set(k.trim(), v.trim())?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<u32> {
        check_image_size(self.size)?;
        let cs = self.cluster_size;
        if !cs.is_power_of_two() {
            return Err(Error::bad_request(format!(
                "cluster size {cs} is not a power of two"
            )));
        }
        let bits = cs.trailing_zeros();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(Error::bad_request(format!(
                "cluster size must be between 512 and 2M, not {cs}"
            )));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(Error::bad_request(format!(
                "refcount_bits must be a power of two up to 64, not {}",
                self.refcount_bits
            )));
        }
        if self.version == 2
            && (self.lazy_refcounts
                || self.refcount_bits != 16
                || self.extended_l2
                || self.compression != CompressionType::Zlib)
        {
            return Err(Error::bad_request(
                "compat=0.10 images cannot have lazy refcounts, refcount_bits other than 16, extended L2 or zstd",
            ));
        }
        if self.extended_l2 && cs < 16384 {
            return Err(Error::bad_request(
                "extended L2 entries need a cluster size of at least 16384 bytes",
            ));
        }
        Ok(bits)
    }
}

/// The largest image size qemu-img accepts (INT64_MAX); qcow2 images are further limited
/// by their L1 table (checked when created).
pub const MAX_IMAGE_SIZE: u64 = i64::MAX as u64;

/// Refuses sizes qemu-img refuses, before any arithmetic on them.
pub fn check_image_size(size: u64) -> Result<()> {
    if size > MAX_IMAGE_SIZE {
        return Err(Error::bad_request(format!(
            "invalid image size {size}: must be between 0 and {MAX_IMAGE_SIZE}"
        )));
    }
    Ok(())
}

/// Parses sizes with qemu-img's suffixes: plain bytes, or K, M, G, T, P, E (binary). A
/// fraction needs a suffix ("1.5G"), as with qemu-img.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return None,
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult);
    }
    if mult == 1 || !num.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let f: f64 = num.parse().ok()?;
    let v = f * mult as f64;
    (f.is_finite() && v < u64::MAX as f64).then_some(v as u64)
}

/// Creates a new qcow2 image at `path` (which must not exist) and returns it open for
/// writing. Layout as qemu-img: header, refcount table, refcount block, L1.
pub fn create_qcow2(path: &Path, opts: &CreateOptions) -> Result<Qcow2> {
    let display = path.display().to_string();
    let storage = FileStorage::create_new(path).on_file(&display, "cannot create")?;
    match init_qcow2(Arc::new(storage), &display, path.parent(), opts) {
        Ok(img) => Ok(img),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// Writes a fresh image into empty storage and opens it for writing.
pub fn init_qcow2(
    storage: Arc<dyn Storage>,
    path: &str,
    dir: Option<&Path>,
    opts: &CreateOptions,
) -> Result<Qcow2> {
    let cluster_bits = opts.validate()?;
    let cs = 1u64 << cluster_bits;
    let size = opts.size.div_ceil(512) * 512;
    let mut h = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: opts.refcount_bits.trailing_zeros(),
        header_length: if opts.version == 3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        },
        compression_type: opts.compression,
        unknown_header_bytes: Vec::new(),
        extensions: Vec::new(),
        backing_file: None,
    };
    if opts.extended_l2 {
        h.incompatible_features |= INCOMPAT_EXTL2;
    }
    if opts.compression != CompressionType::Zlib {
        h.incompatible_features |= INCOMPAT_COMPRESSION;
    }
    if opts.lazy_refcounts {
        h.compatible_features |= COMPAT_LAZY_REFCOUNTS;
    }
    if let Some((name, fmt)) = &opts.backing {
        h.set_backing(Some(name.clone()), Some(fmt.clone()));
    }
    let l1_entries = h.required_l1_entries();
    if l1_entries * 8 > crate::format::header::MAX_L1_BYTES {
        return Err(Error::bad_request(format!(
            "the image size is too large for cluster size {cs} (try a larger cluster size)"
        )));
    }
    // Cluster 0 header, 1 refcount table, 2 refcount block; the L1 follows via the allocator.
    let io = |e| Error::io(path, "writing new image", 0, e);
    let mut reftable = vec![0u8; cs as usize];
    BE::write_u64(&mut reftable[0..8], 2 * cs);
    let mut block = vec![0u8; cs as usize];
    for c in 0..3 {
        refcount::set(&mut block, h.refcount_order, c, 1);
    }
    // Written first with size 0 (no L1 needed); the L1 is then allocated like any cluster.
    h.size = 0;
    let cluster0 = h.encode().map_err(|e| Error::invalid(path, e.0))?;
    storage.write_at(&cluster0, 0).map_err(io)?;
    storage.write_at(&reftable, cs).map_err(io)?;
    storage.write_at(&block, 2 * cs).map_err(io)?;
    let mut img = Qcow2::open_storage(storage, path, dir)?;
    img.make_writable()?;
    img.header_mut().size = size;
    img.resize_l1(l1_entries)?;
    img.flush()?;
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("100000"), Some(100000));
        assert_eq!(parse_size("x"), None);
        // As qemu-img: no fraction without a suffix, no sign, nothing past u64.
        for bad in [
            "1.5",
            "-1",
            "1e3",
            "inf",
            "NaN",
            "16E",
            "99999999999999999999",
        ] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        assert_eq!(
            parse_size("15.99E"),
            Some((15.99 * (1u64 << 60) as f64) as u64)
        );
        assert!(check_image_size(u64::MAX).is_err());
        assert!(check_image_size(1 << 63).is_err());
        assert!(check_image_size(i64::MAX as u64).is_ok());
        let huge = CreateOptions {
            size: u64::MAX,
            ..Default::default()
        };
        assert!(huge.validate().is_err());
    }
}
