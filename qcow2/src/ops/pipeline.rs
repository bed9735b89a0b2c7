//! A reader thread and a writer (the calling thread) joined by a short queue, with a small
//! pool of buffers going round: reading the next piece overlaps writing the last one, and
//! memory stays bounded. Used by commit and by compressed copies.

use crate::error::Result;
use std::cell::Cell;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

/// Buffers in the pool: one being read, one queued, one being written.
const POOL: usize = 3;
/// Items queued between the threads.
const QUEUE: usize = 2;

/// The reader's end: spare buffers in, items out. Both calls notice a writer that has
/// stopped (it failed; its error is what the pipeline returns) and remember it, so the
/// reader can end quietly.
pub(crate) struct Producer<T> {
    spare: Receiver<Vec<u8>>,
    out: SyncSender<Result<T>>,
    writer_gone: Cell<bool>,
}

impl<T> Producer<T> {
    /// A buffer to fill; None once the writer has stopped.
    pub(crate) fn buffer(&self) -> Option<Vec<u8>> {
        let b = self.spare.recv().ok();
        self.writer_gone.set(self.writer_gone.get() || b.is_none());
        b
    }

    /// Hands an item to the writer; false once the writer has stopped.
    pub(crate) fn send(&self, item: T) -> bool {
        let sent = self.out.send(Ok(item)).is_ok();
        self.writer_gone.set(self.writer_gone.get() || !sent);
        sent
    }

    /// Whether a call has found the writer stopped.
    pub(crate) fn writer_gone(&self) -> bool {
        self.writer_gone.get()
    }
}

/// Runs `read` on a thread of its own and `write` on this one, over a pool of buffers of
/// `buffer_len` bytes. `write` takes each item in order and gives its buffer back. The first
/// error of either side is returned; on it, both sides stop.
pub(crate) fn run<T: Send>(
    buffer_len: usize,
    read: impl FnOnce(&Producer<T>) -> Result<()> + Send,
    mut write: impl FnMut(T) -> Result<Vec<u8>>,
) -> Result<()> {
    let (out, items) = sync_channel::<Result<T>>(QUEUE);
    let (recycle, spare) = sync_channel::<Vec<u8>>(POOL);
    for _ in 0..POOL {
        let _ = recycle.send(vec![0u8; buffer_len]);
    }
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let producer = Producer {
                spare,
                out,
                writer_gone: Cell::new(false),
            };
            if let Err(e) = read(&producer) {
                let _ = producer.out.send(Err(e));
            }
        });
        let mut write_all = || -> Result<()> {
            for item in items.iter() {
                let buffer = write(item?)?;
                // The reader may be gone already; then the buffer is simply dropped.
                let _ = recycle.try_send(buffer);
            }
            Ok(())
        };
        let result = write_all();
        // Dropping both ends wakes a reader blocked on either channel, so a failed write
        // (ENOSPC, say) ends the reader too instead of leaving it waiting for a buffer.
        drop(items);
        drop(recycle);
        result
    })
}
