//! The copy engine: every bulk copy (convert, merge, commit, compressed copies) is readers →
//! sink over a guest disk cut into windows.
//!
//! - **Readers** (a parameter, two by default: one per core) take alternate windows. For
//!   each, a reader fills buffers from its own small pool with what the window holds and
//!   sends them on as pieces, each with an item of the copy's own type describing it (the
//!   non-zero runs, the changes above a layer, compressed clusters). A window may need no
//!   piece at all (nothing to copy), one (its data at its own positions) or several (data
//!   packed from a window larger than a buffer). A reader waiting for its buffers to come
//!   back cannot hold up the others, so every window's pieces arrive.
//! - **The sink's plan step** runs on the calling thread and sees the pieces in guest
//!   order: it owns the output's metadata (allocating clusters, say), accounts and observes
//!   the data, and returns the job for the writer.
//! - **The writer** ([`JobWriter`]) runs on one thread of its own, in the same order, and
//!   hands each buffer back to its reader. One writer, because writes to one file serialise
//!   on its inode lock anyway, while reading in parallel with writing is free.
//!
//! First error wins: whichever stage fails first records its error, the others stop at their
//! next step (channels closing wake every blocked stage), and that error is returned.
//! Memory is bounded by `readers × BUFFERS_PER_READER` buffers. They are page-aligned
//! ([`AlignedBuf`]), so a writer can send them to the kernel with direct I/O as they are.

pub mod sinks;
pub mod source;

use crate::buffer::AlignedBuf;
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
    /// Bytes per buffer.
    pub buffer: usize,
    pub readers: usize,
}

impl Plan {
    /// `IO_CHUNK` windows (at least one cluster) and buffers of one window, the default
    /// readers: for readers that put a window's data at its own positions.
    pub fn new(size: u64, cluster_size: u64) -> Plan {
        let window = (IO_CHUNK as u64).max(cluster_size);
        Plan {
            size,
            window,
            buffer: window as usize,
            readers: DEFAULT_READERS,
        }
    }

    /// Windows of `window` bytes (buffers unchanged): for readers that pack sparse data,
    /// so one hand-off carries a buffer's worth of data rather than a window's few bytes.
    pub fn with_window(self, window: u64) -> Plan {
        Plan { window, ..self }
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

/// Where a copy's pieces go: the plan step, on the calling thread in guest order.
pub trait Sink<T> {
    /// What the writer thread does with one piece.
    type Job: Send;
    /// Takes a piece of `window`: its item and its buffer (`Plan::buffer` bytes, of which
    /// the item says what is filled), and returns the writer's job.
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

/// A reader's hand-off point for the pieces of one window.
pub struct Pieces<'a, T> {
    window: Window,
    /// The window's position among the windows copied (the order pieces are planned in).
    ord: usize,
    reader: usize,
    seq: usize,
    spare: &'a Receiver<AlignedBuf>,
    out: &'a SyncSender<Result<Message<T>>>,
    stopped: bool,
}

impl<T> Pieces<'_, T> {
    /// A buffer to fill; None once the copy is stopping (then the reader ends quietly:
    /// whoever stopped it reports why).
    pub fn buffer(&mut self) -> Option<AlignedBuf> {
        let b = self.spare.recv().ok();
        self.stopped |= b.is_none();
        b
    }

    /// Hands a filled buffer on, in this window's order; false once the copy is stopping.
    pub fn send(&mut self, item: T, data: AlignedBuf) -> bool {
        let piece = Message::Piece(Filled {
            window: self.window,
            ord: self.ord,
            seq: self.seq,
            item,
            data,
            reader: self.reader,
        });
        self.seq += 1;
        let sent = self.out.send(Ok(piece)).is_ok();
        self.stopped |= !sent;
        sent
    }

    /// The window these pieces are of.
    pub fn window(&self) -> Window {
        self.window
    }

    /// Whether a call found the copy stopping.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// One piece holding the window at its own positions: `read` fills the buffer's first
    /// `window.len` bytes.
    pub fn fill(&mut self, read: impl FnOnce(Window, &mut [u8]) -> Result<T>) -> Result<()> {
        let Some(mut data) = self.buffer() else {
            return Ok(());
        };
        let item = read(self.window, &mut data[..self.window.len as usize])?;
        self.send(item, data);
        Ok(())
    }
}

struct Filled<T> {
    window: Window,
    ord: usize,
    seq: usize,
    item: T,
    data: AlignedBuf,
    reader: usize,
}

enum Message<T> {
    Piece(Filled<T>),
    /// The `ord`th window's last piece was `seq - 1`.
    End {
        ord: usize,
        seq: usize,
    },
}

impl<T> Message<T> {
    fn key(&self) -> (usize, usize) {
        match self {
            Message::Piece(f) => (f.ord, f.seq),
            Message::End { ord, seq } => (*ord, *seq),
        }
    }
}

struct Job<J> {
    job: J,
    data: AlignedBuf,
    reader: usize,
}

/// Some of a plan's windows, ascending: runs of consecutive windows, so a sparse disk of
/// many TiB costs what its data costs, and a dense one a single run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowSet {
    /// `(first window, count)`, ascending, not touching.
    runs: Vec<(usize, usize)>,
    /// Windows before each run.
    before: Vec<usize>,
    len: usize,
}

impl WindowSet {
    /// Every window of `plan`.
    pub fn all(plan: &Plan) -> WindowSet {
        let mut set = WindowSet::default();
        set.push_range(0, plan.windows());
        set
    }

    /// Adds windows `first..first + count`; they must come after every window added.
    pub fn push_range(&mut self, first: usize, count: usize) {
        if count == 0 {
            return;
        }
        match self.runs.last_mut() {
            Some((f, c)) if *f + *c == first => *c += count,
            _ => {
                self.runs.push((first, count));
                self.before.push(self.len);
            }
        }
        self.len += count;
    }

    /// Adds the windows touching guest bytes `[start, end)` of `plan` (windows already
    /// added are not added twice; ranges must come in ascending order).
    pub fn add_bytes(&mut self, plan: &Plan, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let first = (start / plan.window) as usize;
        let last = (((end - 1) / plan.window) as usize).min(plan.windows().saturating_sub(1));
        let next = self.runs.last().map_or(0, |&(f, c)| f + c);
        let first = first.max(next);
        if first <= last {
            self.push_range(first, last - first + 1);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `ord`th window of the set (`ord < len`).
    pub fn nth(&self, ord: usize) -> usize {
        let run = self.before.partition_point(|&b| b <= ord) - 1;
        self.runs[run].0 + (ord - self.before[run])
    }
}

/// Copies the windows of `plan` that `set` holds ([`WindowSet::all`] for every one; fewer
/// for copies whose sink and writer need nothing of the others, which hold no data):
/// `read` fills buffers with each window's content and sends them as pieces (on the reader
/// threads), `sink` plans the pieces in guest order, `writer` writes them. Returns the
/// first error of any stage.
pub fn run<T, S, W>(
    plan: Plan,
    set: &WindowSet,
    read: impl Fn(&mut Pieces<'_, T>) -> Result<()> + Sync,
    sink: &mut S,
    writer: W,
) -> Result<()>
where
    T: Send,
    S: Sink<T>,
    W: JobWriter<S::Job>,
{
    let readers = plan.readers.max(1);
    let windows = set.len();
    let first_error = FirstError(Mutex::new(None));
    let (to_planner, messages) = sync_channel::<Result<Message<T>>>(readers * BUFFERS_PER_READER);
    let (to_writer, jobs) = sync_channel::<Job<S::Job>>(readers * BUFFERS_PER_READER);
    let mut spare_senders = Vec::new();
    let mut spare_receivers = Vec::new();
    for _ in 0..readers {
        let (tx, rx) = sync_channel::<AlignedBuf>(BUFFERS_PER_READER);
        for _ in 0..BUFFERS_PER_READER.min(windows) {
            let _ = tx.send(AlignedBuf::new(plan.buffer));
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
                    read_windows(plan, set, reader, readers, read, &spare, &to_planner)
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
        if let Err(e) = plan_pieces(windows, messages, to_writer, sink) {
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

/// A reader: the set's windows `first`, `first + readers`, ..., each ended by an `End`
/// message.
fn read_windows<T>(
    plan: Plan,
    set: &WindowSet,
    first: usize,
    readers: usize,
    read: &(impl Fn(&mut Pieces<'_, T>) -> Result<()> + Sync),
    spare: &Receiver<AlignedBuf>,
    to_planner: &SyncSender<Result<Message<T>>>,
) -> Result<()> {
    for ord in (first..set.len()).step_by(readers) {
        let mut pieces = Pieces {
            window: plan.window(set.nth(ord)),
            ord,
            reader: first,
            seq: 0,
            spare,
            out: to_planner,
            stopped: false,
        };
        read(&mut pieces)?;
        let end = Message::End {
            ord,
            seq: pieces.seq,
        };
        if pieces.stopped || to_planner.send(Ok(end)).is_err() {
            return Ok(()); // the copy stopped; its first error is reported
        }
    }
    Ok(())
}

/// The plan step: pieces put back in guest order, planned, passed to the writer.
/// Consumes its channels, so readers and writer blocked on them wake up when it returns.
fn plan_pieces<T, S: Sink<T>>(
    windows: usize,
    messages: Receiver<Result<Message<T>>>,
    to_writer: SyncSender<Job<S::Job>>,
    sink: &mut S,
) -> Result<()> {
    let mut waiting: BTreeMap<(usize, usize), Message<T>> = BTreeMap::new();
    let mut next = (0usize, 0usize);
    while next.0 < windows {
        let Ok(m) = messages.recv() else {
            // Every reader has gone without ending all its windows: the writer stopped
            // (its error is recorded), so they had no buffers left.
            return Ok(());
        };
        let m = m?;
        waiting.insert(m.key(), m);
        while let Some(m) = waiting.remove(&next) {
            match m {
                Message::End { .. } => next = (next.0 + 1, 0),
                Message::Piece(f) => {
                    let job = sink.plan(f.window, f.item, &f.data)?;
                    let job = Job {
                        job,
                        data: f.data,
                        reader: f.reader,
                    };
                    if to_writer.send(job).is_err() {
                        return Ok(()); // the writer failed; its error is recorded
                    }
                    next.1 += 1;
                }
            }
        }
    }
    Ok(())
}

/// The writer: each job in order, each buffer back to its reader.
fn write_jobs<J, W: JobWriter<J>>(
    mut writer: W,
    jobs: Receiver<Job<J>>,
    spare: Vec<SyncSender<AlignedBuf>>,
) -> Result<()> {
    for job in jobs {
        let Job { job, data, reader } = job;
        writer.write(job, &data)?;
        // A reader that has ended all its windows no longer listens.
        let _ = spare[reader].send(data);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
