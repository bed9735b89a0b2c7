//! The transmission phase of one connection, on plain threads: a few workers per
//! connection take turns reading the next request, and each answers the request it read
//! itself (read, check, write the reply), so a request costs no hand-off between threads
//! (on this path a hand-off costs as much as the copy). Reads on cold storage still
//! overlap: while one worker waits for the disk, the next reads the next request. Replies
//! in memory are bounded by a byte budget shared by all connections. Every malformed
//! request gets an error reply and the connection goes on; only a broken frame (wrong
//! magic, an oversized write payload) ends it.

use crate::report;
use crate::serve::catalog::MAX_PAYLOAD;
use crate::serve::handshake::Session;
use crate::serve::proto::*;
use crate::serve::reads::Piece;
use std::fs::File;
use std::io::{BufReader, IoSlice, Read, Write};
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

/// A write payload longer than our maximum is read and dropped up to this size (so the
/// connection stays usable); a longer one ends the connection.
const MAX_DISCARD: u32 = 64 << 20;
/// Workers per connection: requests of one connection in progress at once.
pub const WORKERS: usize = 4;
/// A reply that cannot be written for this long (the client stopped reading) ends the
/// connection.
const SEND_TIMEOUT_SECS: libc::time_t = 120;
/// Idle read buffers kept for reuse, at most this many bytes in all.
const POOL_BYTES: usize = 64 << 20;

/// What every connection shares.
pub struct Shared {
    /// Bytes of replies being built or written, all connections together.
    budget: Budget,
    /// Read buffers written out, for the next reads: fresh pages from the kernel cost a
    /// fault each, a reused buffer none.
    pool: Mutex<Vec<Vec<u8>>>,
}

/// A counting semaphore of bytes, for threads.
struct Budget {
    left: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn take(&self, n: u64) {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        while *left < n {
            left = self.freed.wait(left).unwrap_or_else(|e| e.into_inner());
        }
        *left -= n;
    }

    fn give(&self, n: u64) {
        *self.left.lock().unwrap_or_else(|e| e.into_inner()) += n;
        self.freed.notify_all();
    }
}

impl Shared {
    /// A budget of `bytes` (at least one maximal read) for replies in memory.
    pub fn new(bytes: u64) -> Shared {
        Shared {
            budget: Budget {
                left: Mutex::new(bytes.max(MAX_PAYLOAD as u64)),
                freed: Condvar::new(),
            },
            pool: Mutex::new(Vec::new()),
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

/// A connected socket, read and written with plain system calls (unix or TCP alike).
pub struct Socket(File);

impl Socket {
    pub fn new(fd: OwnedFd) -> std::io::Result<Socket> {
        let s = Socket(File::from(fd));
        // Sockets tokio hands over are non-blocking; the workers block.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(s.0.as_raw_fd(), libc::F_GETFL);
            if fl < 0 || libc::fcntl(s.0.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // A client that stops reading its replies holds their budget: after this long
        // without progress it is dropped.
        let limit = libc::timeval {
            tv_sec: SEND_TIMEOUT_SECS,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a timeval of the size we pass.
        unsafe {
            libc::setsockopt(
                s.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&limit as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(s)
    }

    /// A second handle, to stop the connection from elsewhere.
    pub fn try_clone(&self) -> std::io::Result<Socket> {
        Ok(Socket(self.0.try_clone()?))
    }

    /// No more requests: a worker waiting for one sees the end, replies still go out.
    pub fn stop_reading(&self) {
        // SAFETY: shutdown on a descriptor we own.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RD) };
    }

    fn close(&self) {
        // SAFETY: as above.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// One reply: header bytes and ranges of `data`, written in order with one `writev`.
struct Frame {
    /// (bytes to write, then this range of `data`).
    parts: Vec<(Vec<u8>, Range<usize>)>,
    data: Vec<u8>,
}

impl Frame {
    fn plain(bytes: Vec<u8>) -> Frame {
        Frame {
            parts: vec![(bytes, 0..0)],
            data: Vec::new(),
        }
    }
}

/// One connection's workers share this.
struct Connection<'a> {
    requests: Mutex<BufReader<File>>,
    replies: Mutex<&'a File>,
    socket: &'a Socket,
    session: &'a Session,
    shared: &'a Shared,
    /// Set once the connection is to end: workers stop taking requests.
    closing: AtomicBool,
    /// Why it ended, when not cleanly.
    error: Mutex<Option<std::io::Error>>,
}

/// Serves requests until the client disconnects, sends `NBD_CMD_DISC`, breaks the framing,
/// or [`Socket::stop_reading`] is called (requests in progress are answered first).
pub fn serve(socket: &Socket, session: &Session, shared: &Shared) -> std::io::Result<()> {
    let c = Connection {
        requests: Mutex::new(BufReader::with_capacity(64 << 10, socket.0.try_clone()?)),
        replies: Mutex::new(&socket.0),
        socket,
        session,
        shared,
        closing: AtomicBool::new(false),
        error: Mutex::new(None),
    };
    std::thread::scope(|scope| {
        for _ in 1..WORKERS {
            scope.spawn(|| c.work());
        }
        c.work();
    });
    // A client that leaves without flushing still has its writes kept.
    if let Some(o) = &session.export.overlay {
        if let Err(e) = o.flush() {
            report::error(format!(
                "{}: flushing at disconnect failed: {e}",
                o.path().display()
            ));
        }
    }
    match c.error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What a worker does with a request it read.
enum Next {
    Answer(Request),
    /// A write to the overlay and its payload (which holds budget).
    Write(Request, Vec<u8>),
    Reply(Frame),
    End,
}

impl Connection<'_> {
    fn work(&self) {
        while !self.closing.load(Ordering::Acquire) {
            let next = {
                let mut rd = self.requests.lock().unwrap_or_else(|e| e.into_inner());
                if self.closing.load(Ordering::Acquire) {
                    return;
                }
                self.next(&mut rd)
            };
            let frame = match next {
                Ok(Next::Answer(req)) => self.answer(&req),
                Ok(Next::Write(req, payload)) => {
                    let f = self.change(&req, Some(&payload));
                    self.shared.give_back(payload);
                    self.shared.budget.give(req.length as u64);
                    Some(f)
                }
                Ok(Next::Reply(f)) => Some(f),
                Ok(Next::End) => {
                    self.closing.store(true, Ordering::Release);
                    return;
                }
                Err(e) => {
                    self.fail(e);
                    return;
                }
            };
            if let Some(f) = frame {
                if let Err(e) = self.write(&f) {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    /// The connection ends with an error: no more requests, nor replies.
    fn fail(&self, e: std::io::Error) {
        self.closing.store(true, Ordering::Release);
        self.socket.close();
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    /// Reads the next request and a write's payload (kept for the overlay, dropped when the
    /// write is refused). Requests answered without any reading are answered here, in order.
    fn next(&self, rd: &mut BufReader<File>) -> std::io::Result<Next> {
        let mut head = [0u8; REQUEST_LEN];
        match rd.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Next::End),
            Err(e) => return Err(e),
        }
        let Some(req) = Request::parse(&head) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request without the request magic",
            ));
        };
        let s = self.session;
        let writable = s.export.writable();
        Ok(match req.kind {
            CMD_DISC => Next::End,
            CMD_WRITE => {
                if req.length > MAX_DISCARD {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "write payload over 64 MiB",
                    ));
                }
                let refused = if req.length > MAX_PAYLOAD {
                    Some((EOVERFLOW, "write longer than the maximum (32 MiB)"))
                } else if !writable {
                    Some((EPERM, "the export is read-only"))
                } else {
                    refuse(&req, s)
                };
                if let Some((e, msg)) = refused {
                    // The payload is read and dropped: the next request follows it.
                    let got = std::io::copy(&mut rd.take(req.length as u64), &mut std::io::sink())?;
                    if got < req.length as u64 {
                        return Ok(Next::End);
                    }
                    return Ok(Next::Reply(error_frame(s, req.cookie, e, msg)));
                }
                self.shared.budget.take(req.length as u64);
                let mut payload = self.shared.buffer(req.length as usize);
                if let Err(e) = rd.read_exact(&mut payload) {
                    self.shared.give_back(payload);
                    self.shared.budget.give(req.length as u64);
                    return match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => Ok(Next::End),
                        _ => Err(e),
                    };
                }
                Next::Write(req, payload)
            }
            CMD_READ | CMD_BLOCK_STATUS => match refuse(&req, s) {
                Some((e, msg)) => Next::Reply(error_frame(s, req.cookie, e, msg)),
                None => Next::Answer(req),
            },
            CMD_FLUSH | CMD_CACHE => match refuse(&req, s) {
                Some((e, msg)) => Next::Reply(error_frame(s, req.cookie, e, msg)),
                None if writable && req.kind == CMD_FLUSH => Next::Answer(req),
                None => Next::Reply(ok_frame(req.cookie)),
            },
            CMD_TRIM | CMD_WRITE_ZEROES if !writable => {
                Next::Reply(error_frame(s, req.cookie, EPERM, "the export is read-only"))
            }
            CMD_TRIM | CMD_WRITE_ZEROES => match refuse(&req, s) {
                Some((e, msg)) => Next::Reply(error_frame(s, req.cookie, e, msg)),
                None => Next::Answer(req),
            },
            _ => Next::Reply(error_frame(s, req.cookie, EINVAL, "unknown command")),
        })
    }

    /// Answers a read (its reply is written here, before the budget its data took is given
    /// back), a block status request, or a change to the overlay.
    fn answer(&self, req: &Request) -> Option<Frame> {
        match req.kind {
            CMD_READ => {}
            CMD_BLOCK_STATUS => return Some(status_frame(self.session, req)),
            _ => return Some(self.change(req, None)),
        }
        let bytes = req.length as u64;
        self.shared.budget.take(bytes);
        let frame = read_frame(self.session, req, self.shared);
        let written = self.write(&frame);
        self.shared.give_back(frame.data);
        self.shared.budget.give(bytes);
        if let Err(e) = written {
            self.fail(e);
        }
        None
    }

    /// Writes one reply whole, with as few system calls as it takes.
    fn write(&self, f: &Frame) -> std::io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(f.parts.len() * 2);
        for (head, range) in &f.parts {
            slices.push(IoSlice::new(head));
            if !range.is_empty() {
                slices.push(IoSlice::new(&f.data[range.clone()]));
            }
        }
        let mut out = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        write_all_vectored(&mut *out, &mut slices)
    }
}

impl Connection<'_> {
    /// A change to the overlay (write, zeroes, trim) or a flush; with FUA the change is
    /// flushed before the reply.
    fn change(&self, req: &Request, payload: Option<&[u8]>) -> Frame {
        let s = self.session;
        let Some(overlay) = &s.export.overlay else {
            return error_frame(s, req.cookie, EPERM, "the export is read-only");
        };
        let chain = &s.export.chain;
        let (off, len) = (req.offset, req.length as u64);
        let done = match req.kind {
            CMD_WRITE => overlay.write(chain, off, payload.unwrap_or_default()),
            CMD_WRITE_ZEROES => {
                overlay.write_zeroes(chain, off, len, req.flags & CMD_FLAG_NO_HOLE == 0)
            }
            CMD_TRIM => overlay.trim(off, len),
            _ => Ok(()),
        };
        let fua = req.flags & CMD_FLAG_FUA != 0 || req.kind == CMD_FLUSH;
        match done.and_then(|()| if fua { overlay.flush() } else { Ok(()) }) {
            Ok(()) => ok_frame(req.cookie),
            Err(e) => {
                let msg = format!(
                    "export {}: {} of {len} bytes at {off} into the overlay {} failed: {e}",
                    s.export.name,
                    command_name(req.kind),
                    overlay.path().display()
                );
                report::error(&msg);
                error_frame(s, req.cookie, errno_of(&e), &msg)
            }
        }
    }
}

fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_WRITE => "write",
        CMD_WRITE_ZEROES => "zeroing",
        CMD_TRIM => "trim",
        _ => "flush",
    }
}

/// The errno a failed change answers: ENOSPC when the overlay's filesystem is full.
fn errno_of(e: &qcow2::Error) -> u32 {
    match e {
        qcow2::Error::Io { cause, .. } | qcow2::Error::File { cause, .. }
            if cause.raw_os_error() == Some(libc::ENOSPC) =>
        {
            ENOSPC
        }
        _ => EIO,
    }
}

fn ok_frame(cookie: u64) -> Frame {
    let mut out = Vec::with_capacity(16);
    simple_reply(&mut out, 0, cookie);
    Frame::plain(out)
}

/// `write_all` for a list of slices.
fn write_all_vectored(mut w: impl Write, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn error_frame(s: &Session, cookie: u64, e: u32, msg: &str) -> Frame {
    let mut out = Vec::new();
    if s.structured {
        chunk_error(&mut out, cookie, e, msg);
    } else {
        simple_reply(&mut out, e, cookie);
    }
    Frame::plain(out)
}

/// Why a request cannot be served as asked, if it cannot: flags, range, length, contexts.
fn refuse(req: &Request, s: &Session) -> Option<(u32, &'static str)> {
    let size = s.export.size;
    let allowed = match req.kind {
        CMD_READ => CMD_FLAG_DF | CMD_FLAG_FUA,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
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
fn read_frame(s: &Session, req: &Request, shared: &Shared) -> Frame {
    let len = req.length as usize;
    let df = req.flags & CMD_FLAG_DF != 0;
    let fill = !s.structured || df;
    let mut data = shared.buffer(len);
    let pieces = match s.export.read(req.offset, &mut data, fill) {
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
    Frame { parts, data }
}

/// A read that failed (a checksum mismatch, an I/O error): logged with the export and the
/// range, answered with `EIO`.
fn read_error(s: &Session, req: &Request, e: &qcow2::Error) -> Frame {
    let msg = format!(
        "export {}: read of {} bytes at {} failed: {e}",
        s.export.name, req.length, req.offset
    );
    report::error(&msg);
    error_frame(s, req.cookie, EIO, &msg)
}

/// The reply to a block status request: one chunk per selected context.
fn status_frame(s: &Session, req: &Request) -> Frame {
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let mut out = Vec::new();
    let last = s.contexts.len().saturating_sub(1);
    for (i, &(id, ctx)) in s.contexts.iter().enumerate() {
        match s
            .export
            .block_status(ctx, req.offset, req.length as u64, one)
        {
            Ok(extents) => {
                let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                chunk_block_status(&mut out, flags, req.cookie, id, &extents);
            }
            Err(e) => return read_error(s, req, &e),
        }
    }
    Frame::plain(out)
}
