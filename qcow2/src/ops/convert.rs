//! `convert`: a chain flattened into a new standalone image, qcow2 (plain or compressed) or
//! sparse raw. Every byte goes through the copy engine ([`super::copy`]).

use super::copy::sinks::{
    compress_window, CompressedSink, CopyStats, HostWriter, InPlaceRawWriter, NewImageSink,
    Progress, RawSink, RawWriter, StreamWriter, WriteObserver,
};
use super::copy::source::read_data_window;
use super::copy::{self, NoWriter, Plan, WindowSet};
use crate::chain::Chain;
use crate::create::{init_qcow2, CreateOptions};
use crate::device::{InPlaceKind, InPlaceTarget};
use crate::error::{IoContext, Result};
use crate::image::Qcow2;
use crate::ops::map::for_each_extent;
use crate::ops::throttle::Throttle;
use crate::storage::{PendingFile, Storage};
use std::path::Path;
use std::sync::Arc;

/// Granularity at which all-zero data is left as a hole in raw output.
pub const ZERO_DETECT: u64 = 4096;

/// Where raw output goes.
pub enum RawOutput<'a> {
    /// A new sparse file, written under a temporary name and renamed when complete: what
    /// reads as zero stays a hole.
    NewFile { dest: &'a Path, overwrite: bool },
    /// Over an existing device or file: the data written, what reads as zero zeroed by range
    /// (unless `zero` is off, for a target known to be all zeros), flushed at the end. A
    /// file is first resized to the disk's size.
    InPlace {
        target: &'a InPlaceTarget,
        zero: bool,
    },
    /// The whole disk in guest order, zeros included (a pipe, standard output).
    Stream {
        out: &'a mut (dyn std::io::Write + Send),
        name: String,
    },
}

/// Writes the chain's guest content to `dest` as a sparse raw file.
pub fn to_raw(chain: &Chain, dest: &Path, overwrite: bool) -> Result<CopyStats> {
    to_raw_observed(
        chain,
        RawOutput::NewFile { dest, overwrite },
        &mut Throttle::new(0),
        &mut |_, _| {},
    )
}

/// Writes the chain's guest content as a raw image to `output`, reporting every written
/// run of guest data to `observer`, in guest order.
pub fn to_raw_observed(
    chain: &Chain,
    output: RawOutput<'_>,
    throttle: &mut Throttle,
    observer: WriteObserver<'_>,
) -> Result<CopyStats> {
    let size = chain.virtual_size();
    let plan = Plan::new(size, ZERO_DETECT);
    let read = |p: &mut copy::Pieces<'_, _>| {
        p.fill(|w, buf| read_data_window(chain, w, buf, ZERO_DETECT, false))
    };
    let mut sink = RawSink {
        progress: Progress {
            stats: CopyStats::default(),
            throttle,
            observer,
        },
    };
    // Only windows with data are copied: a new file reads as zeros where nothing is
    // written, and the other writers zero (or stream zeros for) what lies between.
    let windows = data_windows(chain, &plan)?;
    match output {
        RawOutput::NewFile { dest, overwrite } => {
            let dest_s = dest.display().to_string();
            let out = PendingFile::new(dest, overwrite).on_file(&dest_s, "cannot create output")?;
            let storage = out
                .create_storage()
                .on_file(&dest_s, "cannot create output")?
                .with_direct_writes();
            let storage: Arc<dyn Storage> = Arc::new(storage);
            let writer = RawWriter {
                storage: storage.clone(),
                path: dest_s.clone(),
            };
            copy::run(plan, &windows, read, &mut sink, writer)?;
            storage.set_len(size).at(&dest_s, "setting length", size)?;
            drop(storage);
            out.commit().on_file(&dest_s, "cannot finish output")?;
        }
        RawOutput::InPlace { target, zero } => {
            let path = target.display();
            let storage: Arc<dyn Storage> = target.storage.clone();
            if target.kind == InPlaceKind::RegularFile {
                storage.set_len(size).at(&path, "resizing", size)?;
            }
            let mut writer = InPlaceRawWriter::new(storage.clone(), path.clone(), zero);
            copy::run(plan, &windows, read, &mut sink, &mut writer)?;
            writer.finish(size)?;
            storage.flush().at(&path, "flushing", 0)?;
            sink.progress.stats.bytes_zeroed = writer.zeroed;
        }
        RawOutput::Stream { out, name } => {
            let mut writer = StreamWriter::new(&mut *out, name);
            copy::run(plan, &windows, read, &mut sink, &mut writer)?;
            writer.finish(size)?;
        }
    }
    Ok(sink.progress.stats)
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
        .on_file(&dest_s, "cannot create output")?
        .with_direct_writes();
    let tmp = out.tmp_path().display().to_string();
    let stats = write_qcow2(
        chain,
        Arc::new(storage),
        &tmp,
        dest.parent(),
        opts,
        opts.share_blocks,
        observer,
    )?;
    out.commit().on_file(&dest_s, "cannot finish output")?;
    Ok(stats)
}

/// Creates a qcow2 image of the chain's size (or `opts`') in `storage` and copies the chain
/// into it, flushed: the body of every conversion to qcow2.
fn write_qcow2(
    chain: &Chain,
    storage: Arc<dyn Storage>,
    path: &str,
    dir: Option<&Path>,
    opts: &Qcow2ConvertOptions,
    share_blocks: bool,
    observer: WriteObserver<'_>,
) -> Result<CopyStats> {
    let mut copts = opts.create.clone();
    if copts.size == 0 {
        copts.size = chain.virtual_size();
    }
    let mut img = init_qcow2(storage, path, dir, &copts)?;
    let stats = copy_into_observed(
        chain,
        &mut img,
        opts.compress,
        share_blocks,
        &mut Throttle::new(opts.rate_limit),
        observer,
    )?;
    img.flush()?;
    Ok(stats)
}

/// Writes the chain as a new qcow2 image over an existing device or file (qcow2 on LVM, as
/// oVirt and Proxmox keep disks): a file is emptied first; a device keeps what lies past the
/// image's end, which nothing reads. The caller checked that the device is big enough
/// ([`qcow2_size_bound`]).
pub fn to_qcow2_in_place_observed(
    chain: &Chain,
    target: &InPlaceTarget,
    opts: &Qcow2ConvertOptions,
    observer: WriteObserver<'_>,
) -> Result<CopyStats> {
    let path = target.display();
    let storage: Arc<dyn Storage> = target.storage.clone();
    if target.kind == InPlaceKind::RegularFile {
        storage.set_len(0).at(&path, "emptying", 0)?;
    }
    let dir = target.path.parent();
    let stats = write_qcow2(chain, storage.clone(), &path, dir, opts, false, observer)?;
    storage.flush().at(&path, "flushing", 0)?;
    Ok(stats)
}

/// An upper bound of the host bytes a qcow2 copy of `chain` created with `opts` takes
/// (uncompressed): every cluster holding data in the chain, its L2 tables, the L1
/// table, refcount structures, the header, and room for the refcount table to move as it
/// grows. What a device must hold for [`to_qcow2_in_place_observed`].
pub fn qcow2_size_bound(chain: &Chain, opts: &CreateOptions) -> Result<u64> {
    let cs = opts.cluster_size;
    let size = chain.virtual_size().max(opts.size);
    let l2_entry = if opts.extended_l2 { 16 } else { 8 };
    let per_l2 = cs / l2_entry * cs;
    let mut data_clusters = 0u64;
    let mut l2_tables = 0u64;
    let (mut last_cluster, mut last_l2) = (u64::MAX, u64::MAX);
    for_each_extent(chain, |e| {
        if e.reads_as_zero() {
            return;
        }
        let (first, last) = (e.start / cs, (e.end() - 1) / cs);
        data_clusters += last - first + 1 - u64::from(first == last_cluster);
        last_cluster = last;
        let (l2_first, l2_last) = (e.start / per_l2, (e.end() - 1) / per_l2);
        l2_tables += l2_last - l2_first + 1 - u64::from(l2_first == last_l2);
        last_l2 = l2_last;
    })?;
    let l1_clusters = (size.div_ceil(per_l2) * 8).div_ceil(cs);
    let mut clusters = 1 + l1_clusters + l2_tables + data_clusters;
    let per_block = cs * 8 / u64::from(opts.refcount_bits.max(1));
    // Refcount blocks and table cover themselves too: iterate to a fixed point.
    let mut meta = 0;
    loop {
        let total = clusters + meta;
        let blocks = total.div_ceil(per_block);
        let table = (blocks * 8).div_ceil(cs);
        // The table moves when it grows and its old place is freed later: count it twice.
        let want = blocks + 2 * table + 2;
        if want <= meta {
            break;
        }
        meta = want;
    }
    clusters += meta;
    Ok(clusters * cs)
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
            &data_windows(chain, &plan)?,
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
        &data_windows(chain, &plan)?,
        |p| p.fill(|w, buf| read_data_window(chain, w, buf, cs, share_blocks)),
        &mut sink,
        writer,
    )?;
    Ok(sink.progress.stats)
}

/// The windows of `plan` that touch data (plain or compressed) in `chain`: a copy into a
/// new image needs no others, as everything else reads as zeros. Found from the mapping,
/// a gigabyte at a time, so an empty stretch of many TiB costs a few map calls and no
/// window hand-offs.
fn data_windows(chain: &Chain, plan: &Plan) -> Result<WindowSet> {
    let mut set = WindowSet::default();
    for_each_extent(chain, |e| {
        if !e.reads_as_zero() {
            set.add_bytes(plan, e.start, e.end().min(plan.size));
        }
    })?;
    Ok(set)
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

/// Raw output over existing targets and to streams equals the chain, whatever was there.
#[cfg(test)]
mod raw_output_tests {
    use crate::chain::Chain;
    use crate::create::CreateOptions;
    use crate::device::open_in_place;
    use crate::ops::convert::{
        qcow2_size_bound, to_qcow2_in_place_observed, to_raw_observed, Qcow2ConvertOptions,
        RawOutput,
    };
    use crate::ops::throttle::Throttle;
    use crate::testutil::{chain_of, mem_image, read_all};
    use crate::{OpenOptions, Qcow2};

    const K: u64 = 1024;
    const SIZE: u64 = 9 * 1024 * K + 512;

    /// Data, a zero cluster, data again past the first window, unallocated elsewhere, and
    /// a tail that ends mid-cluster.
    fn chain() -> Chain {
        let (mut base, _) = mem_image(SIZE, 64 * K, false);
        base.write_at(&vec![1; 300 * K as usize], 0, None).unwrap();
        base.write_at(&vec![3; 4096], SIZE - 4096, None).unwrap();
        let (mut top, _) = mem_image(SIZE, 64 * K, false);
        top.write_zeroes(64 * K, 64 * K, false, None).unwrap();
        top.write_at(&vec![2; 8192], 5 * 1024 * K + 4096, None)
            .unwrap();
        chain_of(vec![top, base])
    }

    #[test]
    fn in_place_over_a_dirty_file_equals_the_chain_and_zeroes_the_rest() {
        let chain = chain();
        let model = read_all(&chain);
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("disk.raw");
        // Longer than the disk, full of 0xFF: resized, and every zero range zeroed.
        std::fs::write(&p, vec![0xFF; (SIZE + 3 * 4096) as usize]).unwrap();
        let target = open_in_place(&p, SIZE).unwrap();
        let mut seen = 0u64;
        let stats = to_raw_observed(
            &chain,
            RawOutput::InPlace {
                target: &target,
                zero: true,
            },
            &mut Throttle::new(0),
            &mut |_, d| seen += d.len() as u64,
        )
        .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), model);
        assert_eq!(stats.bytes_written, seen);
        assert_eq!(stats.bytes_written + stats.bytes_zeroed, SIZE);
        // Told the target is zero already: the 0xFF stays where the disk reads zeros.
        std::fs::write(&p, vec![0xFF; SIZE as usize]).unwrap();
        let target = open_in_place(&p, SIZE).unwrap();
        let out = RawOutput::InPlace {
            target: &target,
            zero: false,
        };
        to_raw_observed(&chain, out, &mut Throttle::new(0), &mut |_, _| {}).unwrap();
        let got = std::fs::read(&p).unwrap();
        let k = K as usize;
        assert!(got[..64 * k] == model[..64 * k]);
        assert!(got[128 * k..300 * k] == model[128 * k..300 * k]);
        assert_eq!((got[64 * k + 1], got[400 * k]), (0xFF, 0xFF));
    }

    #[test]
    fn a_stream_carries_the_whole_disk_in_order() {
        let chain = chain();
        let mut out = Vec::new();
        let stats = to_raw_observed(
            &chain,
            RawOutput::Stream {
                out: &mut out,
                name: "stdout".into(),
            },
            &mut Throttle::new(0),
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(out, read_all(&chain));
        assert!(stats.bytes_written < SIZE / 4);
    }

    /// Windows without data are skipped by the copy: the in-place and stream writers must
    /// still zero (or write zeros for) them, between windows and after the last one.
    #[test]
    fn skipped_windows_are_zeros_in_place_and_in_streams() {
        const MIB: u64 = 1024 * K;
        let size = 17 * MIB + 512; // five 4 MiB windows, the last short
        let layouts: [&[u64]; 4] = [
            &[0, 16 * MIB],         // data in the first and last windows only
            &[5 * MIB],             // data in the second window only: a tail to zero
            &[],                    // no data at all
            &[13 * MIB - 4096 * 2], // data ending a window, the next ones empty
        ];
        for data_at in layouts {
            let (mut img, _) = mem_image(size, 64 * K, false);
            for &at in data_at {
                img.write_at(&vec![7; 8192], at, None).unwrap();
            }
            let chain = chain_of(vec![img]);
            let model = read_all(&chain);
            let tmp = tempfile::tempdir().unwrap();
            let p = tmp.path().join("disk.raw");
            std::fs::write(&p, vec![0xFF; size as usize]).unwrap();
            let target = open_in_place(&p, size).unwrap();
            let out = RawOutput::InPlace {
                target: &target,
                zero: true,
            };
            let stats =
                to_raw_observed(&chain, out, &mut Throttle::new(0), &mut |_, _| {}).unwrap();
            assert!(
                std::fs::read(&p).unwrap() == model,
                "in place, data at {data_at:?}"
            );
            assert_eq!(stats.bytes_written + stats.bytes_zeroed, size);
            let mut stream = Vec::new();
            let out = RawOutput::Stream {
                out: &mut stream,
                name: "stdout".into(),
            };
            to_raw_observed(&chain, out, &mut Throttle::new(0), &mut |_, _| {}).unwrap();
            assert!(stream == model, "stream, data at {data_at:?}");
        }
    }

    #[test]
    fn a_closed_stream_is_said_plainly() {
        struct Closed;
        impl std::io::Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let e = to_raw_observed(
            &chain(),
            RawOutput::Stream {
                out: &mut Closed,
                name: "standard output".into(),
            },
            &mut Throttle::new(0),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("the reader closed the stream"),
            "{e}"
        );
    }

    #[test]
    fn qcow2_in_place_over_a_dirty_file_reads_as_the_chain_within_its_bound() {
        let chain = chain();
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("disk.qcow2");
        std::fs::write(&p, vec![0xFF; 4 << 20]).unwrap();
        let target = open_in_place(&p, 0).unwrap();
        let opts = Qcow2ConvertOptions::default();
        to_qcow2_in_place_observed(&chain, &target, &opts, &mut |_, _| {}).unwrap();
        let bound = qcow2_size_bound(&chain, &CreateOptions::default()).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len <= bound, "{len} > {bound}");
        let back = Chain::open(&p, &OpenOptions::default()).unwrap();
        assert_eq!(read_all(&back), read_all(&chain));
        let img = Qcow2::open(&p).unwrap();
        let r = crate::check::check(&img).unwrap();
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0));
    }
}
