//! In-memory images for the unit tests: no file, no QEMU.

use crate::chain::{Chain, Layer};
use crate::check::check;
use crate::create::{init_qcow2, CreateOptions};
use crate::image::Qcow2;
use crate::storage::MemStorage;
use std::sync::Arc;

/// A new writable image of `size` bytes with `cluster_size` clusters, in memory; returns
/// its storage too, to reopen or inspect it.
pub fn mem_image(size: u64, cluster_size: u64, extended_l2: bool) -> (Qcow2, Arc<MemStorage>) {
    let storage = Arc::new(MemStorage::new(Vec::new()));
    let opts = CreateOptions {
        size,
        cluster_size,
        extended_l2,
        ..Default::default()
    };
    let img = init_qcow2(storage.clone(), "mem.qcow2", None, &opts).expect("create");
    (img, storage)
}

/// Flushes, reopens read-only and checks the image: no corruption, no leak.
pub fn reopen_checked(mut img: Qcow2, storage: Arc<MemStorage>) -> Qcow2 {
    img.flush().expect("flush");
    drop(img);
    let img = Qcow2::open_storage(storage, "mem.qcow2", None).expect("reopen");
    let report = check(&img).expect("check");
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
    img
}

/// A chain of images, top first.
pub fn chain_of(images: Vec<Qcow2>) -> Chain {
    Chain::from_layers(
        images
            .into_iter()
            .map(|q| Layer::Qcow2(Box::new(q)))
            .collect(),
    )
    .expect("chain")
}

/// The whole guest content of a chain.
pub fn read_all(chain: &Chain) -> Vec<u8> {
    let mut buf = vec![0u8; chain.virtual_size() as usize];
    chain.read_at(&mut buf, 0).expect("read");
    buf
}
