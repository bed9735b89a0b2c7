//! Copying a chain into a new image with both cores: metadata planned on one thread, data
//! moved by two.
//!
//! Two workers take alternate windows of the guest disk. Each maps its window, reads what
//! may hold data (never what maps as zeros), finds the non-zero clusters and hands the
//! window to the planner. The planner — the only owner of the output image — takes windows
//! in guest order, allocates their clusters (metadata only), reports the data to the
//! observer, and gives each window back to its worker with the host offsets to write it to.
//! The worker writes it while it reads its next window. Reads and writes of both workers
//! overlap, which matters where copying bytes is what costs (tmpfs, page cache).

use super::convert::{data_clusters, nonzero_runs, RawConvertStats, WriteObserver, IO_CHUNK};
use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::image::Qcow2;
use crate::ops::throttle::Throttle;
use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

const WORKERS: usize = 2;
/// Windows a worker may have in flight (read, not yet written back).
const BUFFERS_PER_WORKER: usize = 2;

/// A window read by a worker, with its non-zero runs (byte positions in `data`).
struct Window {
    index: usize,
    offset: u64,
    data: Vec<u8>,
    runs: Vec<(usize, usize)>,
    worker: usize,
}

/// A window given back to its worker: where each run of it goes in the output.
struct WriteJob {
    data: Vec<u8>,
    /// (position in `data`, host offset, length)
    writes: Vec<(usize, u64, usize)>,
}

/// Copies the chain's non-zero clusters into `img`, which must be new (no cluster
/// allocated), reporting every written run of guest data to `observer` in guest order.
pub fn copy_into_new(
    chain: &Chain,
    img: &mut Qcow2,
    throttle: &mut Throttle,
    observer: WriteObserver<'_>,
) -> Result<RawConvertStats> {
    let cs = img.cluster_size();
    let size = chain.virtual_size().min(img.virtual_size());
    let window = (IO_CHUNK as u64).max(cs);
    let windows = size.div_ceil(window) as usize;
    let storage = img.storage().clone();
    let out_path = img.path().to_string();
    let (to_planner, from_workers) = sync_channel::<Result<Window>>(WORKERS * BUFFERS_PER_WORKER);
    let mut job_senders: Vec<SyncSender<WriteJob>> = Vec::new();
    let mut job_receivers: Vec<Receiver<WriteJob>> = Vec::new();
    for _ in 0..WORKERS {
        let (tx, rx) = sync_channel::<WriteJob>(BUFFERS_PER_WORKER);
        job_senders.push(tx);
        job_receivers.push(rx);
    }
    let mut stats = RawConvertStats::default();
    std::thread::scope(|scope| -> Result<()> {
        for (w, jobs) in job_receivers.into_iter().enumerate() {
            let to_planner = to_planner.clone();
            let storage = storage.clone();
            let out_path = out_path.as_str();
            scope.spawn(move || {
                let mut spare: Vec<Vec<u8>> = (0..BUFFERS_PER_WORKER)
                    .map(|_| vec![0u8; window as usize])
                    .collect();
                let mut in_flight = 0usize;
                let mut next = w;
                let res = (|| -> Result<()> {
                    while next < windows || in_flight > 0 {
                        // Write what came back; wait for it only when no buffer is free
                        // or nothing is left to read.
                        let job = if spare.is_empty() || next >= windows {
                            match jobs.recv() {
                                Ok(j) => Some(j),
                                Err(_) => return Ok(()), // the planner stopped
                            }
                        } else {
                            jobs.try_recv().ok()
                        };
                        if let Some(job) = job {
                            in_flight -= 1;
                            for &(pos, host, len) in &job.writes {
                                storage
                                    .write_at(&job.data[pos..pos + len], host)
                                    .map_err(|e| Error::io(out_path, "writing data", host, e))?;
                            }
                            spare.push(job.data);
                            continue;
                        }
                        let mut data = spare.pop().expect("a free buffer");
                        let offset = next as u64 * window;
                        let n = window.min(size - offset);
                        let mut runs: Vec<(usize, usize)> = Vec::new();
                        for (s, t) in data_clusters(chain, offset, n, cs)? {
                            let (a, b) = ((s - offset) as usize, (t - offset) as usize);
                            chain.read_at(&mut data[a..b], s)?;
                            for (x, y) in nonzero_runs(&data[a..b], cs as usize) {
                                match runs.last_mut() {
                                    Some(last) if last.1 == a + x => last.1 = a + y,
                                    _ => runs.push((a + x, a + y)),
                                }
                            }
                        }
                        let win = Window {
                            index: next,
                            offset,
                            data,
                            runs,
                            worker: w,
                        };
                        if to_planner.send(Ok(win)).is_err() {
                            return Ok(());
                        }
                        in_flight += 1;
                        next += WORKERS;
                    }
                    Ok(())
                })();
                if let Err(e) = res {
                    let _ = to_planner.send(Err(e));
                }
            });
        }
        drop(to_planner);
        // The planner: windows in guest order, clusters allocated, data reported.
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
                };
                // A worker that is gone has sent its error, which the next recv returns.
                let _ = job_senders[win.worker].send(job);
                next += 1;
            }
        }
        // Every job is sent; the workers finish their writes before the scope ends, so
        // the data is in the file before the caller flushes the metadata.
        drop(job_senders);
        // A write that failed after the last window was planned (ENOSPC, say) is reported
        // here.
        for r in from_workers.iter() {
            r?;
        }
        Ok(())
    })?;
    Ok(stats)
}
