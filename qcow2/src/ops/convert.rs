//! `convert`: a chain flattened into a new standalone image, qcow2 (plain or compressed) or
//! sparse raw. Every byte goes through the copy engine ([`super::copy`]).

use super::copy::sinks::{
    compress_window, CompressedSink, CopyStats, HostWriter, NewImageSink, Progress, RawSink,
    RawWriter, WriteObserver,
};
use super::copy::source::read_data_window;
use super::copy::{self, NoWriter, Plan};
use crate::chain::Chain;
use crate::create::{init_qcow2, CreateOptions};
use crate::error::{IoContext, Result};
use crate::image::Qcow2;
use crate::ops::throttle::Throttle;
use crate::storage::{PendingFile, Storage};
use std::path::Path;
use std::sync::Arc;

/// Granularity at which all-zero data is left as a hole in raw output.
pub const ZERO_DETECT: u64 = 4096;

/// Writes the chain's guest content to `dest` as a sparse raw file.
pub fn to_raw(chain: &Chain, dest: &Path, overwrite: bool) -> Result<CopyStats> {
    let dest_s = dest.display().to_string();
    let out = PendingFile::new(dest, overwrite).on_file(&dest_s, "cannot create output")?;
    let storage = out
        .create_storage()
        .on_file(&dest_s, "cannot create output")?;
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let size = chain.virtual_size();
    let mut sink = RawSink {
        stats: CopyStats::default(),
    };
    let writer = RawWriter {
        storage: storage.clone(),
        path: dest_s.clone(),
    };
    copy::run(
        Plan::new(size, ZERO_DETECT),
        |p| p.fill(|w, buf| read_data_window(chain, w, buf, ZERO_DETECT, false)),
        &mut sink,
        writer,
    )?;
    storage.set_len(size).at(&dest_s, "setting length", size)?;
    drop(storage);
    out.commit().on_file(&dest_s, "cannot finish output")?;
    Ok(sink.stats)
}

/// Options of a conversion to qcow2.
#[derive(Debug, Clone, Default)]
pub struct Qcow2ConvertOptions {
    pub create: CreateOptions,
    /// Write every non-zero cluster compressed.
    pub compress: bool,
    pub overwrite: bool,
    /// Bytes per second, 0 = unlimited.
    pub rate_limit: u64,
    /// Let the output share the source's data blocks where the filesystem can (reflinks on
    /// XFS or btrfs): nearly no writing and no space, copy-on-write afterwards. Off, every
    /// byte gets blocks of its own (an independent copy). Ignored with `compress`.
    pub share_blocks: bool,
}

/// Flattens the chain into a new standalone qcow2 image: zero and unallocated ranges stay
/// unallocated, all-zero clusters are skipped, data is written in large runs.
pub fn to_qcow2(chain: &Chain, dest: &Path, opts: &Qcow2ConvertOptions) -> Result<CopyStats> {
    to_qcow2_observed(chain, dest, opts, &mut |_, _| {})
}

/// [`to_qcow2`], reporting every written run of guest data to `observer`.
pub fn to_qcow2_observed(
    chain: &Chain,
    dest: &Path,
    opts: &Qcow2ConvertOptions,
    observer: WriteObserver<'_>,
) -> Result<CopyStats> {
    let dest_s = dest.display().to_string();
    let out = PendingFile::new(dest, opts.overwrite).on_file(&dest_s, "cannot create output")?;
    let storage = out
        .create_storage()
        .on_file(&dest_s, "cannot create output")?;
    let mut copts = opts.create.clone();
    if copts.size == 0 {
        copts.size = chain.virtual_size();
    }
    let mut img = init_qcow2(
        Arc::new(storage),
        &out.tmp_path().display().to_string(),
        dest.parent(),
        &copts,
    )?;
    let stats = copy_into_observed(
        chain,
        &mut img,
        opts.compress,
        opts.share_blocks,
        &mut Throttle::new(opts.rate_limit),
        observer,
    )?;
    img.flush()?;
    drop(img);
    out.commit().on_file(&dest_s, "cannot finish output")?;
    Ok(stats)
}

/// Copies the chain's non-zero clusters into an empty image of at least the same size.
pub fn copy_into(
    chain: &Chain,
    img: &mut Qcow2,
    compress: bool,
    throttle: &mut Throttle,
) -> Result<CopyStats> {
    copy_into_observed(chain, img, compress, false, throttle, &mut |_, _| {})
}

/// [`copy_into`], reporting every written run of guest data to `observer`, in guest order;
/// `share_blocks` as in [`Qcow2ConvertOptions`]. `img` must be new (nothing allocated).
/// Readers map and read the source (never what maps as zeros) and find the non-zero
/// clusters; compressed copies compress them on the readers too, so both cores work.
pub fn copy_into_observed(
    chain: &Chain,
    img: &mut Qcow2,
    compress: bool,
    share_blocks: bool,
    throttle: &mut Throttle,
    observer: WriteObserver<'_>,
) -> Result<CopyStats> {
    let cs = img.cluster_size();
    let plan = Plan::new(chain.virtual_size().min(img.virtual_size()), cs);
    let progress = Progress {
        stats: CopyStats::default(),
        throttle,
        observer,
    };
    if compress {
        let kind = img.header().compression_type;
        let mut sink = CompressedSink {
            image: img,
            progress,
        };
        copy::run(
            plan,
            |p| {
                p.fill(|w, buf| {
                    let read = read_data_window(chain, w, buf, cs, false)?;
                    compress_window(w, read, buf, kind, cs)
                })
            },
            &mut sink,
            NoWriter,
        )?;
        return Ok(sink.progress.stats);
    }
    let writer = HostWriter::new(img, chain, share_blocks);
    let mut sink = NewImageSink {
        image: img,
        progress,
    };
    copy::run(
        plan,
        |p| p.fill(|w, buf| read_data_window(chain, w, buf, cs, share_blocks)),
        &mut sink,
        writer,
    )?;
    Ok(sink.progress.stats)
}

/// The chain's read check sees every byte a copy reads.
#[cfg(test)]
mod read_check_tests {
    use crate::chain::{Chain, ReadCheck, ResolvedRead};
    use crate::error::{Error, Result};
    use crate::ops::convert::copy_into;
    use crate::ops::throttle::Throttle;
    use crate::testutil::{chain_of, mem_image, read_all};
    use std::sync::{Arc, Mutex};

    const K: u64 = 1024;

    /// A read shown to the check: start, length, depth, allocated, data given.
    type Shown = (u64, u64, usize, bool, bool);

    /// Records what it is shown; refuses anything from layer `refuse_depth`.
    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<Shown>>,
        refuse_depth: Option<usize>,
    }

    impl ReadCheck for Recorder {
        fn check(&self, chain: &Chain, r: &ResolvedRead<'_>) -> Result<()> {
            if let Some(d) = r.data {
                assert_eq!(d.len() as u64, r.len);
                if r.allocated {
                    // What was read is what the layer alone holds there.
                    let mut alone = vec![0u8; r.len as usize];
                    chain.read_layer(r.depth, &mut alone, r.start)?;
                    assert!(alone == d);
                }
            }
            if self.refuse_depth == Some(r.depth) && r.allocated {
                return Err(Error::invalid("layer", "refused"));
            }
            self.seen.lock().unwrap().push((
                r.start,
                r.len,
                r.depth,
                r.allocated,
                r.data.is_some(),
            ));
            Ok(())
        }
    }

    /// base: data in clusters 0-2, a zero cluster at 3; top: data in cluster 1.
    fn two_layers() -> Chain {
        let (mut base, _) = mem_image(512 * K, 64 * K, false);
        base.write_at(&vec![1; 192 * K as usize], 0, None).unwrap();
        base.write_zeroes(192 * K, 64 * K, false, None).unwrap();
        let (mut top, _) = mem_image(512 * K, 64 * K, false);
        top.write_at(&vec![2; 64 * K as usize], 64 * K, None)
            .unwrap();
        chain_of(vec![top, base])
    }

    #[test]
    fn a_copy_shows_every_byte_to_the_read_check_with_the_layer_it_came_from() {
        let mut chain = two_layers();
        let expected = read_all(&chain);
        let check = Arc::new(Recorder::default());
        chain.set_read_check(check.clone());
        let (mut out, _) = mem_image(512 * K, 64 * K, false);
        copy_into(&chain, &mut out, false, &mut Throttle::new(0)).unwrap();
        let mut seen = check.seen.lock().unwrap().clone();
        seen.sort();
        seen.dedup();
        // Every byte is accounted for, each by the layer that resolves it.
        let mut pos = 0;
        for &(start, len, depth, allocated, _) in &seen {
            assert!(start <= pos, "{seen:?}");
            let (want_depth, want_alloc) = match start {
                s if s < 64 * K => (1, true),
                s if s < 128 * K => (0, true),
                s if s < 256 * K => (1, true),
                _ => (1, false),
            };
            assert_eq!((depth, allocated), (want_depth, want_alloc), "{seen:?}");
            pos = pos.max(start + len);
        }
        assert_eq!(pos, 512 * K);
        // Data was read and shown; the zero cluster and the hole were shown unread.
        assert!(seen.iter().any(|s| s.0 == 192 * K && !s.4));
        assert_eq!(read_all(&chain), expected);
    }

    #[test]
    fn a_failed_check_fails_the_read_and_the_copy() {
        let mut chain = two_layers();
        chain.set_read_check(Arc::new(Recorder {
            refuse_depth: Some(1),
            ..Default::default()
        }));
        let mut buf = vec![0u8; 4096];
        chain.read_at(&mut buf, 64 * K).unwrap();
        let e = chain.read_at(&mut buf, 0).unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        let (mut out, _) = mem_image(512 * K, 64 * K, false);
        let e = copy_into(&chain, &mut out, false, &mut Throttle::new(0)).unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
    }
}
