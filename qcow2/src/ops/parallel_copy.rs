//! Copying a chain into a new image with both cores: two readers, one planner, one writer.
//!
//! Two workers take alternate windows of the guest disk. Each maps its window, reads what
//! may hold data (never what maps as zeros), finds the non-zero clusters and hands the
//! window to the planner. The planner — the only owner of the output image — takes windows
//! in guest order, allocates their clusters (metadata only), reports the data to the
//! observer, and passes the window to the writer with the host offsets to write it to; the
//! writer hands the buffer back to its worker. There is one writer because writes to one
//! file serialise on its inode lock (tmpfs, ext4 and XFS buffered writes alike): a second
//! writer only spins on the lock, while reading in parallel with writing is free.
//!
//! Where source and output are on a filesystem that can share blocks (XFS, btrfs), the
//! writer clones data runs instead of writing them: the output then costs neither the write
//! nor the space. The data is still read, for zero detection and the observer (manifest).

use super::convert::{data_clusters_of, nonzero_runs, RawConvertStats, WriteObserver, IO_CHUNK};
use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::image::Qcow2;
use crate::mapping::ExtentKind;
use crate::ops::throttle::Throttle;
use crate::storage::{clone_range, CloneOutcome, Storage};
use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

const WORKERS: usize = 2;
/// Ranges a layer may have refused to share in a row before the writer stops asking.
const MAX_REFUSED_IN_A_ROW: u32 = 64;
/// Buffers each worker owns; they circulate worker -> planner -> writer -> worker.
const BUFFERS_PER_WORKER: usize = 2;

/// A window read by a worker, with its non-zero runs (byte positions in `data`).
struct Window {
    index: usize,
    offset: u64,
    data: Vec<u8>,
    runs: Vec<(usize, usize)>,
    sources: Vec<Source>,
    worker: usize,
}

/// Where a stretch of a window was read from verbatim (an uncompressed data extent), so
/// the writer can clone it instead of writing it. Sorted by `pos`, disjoint.
struct Source {
    /// Position in the window's data.
    pos: usize,
    len: usize,
    layer: usize,
    host: u64,
}

/// A window on its way to the writer: where each run of it goes in the output.
struct WriteJob {
    data: Vec<u8>,
    /// (position in `data`, host offset, length)
    writes: Vec<(usize, u64, usize)>,
    sources: Vec<Source>,
    worker: usize,
}

/// Copies the chain's non-zero clusters into `img`, which must be new (no cluster
/// allocated), reporting every written run of guest data to `observer` in guest order.
/// With `share_blocks`, data runs are cloned from the source where the filesystem can.
pub fn copy_into_new(
    chain: &Chain,
    img: &mut Qcow2,
    share_blocks: bool,
    throttle: &mut Throttle,
    observer: WriteObserver<'_>,
) -> Result<RawConvertStats> {
    let cs = img.cluster_size();
    let size = chain.virtual_size().min(img.virtual_size());
    let window = (IO_CHUNK as u64).max(cs);
    let windows = size.div_ceil(window) as usize;
    let geometry = Geometry {
        window,
        cluster: cs,
        size,
    };
    let storage = img.storage().clone();
    let out_path = img.path().to_string();
    let (to_planner, from_workers) = sync_channel::<Result<Window>>(WORKERS * BUFFERS_PER_WORKER);
    let mut stats = RawConvertStats::default();
    let mut spare_senders: Vec<SyncSender<Vec<u8>>> = Vec::new();
    let mut spare_receivers: Vec<Receiver<Vec<u8>>> = Vec::new();
    for _ in 0..WORKERS {
        let (tx, rx) = sync_channel::<Vec<u8>>(BUFFERS_PER_WORKER);
        for _ in 0..BUFFERS_PER_WORKER {
            let _ = tx.send(vec![0u8; window as usize]);
        }
        spare_senders.push(tx);
        spare_receivers.push(rx);
    }
    let (to_writer, writer_jobs) = sync_channel::<WriteJob>(WORKERS * BUFFERS_PER_WORKER);
    std::thread::scope(|scope| -> Result<()> {
        for (w, spare) in spare_receivers.into_iter().enumerate() {
            let to_planner = to_planner.clone();
            scope.spawn(move || {
                let res = read_windows(chain, w, geometry, share_blocks, spare, &to_planner);
                if let Err(e) = res {
                    let _ = to_planner.send(Err(e));
                }
            });
        }
        drop(to_planner);
        let out_path = out_path.as_str();
        let writer = scope.spawn(move || {
            write_windows(
                chain,
                share_blocks,
                &storage,
                out_path,
                writer_jobs,
                spare_senders,
            )
        });
        let planned = plan_windows(
            img,
            windows,
            from_workers,
            to_writer,
            throttle,
            observer,
            &mut stats,
        );
        // The writer ends once the planner has dropped its sender: every planned window is
        // then in the file, before the caller flushes the metadata. A write error (ENOSPC,
        // say) is the cause of a planner that stopped early, so it is reported first.
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::Request("copy: the writer thread panicked".into())));
        written.and(planned)
    })?;
    Ok(stats)
}

/// How a copy cuts the disk: window and cluster size, bytes to copy.
#[derive(Clone, Copy)]
struct Geometry {
    window: u64,
    cluster: u64,
    size: u64,
}

/// A worker: reads its windows (every `WORKERS`th) into spare buffers and sends them on;
/// with `share_blocks`, notes where each window's data came from verbatim.
fn read_windows(
    chain: &Chain,
    first: usize,
    geometry: Geometry,
    share_blocks: bool,
    spare: Receiver<Vec<u8>>,
    to_planner: &SyncSender<Result<Window>>,
) -> Result<()> {
    let Geometry {
        window,
        cluster: cs,
        size,
    } = geometry;
    let mut index = first;
    while (index as u64) * window < size {
        // No spare buffer comes back once the writer has stopped.
        let Ok(mut data) = spare.recv() else {
            return Ok(());
        };
        let offset = index as u64 * window;
        let n = window.min(size - offset);
        let extents = chain.map(offset, n)?;
        let sources: Vec<Source> = if share_blocks {
            extents
                .iter()
                .filter_map(|e| match e.kind {
                    ExtentKind::Data { host } => Some(Source {
                        pos: (e.start - offset) as usize,
                        len: e.len as usize,
                        layer: e.depth,
                        host,
                    }),
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (s, t) in data_clusters_of(&extents, offset, n, cs) {
            let (a, b) = ((s - offset) as usize, (t - offset) as usize);
            chain.read_mapped(&extents, &mut data[a..b], s)?;
            for (x, y) in nonzero_runs(&data[a..b], cs as usize) {
                match runs.last_mut() {
                    Some(last) if last.1 == a + x => last.1 = a + y,
                    _ => runs.push((a + x, a + y)),
                }
            }
        }
        let win = Window {
            index,
            offset,
            data,
            runs,
            sources,
            worker: first,
        };
        if to_planner.send(Ok(win)).is_err() {
            return Ok(()); // the planner stopped
        }
        index += WORKERS;
    }
    Ok(())
}

/// The planner: windows in guest order, clusters allocated, data reported, jobs to the
/// writer. Consumes its channels, so workers blocked on them wake up when it returns.
fn plan_windows(
    img: &mut Qcow2,
    windows: usize,
    from_workers: Receiver<Result<Window>>,
    to_writer: SyncSender<WriteJob>,
    throttle: &mut Throttle,
    observer: WriteObserver<'_>,
    stats: &mut RawConvertStats,
) -> Result<()> {
    let mut waiting: BTreeMap<usize, Window> = BTreeMap::new();
    let mut next = 0usize;
    while next < windows {
        let win = from_workers
            .recv()
            .map_err(|_| Error::Request("copy: a worker stopped unexpectedly".into()))??;
        waiting.insert(win.index, win);
        while let Some(win) = waiting.remove(&next) {
            let mut writes = Vec::new();
            for &(a, b) in &win.runs {
                let guest = win.offset + a as u64;
                for (g, host, len) in img.allocate_for_write(guest, (b - a) as u64)? {
                    writes.push(((g - win.offset) as usize, host, len as usize));
                }
                observer(guest, &win.data[a..b]);
                stats.bytes_written += (b - a) as u64;
                throttle.account((b - a) as u64);
            }
            let job = WriteJob {
                data: win.data,
                writes,
                sources: win.sources,
                worker: win.worker,
            };
            if to_writer.send(job).is_err() {
                // The writer stopped on an error, which the caller reports.
                return Err(Error::Request("copy: the writer stopped".into()));
            }
            next += 1;
        }
    }
    Ok(())
}

/// The writer: every job's runs at their host offsets (cloned from the source where the
/// filesystem can, written otherwise), each buffer back to its worker.
fn write_windows(
    chain: &Chain,
    share_blocks: bool,
    storage: &Arc<dyn Storage>,
    out_path: &str,
    jobs: Receiver<WriteJob>,
    spare: Vec<SyncSender<Vec<u8>>>,
) -> Result<()> {
    // Per source layer: may its blocks be shared with the output? Cleared at the first
    // refusal, so a filesystem without reflinks costs one failed call per layer.
    let mut may_clone = vec![share_blocks; chain.layers().len()];
    // Ranges refused in a row per layer: a source whose clusters are smaller than the
    // filesystem's blocks (512-byte clusters, say) is refused every time; stop asking.
    let mut refused = vec![0u32; chain.layers().len()];
    let write = |data: &[u8], host: u64| {
        storage
            .write_at(data, host)
            .map_err(|e| Error::io(out_path, "writing data", host, e))
    };
    for job in jobs {
        for &(pos, host, len) in &job.writes {
            let end = pos + len;
            if !may_clone.iter().any(|&m| m) {
                write(&job.data[pos..end], host)?;
                continue;
            }
            // Walk the run: clone what comes verbatim from a source, write the rest (in
            // one write per stretch between clones).
            let mut unwritten = pos;
            for src in &job.sources {
                let (s, e) = (src.pos.max(pos), (src.pos + src.len).min(end));
                if s >= e || !may_clone[src.layer] {
                    continue;
                }
                let from = src.host + (s - src.pos) as u64;
                let to = host + (s - pos) as u64;
                let layer = chain.layers()[src.layer].data_storage();
                match clone_range(layer.as_ref(), from, storage.as_ref(), to, (e - s) as u64)
                    .map_err(|err| Error::io(out_path, "cloning data", to, err))?
                {
                    CloneOutcome::Cloned => {
                        refused[src.layer] = 0;
                        if unwritten < s {
                            write(&job.data[unwritten..s], host + (unwritten - pos) as u64)?;
                        }
                        unwritten = e;
                    }
                    CloneOutcome::NotThisRange => {
                        refused[src.layer] += 1;
                        if refused[src.layer] >= MAX_REFUSED_IN_A_ROW {
                            may_clone[src.layer] = false;
                        }
                    }
                    CloneOutcome::Unsupported => may_clone[src.layer] = false,
                }
            }
            if unwritten < end {
                write(&job.data[unwritten..end], host + (unwritten - pos) as u64)?;
            }
        }
        // A worker that has read all its windows no longer listens.
        let _ = spare[job.worker].send(job.data);
    }
    Ok(())
}
