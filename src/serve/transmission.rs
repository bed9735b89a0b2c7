//! The transmission phase of one connection: requests are read in order, reads and block
//! status run on blocking threads (several at once, within a byte budget shared by all
//! connections), and replies are written by one writer as they complete. Every malformed
//! request gets an error reply and the connection goes on; only a broken frame (wrong
//! magic, an oversized write payload) ends it.

use crate::report;
use crate::serve::catalog::MAX_PAYLOAD;
use crate::serve::handshake::Session;
use crate::serve::proto::*;
use crate::serve::reads::{self, Piece};
use std::ops::Range;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// A write payload longer than our maximum is read and dropped up to this size (so the
/// connection stays usable); a longer one ends the connection.
const MAX_DISCARD: u32 = 64 << 20;
/// Requests of one connection in progress at once.
const IN_FLIGHT: usize = 16;
/// The byte budget's unit (permits are KiB).
const BUDGET_UNIT: u64 = 1024;

/// Idle read buffers kept for reuse, at most this many bytes in all.
const POOL_BYTES: usize = 64 << 20;

/// What every connection shares.
pub struct Shared {
    /// Bytes of replies being built or waiting to be written, all connections together.
    pub budget: Arc<Semaphore>,
    /// Read buffers written out, for the next reads: fresh pages from the kernel cost a
    /// fault each, a reused buffer none.
    pool: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl Shared {
    /// A budget of `bytes` for replies in memory.
    pub fn new(bytes: u64) -> Shared {
        Shared {
            budget: Arc::new(Semaphore::new((bytes / BUDGET_UNIT) as usize)),
            pool: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// A buffer of `len` bytes. Its content is stale (what an earlier read left): only the
    /// ranges a read fills are ever sent.
    fn buffer(&self, len: usize) -> Vec<u8> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let pick = pool
            .iter()
            .position(|b| b.capacity() >= len)
            .or_else(|| pool.len().checked_sub(1));
        let mut buf = pick.map(|i| pool.swap_remove(i)).unwrap_or_default();
        drop(pool);
        if buf.len() < len {
            buf.resize(len, 0);
        }
        buf.truncate(len);
        buf
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = pool.iter().map(Vec::capacity).sum();
        if held + buf.capacity() <= POOL_BYTES {
            pool.push(buf);
        }
    }
}

/// One reply: header bytes and data, written in order by the writer.
struct Frame {
    /// (bytes to write, then this range of `data`).
    parts: Vec<(Vec<u8>, Range<usize>)>,
    data: Vec<u8>,
    _permit: Option<OwnedSemaphorePermit>,
    /// Where `data` goes back to once written.
    pool: Option<Arc<Shared>>,
}

impl Frame {
    fn plain(bytes: Vec<u8>) -> Frame {
        Frame {
            parts: vec![(bytes, 0..0)],
            data: Vec::new(),
            _permit: None,
            pool: None,
        }
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        if let Some(p) = self.pool.take() {
            p.give_back(std::mem::take(&mut self.data));
        }
    }
}

/// Serves requests until the client disconnects, sends `NBD_CMD_DISC`, breaks the framing,
/// or `stop` fires (requests in flight are answered first).
pub async fn serve<R, W>(
    mut rd: R,
    wr: W,
    session: Session,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Frame>(IN_FLIGHT * 2);
    let writer = tokio::spawn(write_frames(wr, rx));
    let session = Arc::new(session);
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let result = loop {
        let mut head = [0u8; REQUEST_LEN];
        let read = tokio::select! {
            r = rd.read_exact(&mut head) => r,
            _ = stop.changed() => break Ok(()),
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let Some(req) = Request::parse(&head) else {
            break Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request without the request magic",
            ));
        };
        match req.kind {
            CMD_DISC => break Ok(()),
            CMD_WRITE => {
                // Read-only: the payload is read and dropped, the write refused.
                if req.length > MAX_DISCARD {
                    break Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "write payload over 64 MiB",
                    ));
                }
                let mut sink = (&mut rd).take(req.length as u64);
                if let Err(e) = tokio::io::copy(&mut sink, &mut tokio::io::sink()).await {
                    break Err(e);
                }
                let e = if req.length > MAX_PAYLOAD {
                    EOVERFLOW
                } else {
                    EPERM
                };
                send_error(&tx, &session, req.cookie, e, "the export is read-only").await;
            }
            CMD_READ | CMD_BLOCK_STATUS => {
                if let Some((e, msg)) = refuse(&req, &session) {
                    send_error(&tx, &session, req.cookie, e, msg).await;
                    continue;
                }
                let Ok(slot) = in_flight.clone().acquire_owned().await else {
                    break Ok(());
                };
                let bytes = if req.kind == CMD_READ {
                    req.length as u64
                } else {
                    0
                };
                let units = (bytes.div_ceil(BUDGET_UNIT) as u32).max(1);
                let Ok(permit) = shared.budget.clone().acquire_many_owned(units).await else {
                    break Ok(());
                };
                let (tx, session, shared) = (tx.clone(), session.clone(), shared.clone());
                tokio::task::spawn_blocking(move || {
                    let mut frame = if req.kind == CMD_READ {
                        read_frame(&session, &req, &shared)
                    } else {
                        status_frame(&session, &req)
                    };
                    frame._permit = Some(permit);
                    let _ = tx.blocking_send(frame);
                    drop(slot);
                });
            }
            CMD_FLUSH | CMD_CACHE => {
                if let Some((e, msg)) = refuse(&req, &session) {
                    send_error(&tx, &session, req.cookie, e, msg).await;
                } else {
                    send_ok(&tx, req.cookie).await;
                }
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                send_error(&tx, &session, req.cookie, EPERM, "the export is read-only").await;
            }
            _ => {
                send_error(&tx, &session, req.cookie, EINVAL, "unknown command").await;
            }
        }
    };
    // Requests in flight hold senders: the writer ends once they are answered.
    drop(tx);
    let written = writer.await.unwrap_or(Ok(()));
    result.and(written)
}

/// Why a request cannot be served as asked, if it cannot: flags, range, length, contexts.
fn refuse(req: &Request, s: &Session) -> Option<(u32, &'static str)> {
    let size = s.export.size;
    let allowed = match req.kind {
        CMD_READ => CMD_FLAG_DF | CMD_FLAG_FUA,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    };
    if req.flags & !allowed != 0 {
        return Some((EINVAL, "unknown command flags"));
    }
    if req.kind == CMD_FLUSH {
        return None;
    }
    if req.kind == CMD_READ && req.length > MAX_PAYLOAD {
        return Some((EOVERFLOW, "read longer than the maximum (32 MiB)"));
    }
    if req
        .offset
        .checked_add(req.length as u64)
        .is_none_or(|e| e > size)
    {
        return Some((EINVAL, "request past the end of the export"));
    }
    match req.kind {
        CMD_BLOCK_STATUS if !s.structured || s.contexts.is_empty() => {
            Some((EINVAL, "no metadata context was selected"))
        }
        CMD_BLOCK_STATUS if req.length == 0 => Some((EINVAL, "block status of zero bytes")),
        _ => None,
    }
}

/// The reply to a read: structured (data and hole chunks; one data chunk with `DF`) or
/// simple (the bytes, holes as zeros).
fn read_frame(s: &Session, req: &Request, shared: &Arc<Shared>) -> Frame {
    let len = req.length as usize;
    let df = req.flags & CMD_FLAG_DF != 0;
    let fill = !s.structured || df;
    let mut data = shared.buffer(len);
    let pieces = match reads::read(&s.export.chain, req.offset, &mut data, fill) {
        Ok(p) => p,
        Err(e) => {
            shared.give_back(data);
            return read_error(s, req, &e);
        }
    };
    let mut parts = Vec::new();
    if !s.structured {
        let mut h = Vec::with_capacity(16);
        simple_reply(&mut h, 0, req.cookie);
        parts.push((h, 0..len));
    } else if len == 0 {
        let mut h = Vec::new();
        chunk_done(&mut h, req.cookie);
        parts.push((h, 0..0));
    } else if df {
        let mut h = Vec::with_capacity(28);
        chunk_header(
            &mut h,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            req.cookie,
            len as u32 + 8,
        );
        h.extend_from_slice(&req.offset.to_be_bytes());
        parts.push((h, 0..len));
    } else {
        let last = pieces.len().saturating_sub(1);
        for (i, Piece { at, len, hole }) in pieces.into_iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            let off = req.offset + at;
            let mut h = Vec::with_capacity(28);
            if hole {
                chunk_hole(&mut h, flags, req.cookie, off, len as u32);
                parts.push((h, 0..0));
            } else {
                chunk_header(
                    &mut h,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    len as u32 + 8,
                );
                h.extend_from_slice(&off.to_be_bytes());
                parts.push((h, at as usize..(at + len) as usize));
            }
        }
    }
    Frame {
        parts,
        data,
        _permit: None,
        pool: Some(shared.clone()),
    }
}

/// A read that failed (a checksum mismatch, an I/O error): logged with the export and the
/// range, answered with `EIO`.
fn read_error(s: &Session, req: &Request, e: &qcow2::Error) -> Frame {
    let msg = format!(
        "export {}: read of {} bytes at {} failed: {e}",
        s.export.name, req.length, req.offset
    );
    report::error(&msg);
    let mut out = Vec::new();
    if s.structured {
        chunk_error(&mut out, req.cookie, EIO, &msg);
    } else {
        simple_reply(&mut out, EIO, req.cookie);
    }
    Frame::plain(out)
}

/// The reply to a block status request: one chunk per selected context.
fn status_frame(s: &Session, req: &Request) -> Frame {
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let mut out = Vec::new();
    let last = s.contexts.len().saturating_sub(1);
    for (i, &(id, ctx)) in s.contexts.iter().enumerate() {
        match reads::block_status(&s.export.chain, ctx, req.offset, req.length as u64, one) {
            Ok(extents) => {
                let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                chunk_block_status(&mut out, flags, req.cookie, id, &extents);
            }
            Err(e) => return read_error(s, req, &e),
        }
    }
    Frame::plain(out)
}

async fn send_ok(tx: &mpsc::Sender<Frame>, cookie: u64) {
    let mut out = Vec::new();
    simple_reply(&mut out, 0, cookie);
    let _ = tx.send(Frame::plain(out)).await;
}

async fn send_error(tx: &mpsc::Sender<Frame>, s: &Session, cookie: u64, e: u32, msg: &str) {
    let mut out = Vec::new();
    if s.structured {
        chunk_error(&mut out, cookie, e, msg);
    } else {
        simple_reply(&mut out, e, cookie);
    }
    let _ = tx.send(Frame::plain(out)).await;
}

/// Writes frames as they come; flushes when no frame is waiting.
async fn write_frames<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<Frame>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, wr);
    while let Some(f) = rx.recv().await {
        write_frame(&mut w, &f).await?;
        while let Ok(f) = rx.try_recv() {
            write_frame(&mut w, &f).await?;
        }
        w.flush().await?;
    }
    w.shutdown().await.or(Ok(()))
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> std::io::Result<()> {
    for (head, range) in &f.parts {
        w.write_all(head).await?;
        if !range.is_empty() {
            w.write_all(&f.data[range.clone()]).await?;
        }
    }
    Ok(())
}
