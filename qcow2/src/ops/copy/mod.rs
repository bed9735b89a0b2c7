//! The copy engine: every bulk copy (convert, merge, commit, compressed copies) is readers →
//! sink over a guest disk cut into windows.
//!
//! - **Readers** (a parameter, two by default: one per core) take alternate windows. Each
//!   fills a buffer from its own small pool with what the window holds and describes it (an
//!   item of the copy's own type: the non-zero runs, the changes above a layer, compressed
//!   clusters). A reader that waits for its buffer to come back cannot hold up the others,
//!   so windows always arrive.
//! - **The sink's plan step** runs on the calling thread and sees the windows in guest
//!   order: it owns the output's metadata (allocating clusters, say), accounts and observes
//!   the data, and returns the job for the writer.
//! - **The writer** ([`JobWriter`]) runs on one thread of its own, in the same order, and
//!   hands each buffer back to its reader. One writer, because writes to one file serialise
//!   on its inode lock anyway, while reading in parallel with writing is free.
//!
//! First error wins: whichever stage fails first records its error, the others stop at their
//! next step (channels closing wake every blocked stage), and that error is returned.
//! Memory is bounded by `readers × BUFFERS_PER_READER` windows.

pub mod sinks;
pub mod source;

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

/// Largest piece read and written at once, and the default window.
pub const IO_CHUNK: usize = 4 << 20;
/// Readers when the caller has no reason to choose: one per core of the machines we target.
pub const DEFAULT_READERS: usize = 2;
/// Buffers each reader owns; they go reader → plan → writer → reader.
const BUFFERS_PER_READER: usize = 2;

/// How a copy cuts the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Guest bytes to copy, from offset 0.
    pub size: u64,
    /// Window length (a multiple of the output's cluster size).
    pub window: u64,
    pub readers: usize,
}

impl Plan {
    /// `IO_CHUNK` windows (at least one cluster), the default readers.
    pub fn new(size: u64, cluster_size: u64) -> Plan {
        Plan {
            size,
            window: (IO_CHUNK as u64).max(cluster_size),
            readers: DEFAULT_READERS,
        }
    }

    pub fn windows(&self) -> usize {
        self.size.div_ceil(self.window) as usize
    }

    pub fn window(&self, index: usize) -> Window {
        let offset = index as u64 * self.window;
        Window {
            index,
            offset,
            len: self.window.min(self.size - offset),
        }
    }
}

/// One window of the disk: `[offset, offset+len)`, the `index`th in guest order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub index: usize,
    pub offset: u64,
    pub len: u64,
}

impl Window {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Where a copy's windows go: the plan step, on the calling thread in guest order.
pub trait Sink<T> {
    /// What the writer thread does with one window.
    type Job: Send;
    /// Takes the window's item and data (the reader's buffer, `window.len` bytes) and
    /// returns the writer's job.
    fn plan(&mut self, window: Window, item: T, data: &[u8]) -> Result<Self::Job>;
}

/// The write step of a sink, on the engine's writer thread, in guest order.
pub trait JobWriter<J>: Send {
    fn write(&mut self, job: J, data: &[u8]) -> Result<()>;
}

/// A writer with nothing to do: for sinks whose plan step writes (commit writes through the
/// image's own write path, which needs the image mutably).
pub struct NoWriter;

impl JobWriter<()> for NoWriter {
    fn write(&mut self, _: (), _: &[u8]) -> Result<()> {
        Ok(())
    }
}

/// The first error of any stage; later ones are consequences of it.
struct FirstError(Mutex<Option<Error>>);

impl FirstError {
    fn set(&self, e: Error) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    }

    fn take(&self) -> Option<Error> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

struct Filled<T> {
    window: Window,
    item: T,
    data: Vec<u8>,
    reader: usize,
}

struct Job<J> {
    job: J,
    data: Vec<u8>,
    reader: usize,
}

/// Copies the windows of `plan`: `read` fills each window's buffer (on the reader threads)
/// and describes it, `sink` plans it in guest order, `writer` writes it. Returns the first
/// error of any stage.
pub fn run<T, S, W>(
    plan: Plan,
    read: impl Fn(Window, &mut [u8]) -> Result<T> + Sync,
    sink: &mut S,
    writer: W,
) -> Result<()>
where
    T: Send,
    S: Sink<T>,
    W: JobWriter<S::Job>,
{
    let readers = plan.readers.max(1);
    let windows = plan.windows();
    let first_error = FirstError(Mutex::new(None));
    let (to_planner, filled) = sync_channel::<Result<Filled<T>>>(readers * BUFFERS_PER_READER);
    let (to_writer, jobs) = sync_channel::<Job<S::Job>>(readers * BUFFERS_PER_READER);
    let mut spare_senders = Vec::new();
    let mut spare_receivers = Vec::new();
    for _ in 0..readers {
        let (tx, rx) = sync_channel::<Vec<u8>>(BUFFERS_PER_READER);
        for _ in 0..BUFFERS_PER_READER.min(windows) {
            let _ = tx.send(vec![0u8; plan.window as usize]);
        }
        spare_senders.push(tx);
        spare_receivers.push(rx);
    }
    std::thread::scope(|scope| {
        for (reader, spare) in spare_receivers.into_iter().enumerate() {
            let to_planner = to_planner.clone();
            let read = &read;
            scope.spawn(move || {
                let res = guarded("reader", || {
                    read_windows(plan, reader, readers, read, spare, &to_planner)
                });
                if let Err(e) = res {
                    // The planner may be waiting for this reader's window: tell it.
                    let _ = to_planner.send(Err(e));
                }
            });
        }
        drop(to_planner);
        let first = &first_error;
        scope.spawn(move || {
            if let Err(e) = guarded("writer", || write_jobs(writer, jobs, spare_senders)) {
                first.set(e);
            }
        });
        if let Err(e) = plan_windows(windows, filled, to_writer, sink) {
            first_error.set(e);
        }
        // Leaving the scope joins every thread: the planner's channels are closed, so the
        // writer drains what it has and ends, and readers find their channels closed.
    });
    match first_error.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Runs one stage's body, turning a panic into an error so the other stages are told (a
/// panicking thread would otherwise leave them waiting on it).
fn guarded(stage: &str, body: impl FnOnce() -> Result<()>) -> Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|_| {
        Err(Error::internal(
            "",
            format!("the copy's {stage} thread panicked"),
        ))
    })
}

/// A reader: windows `first`, `first + readers`, ... into its spare buffers.
fn read_windows<T>(
    plan: Plan,
    first: usize,
    readers: usize,
    read: &(impl Fn(Window, &mut [u8]) -> Result<T> + Sync),
    spare: Receiver<Vec<u8>>,
    to_planner: &SyncSender<Result<Filled<T>>>,
) -> Result<()> {
    for index in (first..plan.windows()).step_by(readers) {
        // No buffer comes back once the writer has stopped: then this reader ends quietly.
        let Ok(mut data) = spare.recv() else {
            return Ok(());
        };
        let window = plan.window(index);
        let item = read(window, &mut data[..window.len as usize])?;
        let filled = Filled {
            window,
            item,
            data,
            reader: first,
        };
        if to_planner.send(Ok(filled)).is_err() {
            return Ok(()); // the planner stopped; its error (or another's) is reported
        }
    }
    Ok(())
}

/// The plan step: windows put back in guest order, planned, passed to the writer.
/// Consumes its channels, so readers and writer blocked on them wake up when it returns.
fn plan_windows<T, S: Sink<T>>(
    windows: usize,
    filled: Receiver<Result<Filled<T>>>,
    to_writer: SyncSender<Job<S::Job>>,
    sink: &mut S,
) -> Result<()> {
    let mut waiting: BTreeMap<usize, Filled<T>> = BTreeMap::new();
    let mut next = 0usize;
    while next < windows {
        let Ok(f) = filled.recv() else {
            // Every reader has gone without sending all its windows: the writer stopped
            // (its error is recorded), so they had no buffers left.
            return Ok(());
        };
        let f = f?;
        waiting.insert(f.window.index, f);
        while let Some(f) = waiting.remove(&next) {
            let len = f.window.len as usize;
            let job = sink.plan(f.window, f.item, &f.data[..len])?;
            let job = Job {
                job,
                data: f.data,
                reader: f.reader,
            };
            if to_writer.send(job).is_err() {
                return Ok(()); // the writer failed; its error is recorded
            }
            next += 1;
        }
    }
    Ok(())
}

/// The writer: each job in order, each buffer back to its reader.
fn write_jobs<J, W: JobWriter<J>>(
    mut writer: W,
    jobs: Receiver<Job<J>>,
    spare: Vec<SyncSender<Vec<u8>>>,
) -> Result<()> {
    for job in jobs {
        let Job { job, data, reader } = job;
        writer.write(job, &data)?;
        // A reader that has read all its windows no longer listens.
        let _ = spare[reader].send(data);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
