//! Entry points shared by the fuzz targets and the regression-corpus test, so both exercise
//! exactly the same code.

use crate::chain::{Chain, Layer};
use crate::image::Qcow2;
use crate::storage::MemStorage;
use std::sync::Arc;

/// Most extents visited and data bytes read per input: keeps hostile images (many L1 entries
/// sharing one L2 table, huge virtual sizes) from turning a fuzz run into a hang.
const MAX_EXTENTS: usize = 20_000;
const MAX_READ: u64 = 16 << 20;

/// Opens `data` as a standalone qcow2 image, walks its mapping, reads its data and checks it.
/// Errors are fine; panics are bugs.
pub fn open_read_check(data: &[u8]) {
    let storage = Arc::new(MemStorage::new(data.to_vec()));
    let Ok(img) = Qcow2::open_storage(storage, "fuzz.qcow2", None) else {
        return;
    };
    let _ = img.snapshots();
    let _ = img.bitmaps();
    let _ = crate::check::check(&img);
    let Ok(chain) = Chain::from_layers(vec![Layer::Qcow2(Box::new(img))]) else {
        return;
    };
    let mut extents = 0usize;
    let mut read = 0u64;
    let mut buf = vec![0u8; 65536];
    let _ = chain.for_each_extent(0, chain.virtual_size(), |e| {
        extents += 1;
        if extents > MAX_EXTENTS || read > MAX_READ {
            return Err(crate::Error::Request("fuzz budget spent".into()));
        }
        let n = e.len.min(buf.len() as u64);
        read += n;
        // Errors on individual extents are expected for garbage.
        let _ = chain.read_extent(e, e.start, &mut buf[..n as usize]);
        Ok(())
    });
}
