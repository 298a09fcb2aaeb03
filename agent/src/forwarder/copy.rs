//! Moving bytes between the client and the backend, both ways, with half-close (a FIN on one
//! side becomes a `shutdown(SHUT_WR)` on the other while the other direction runs on), an idle
//! timeout, and bounded memory: one buffer (or one pipe) per direction.
//!
//! Two paths: a userspace copy, and a copy that moves on to `splice(2)` through a pipe (the
//! bytes stay in the kernel) once a direction carries bulk. Both read only when the previous
//! chunk was fully written, so a slow reader on one
//! side slows the writer on the other (TCP backpressure end to end).

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncWriteExt, Interest},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use crate::catalog::BytePath;

/// Bytes moved each way, and when the first bytes moved (milliseconds after the start, plus
/// one; zero: not yet).
#[derive(Debug, Default)]
pub struct Moved {
    pub to_backend: AtomicU64,
    pub to_client: AtomicU64,
    first_to_backend: AtomicU64,
    first_to_client: AtomicU64,
    /// Of those bytes, how many went by `splice(2)` (either way).
    pub spliced: AtomicU64,
}

impl Moved {
    /// The client's first bytes, `n` of them, went to the backend with the connect (see
    /// `socket::connect_marked_sending`), before the copy began.
    /// `at`: when they went.
    pub fn sent_early(&self, n: usize, start: Instant, at: Instant) {
        if n > 0 && self.to_backend.fetch_add(n as u64, Ordering::Relaxed) == 0 {
            let since = at.saturating_duration_since(start);
            self.first_to_backend
                .store(since.as_millis() as u64 + 1, Ordering::Relaxed);
        }
    }

    /// How long the backend took to answer: from the client's first bytes (or the start, for
    /// protocols where the server speaks first) to the backend's first bytes.
    pub fn response_time(&self) -> Option<Duration> {
        let answered = self.first_to_client.load(Ordering::Relaxed);
        if answered == 0 {
            return None;
        }
        let asked = match self.first_to_backend.load(Ordering::Relaxed) {
            0 => 1,
            t if t <= answered => t,
            _ => 1,
        };
        Some(Duration::from_millis(answered - asked))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// How a connection's bytes move.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub path: BytePath,
    /// The largest buffer per direction.
    pub buffer: usize,
    /// No bytes either way for this long closes the connection.
    pub idle: Option<Duration>,
    /// Stop once the client has asked twice and both directions rest between messages, so
    /// that the connection can move to its thread's settled loop (see `super::settled`).
    pub settle: bool,
}

/// How [`bidirectional`] returned, if it did not fail.
#[derive(Debug, PartialEq, Eq)]
pub enum Copied {
    /// Both directions have ended.
    Done,
    /// Both directions stopped between messages, with nothing buffered: the connection is
    /// the settled loop's to copy.
    Settled,
}

/// The two directions agreeing to stop for the settled loop. The client's direction asks,
/// after its second message. The backend's direction stops first, at its wait for a read and
/// only while the client's rests at its own: a direction stopped while the other still
/// writes could leave that write waiting on a peer that waits on the stopped one. The
/// client's direction then stops at once. Relaxed atomics: both directions are polled by
/// one task.
#[derive(Default)]
struct Park {
    asked: AtomicBool,
    up_resting: AtomicBool,
    down_parked: AtomicBool,
    /// A direction moved on to splice: the connection carries bulk and stays here. Without
    /// it the backend's direction could park on the client's last rest, stale once that
    /// direction splices.
    bulk: AtomicBool,
    /// Wake-ups spent so the backend's direction gets polled to see the request.
    nudges: std::sync::atomic::AtomicU8,
}

/// Which direction a pump is, for the [`Park`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Up,
    Down,
}

/// A pump's stop: its end of stream, or parked for the settled loop.
#[derive(PartialEq, Eq)]
enum Stop {
    Ended,
    Parked,
}

/// Nudges the client's direction spends before leaving it to the backend's own wake-ups.
const NUDGES: u8 = 4;

/// Copies until both directions have ended, one fails, or the connection is idle too long.
/// `start` is when the connection was accepted: silence since then counts as idle.
/// `answered` runs once, when the backend's first bytes have reached the client. `first`: the
/// client's first read, already made (see [`read_first`]), to be passed on before any other.
/// The caller closes both sockets when it returns: the last end of stream is passed on by
/// that close, not by a `shutdown` of its own.
pub async fn bidirectional(
    client: &mut TcpStream,
    server: &mut TcpStream,
    settings: Settings,
    start: Instant,
    moved: &Moved,
    answered: &(dyn Fn(&Moved) + Sync),
    first: Option<Buffer>,
) -> Result<Copied, CopyError> {
    let Settings {
        path,
        buffer,
        idle,
        settle,
    } = settings;
    let park = Park::default();
    let park = (settle && idle.is_none()).then_some(&park);
    let last_stamp = AtomicU64::new(0);
    // Stamped only when a watchdog reads it: otherwise each message would read the clock
    // for nothing.
    let last = idle.map(|_| &last_stamp);
    let (up_ended, down_ended) = (AtomicBool::new(false), AtomicBool::new(false));
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let both = async {
        let splice = path == BytePath::Splice;
        let up = Direction {
            count: &moved.to_backend,
            spliced: &moved.spliced,
            first: &moved.first_to_backend,
            on_first: None,
            ended: &up_ended,
            other_ended: &down_ended,
        };
        let down = Direction {
            count: &moved.to_client,
            spliced: &moved.spliced,
            first: &moved.first_to_client,
            on_first: Some((answered, moved)),
            ended: &down_ended,
            other_ended: &up_ended,
        };
        let stops = tokio::try_join!(
            pump(
                &mut cr,
                &mut sw,
                buffer,
                splice,
                up,
                last,
                start,
                first,
                park.map(|p| (p, Side::Up))
            ),
            pump(
                &mut sr,
                &mut cw,
                buffer,
                splice,
                down,
                last,
                start,
                None,
                park.map(|p| (p, Side::Down))
            ),
        )?;
        Ok::<Copied, io::Error>(match stops {
            (Stop::Parked, Stop::Parked) => Copied::Settled,
            _ => Copied::Done,
        })
    };
    let Some(idle) = idle else {
        return Ok(both.await?);
    };
    let watchdog = async {
        loop {
            let seen = Duration::from_millis(last_stamp.load(Ordering::Relaxed));
            let quiet = start.elapsed().saturating_sub(seen);
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::select! {
        r = both => Ok(r?),
        _ = watchdog => Err(CopyError::Idle(idle)),
    }
}

fn touch(last: Option<&AtomicU64>, start: Instant) {
    if let Some(last) = last {
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Told once, when the backend's first bytes have reached the client.
type Answered<'a> = &'a (dyn Fn(&Moved) + Sync);

/// One direction's accounting.
struct Direction<'a> {
    count: &'a AtomicU64,
    spliced: &'a AtomicU64,
    first: &'a AtomicU64,
    on_first: Option<(Answered<'a>, &'a Moved)>,
    /// This direction has seen its end of stream, and the other one.
    ended: &'a AtomicBool,
    other_ended: &'a AtomicBool,
}

impl Direction<'_> {
    /// Passes an end of stream on: a `shutdown(SHUT_WR)` while the other direction still
    /// runs (half-close). Once both have ended the sockets close at once, and the close sends
    /// the same FIN (nothing is left unread on `to`: its own direction has read its end), so
    /// the last direction skips the system call.
    ///
    /// Before the half-close, one turn of the event loop: the other side's end is often
    /// already on its way (a client that read a `Connection: close` response closes at once),
    /// and if it comes in that turn both directions skip the `shutdown`, as they do when the
    /// ends arrive together. The flag is set first, so the other direction, ending meanwhile,
    /// skips its own.
    ///
    /// `corked`: the last bytes went with `MSG_MORE` and wait for this FIN, so the other side
    /// has not seen them and cannot have answered them with its end: no turn to wait.
    async fn end(&self, to: &mut WriteHalf<'_>, corked: bool) -> io::Result<()> {
        self.ended.store(true, Ordering::Relaxed);
        if self.other_ended.load(Ordering::Relaxed) {
            return Ok(());
        }
        if !corked {
            tokio::task::yield_now().await;
        }
        if !self.other_ended.load(Ordering::Relaxed) {
            to.shutdown().await?;
        }
        Ok(())
    }

    fn moved(&mut self, n: usize, start: Instant) {
        if self.count.fetch_add(n as u64, Ordering::Relaxed) == 0 {
            self.first
                .store(start.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
            if let Some((f, moved)) = self.on_first.take() {
                f(moved);
            }
        }
    }
}

/// Copies one direction. With `splice`, a direction that proves to carry bulk (reads filling
/// the largest buffer again and again) moves on to `splice(2)`: short messages stay on the
/// copy, which costs fewer system calls per message, and bulk stops crossing userspace. The
/// switch happens with nothing buffered, so the byte order is kept.
#[allow(clippy::too_many_arguments)]
async fn pump(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    buffer: usize,
    splice: bool,
    mut dir: Direction<'_>,
    last: Option<&AtomicU64>,
    start: Instant,
    first: Option<Buffer>,
    park: Option<(&Park, Side)>,
) -> io::Result<Stop> {
    // Start small (most connections are short) and grow for bulk transfers.
    let mut pending = first.is_some();
    let mut buf = first.unwrap_or_else(|| Buffer::new(buffer.min(FIRST_BUFFER)));
    let mut full_reads = 0;
    let mut corked = false;
    let mut messages = 0u32;
    loop {
        let (n, seen) = if std::mem::take(&mut pending) {
            (buf.filled().len(), Seen::Open)
        } else {
            let read = match park {
                Some((park, side)) => read_or_park(from.as_ref(), &mut buf, park, side, &dir).await,
                None => read_draining_seeing_end(from.as_ref(), &mut buf)
                    .await
                    .map(Some),
            };
            match read {
                Ok(None) => return Ok(Stop::Parked),
                Ok(Some((n, seen))) => (n, seen),
                Err(e) => {
                    if corked {
                        // The end was a reset: the bytes held for its FIN go now, before
                        // the abort that passes the reset on (setting `TCP_NODELAY` sends
                        // what the socket holds).
                        let _ = socket2::SockRef::from(to.as_ref()).set_tcp_nodelay(true);
                    }
                    return Err(e);
                }
            }
        };
        if n == 0 {
            // Half-close: pass the FIN on, keep the other direction going.
            dir.end(to, corked).await?;
            return Ok(Stop::Ended);
        }
        let last_bytes = seen != Seen::Open && n < buf.size;
        corked = last_bytes;
        if last_bytes {
            send_all_more(to.as_ref(), buf.filled()).await?;
        } else {
            to.write_all(buf.filled()).await?;
        }
        dir.moved(n, start);
        touch(last, start);
        if last_bytes && seen == Seen::Fin {
            // The FIN follows these bytes, and no reset: pass it on without the read that
            // would only return 0.
            dir.end(to, true).await?;
            return Ok(Stop::Ended);
        }
        messages += 1;
        if let Some((park, Side::Up)) = park
            && messages >= 2
            && n < buf.size
            && !last_bytes
        {
            park.asked.store(true, Ordering::Relaxed);
        }
        if n < buf.size {
            full_reads = 0;
        } else if buf.size < buffer {
            buf = Buffer::new((buf.size * 2).min(buffer));
        } else {
            full_reads += 1;
            if splice && full_reads >= BULK_READS {
                if let Some((park, _)) = park {
                    park.bulk.store(true, Ordering::Relaxed);
                }
                drop(buf);
                // Boxed: a bulk direction is rare, and its pipe state held inline would be
                // part of every connection's task, copied on each spawn.
                Box::pin(splice_pump(from, to, dir, last, start)).await?;
                return Ok(Stop::Ended);
            }
        }
    }
}

/// A read buffer of `size` bytes, never zeroed: `recv` writes the bytes it returns and only
/// those are read. Zeroing cost a 16 KiB `memset` per direction of every connection.
pub struct Buffer {
    bytes: Vec<u8>,
    size: usize,
}

impl Buffer {
    /// The memory comes with the first read (see [`Buffer::lend`]).
    fn new(size: usize) -> Buffer {
        Buffer {
            bytes: Vec::new(),
            size,
        }
    }

    /// What the last read returned.
    pub fn filled(&self) -> &[u8] {
        &self.bytes
    }

    /// Drops the first `n` bytes (already sent some other way).
    pub fn consume(&mut self, n: usize) {
        self.bytes.drain(..n.min(self.bytes.len()));
    }

    /// Lends a first-size buffer's memory back to the thread's spares while its direction
    /// waits for bytes: an idle connection then holds no buffer, and the next read, on this
    /// connection or another, takes the most recently used one, still in the CPU's cache
    /// (a buffer per connection and direction spread a keep-alive run's copies over a
    /// megabyte). Only between messages: nothing is buffered then.
    fn lend(&mut self) {
        if self.bytes.capacity() == FIRST_BUFFER {
            let bytes = std::mem::take(&mut self.bytes);
            give_back(bytes);
        }
    }

    /// One `recv` into the whole buffer.
    fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        if self.bytes.capacity() < self.size {
            self.bytes = memory(self.size);
        }
        self.bytes.clear();
        let room = &mut self.bytes.spare_capacity_mut()[..self.size];
        // SAFETY: the pointer is valid for `room.len()` bytes; the descriptor is held by the
        // caller; the kernel writes at most that many.
        let n = unsafe { libc::recv(fd, room.as_mut_ptr().cast(), room.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: recv wrote the first n bytes.
        unsafe { self.bytes.set_len(n as usize) };
        Ok(n as usize)
    }
}

/// A first-size buffer goes back to its thread's spares: most connections are short, and
/// two 16 KiB allocations and frees per connection showed in the new-connection profile
/// (glibc's bin bookkeeping). Bounded: at most [`SPARES`] per worker thread.
impl Drop for Buffer {
    fn drop(&mut self) {
        self.lend();
    }
}

/// A buffer's memory: a spare one for the first size, the most recently given back first.
fn memory(size: usize) -> Vec<u8> {
    let spare = if size == FIRST_BUFFER {
        SPARE.with_borrow_mut(Vec::pop)
    } else {
        None
    };
    spare.unwrap_or_else(|| Vec::with_capacity(size))
}

fn give_back(bytes: Vec<u8>) {
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < SPARES {
            spare.push(bytes);
        }
    });
}

/// Spare first-size buffers kept per thread: 64 × 16 KiB, 1 MiB at most per worker.
const SPARES: usize = 64;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Full reads of the largest buffer in a row that mark a direction as bulk.
const BULK_READS: u32 = 4;

/// The client's first read, made while the connection waits for its backend's first sign of
/// life: the bytes go to [`bidirectional`] as `first`. A real read, where a `peek` would have
/// cost one more system call for the same answer. Cancel-safe: the bytes are taken in the
/// poll that returns them.
pub async fn read_first(from: &TcpStream, max: usize) -> io::Result<Buffer> {
    let mut buf = Buffer::new(max.min(FIRST_BUFFER));
    read_draining(from, &mut buf).await?;
    Ok(buf)
}

/// The client's first bytes if they are already there (`None`: not yet), read without
/// waiting, from a socket not yet in the event loop. An end of stream is a first read too.
pub fn read_now(from: &std::net::TcpStream, max: usize) -> io::Result<Option<Buffer>> {
    let mut buf = Buffer::new(max.min(FIRST_BUFFER));
    match buf.recv(from.as_raw_fd()) {
        Ok(_) => Ok(Some(buf)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`read_draining_seeing_end`], unless the directions agree to park first (`None`; see
/// [`Park`]). Cancel-safe, as that read is: nothing is taken from the socket by a wait that
/// parks instead.
async fn read_or_park(
    from: &TcpStream,
    buf: &mut Buffer,
    park: &Park,
    side: Side,
    dir: &Direction<'_>,
) -> io::Result<Option<(usize, Seen)>> {
    let read = read_draining_seeing_end(from, buf);
    tokio::pin!(read);
    std::future::poll_fn(|cx| {
        let asked = park.asked.load(Ordering::Relaxed);
        match side {
            Side::Down => {
                if asked
                    && !park.bulk.load(Ordering::Relaxed)
                    && park.up_resting.load(Ordering::Relaxed)
                    && !dir.other_ended.load(Ordering::Relaxed)
                    && dir.count.load(Ordering::Relaxed) > 0
                {
                    park.down_parked.store(true, Ordering::Relaxed);
                    // The client's direction rests in this task: it stops at its next poll.
                    cx.waker().wake_by_ref();
                    return std::task::Poll::Ready(Ok(None));
                }
            }
            Side::Up => {
                if park.down_parked.load(Ordering::Relaxed) {
                    return std::task::Poll::Ready(Ok(None));
                }
            }
        }
        let r = read.as_mut().poll(cx);
        if side == Side::Up {
            let resting = r.is_pending();
            let was = park.up_resting.swap(resting, Ordering::Relaxed);
            // Just came to rest after asking: the backend's direction waits on its own
            // socket and would not look again before its next bytes.
            if resting && !was && asked && park.nudges.load(Ordering::Relaxed) < NUDGES {
                park.nudges.fetch_add(1, Ordering::Relaxed);
                cx.waker().wake_by_ref();
            }
        }
        r.map(|r| r.map(Some))
    })
    .await
}

/// Reads what the socket holds. A read shorter than the buffer has emptied the receive
/// queue, so the readiness is cleared there and then, instead of by one more `read` that would
/// only return `EAGAIN`: a system call saved per message each way, a good part of what a
/// keep-alive request costs the forwarder. Safe against a race: tokio clears the readiness
/// only if no new event came meanwhile, and data arriving later raises a new one.
async fn read_draining(from: &TcpStream, buf: &mut Buffer) -> io::Result<usize> {
    Ok(read_draining_seeing_end(from, buf).await?.0)
}

/// What the readiness a read waited for said of the peer's end (tokio keeps the closed bits
/// when a short read clears the rest).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seen {
    Open,
    /// The read side closed and the write side open: a FIN, and no reset (a reset, or
    /// `ECONNRESET` after it, closes both). A read that emptied the queue took every byte
    /// before that FIN, and the next read can only return 0: it need not be made.
    Fin,
    /// Both sides closed: a reset, or the peer's FIN after our own shutdown. The next read
    /// tells which.
    Hangup,
}

/// [`read_draining`], and whether the peer's end of stream (or a reset) had already come
/// when the read was made.
async fn read_draining_seeing_end(from: &TcpStream, buf: &mut Buffer) -> io::Result<(usize, Seen)> {
    buf.lend();
    loop {
        // Readable interest only: with the error bit too, an error left set while the read
        // side's readiness is cleared would end this wait at once, and `try_io` (which
        // looks at the readable bits) would refuse the read: a loop without end. A reset
        // also reports the read side closed: see `pump` for the bytes held then.
        let closed = match from.ready(Interest::READABLE).await?.is_read_closed() {
            false => Seen::Open,
            true if write_closed(from) => Seen::Hangup,
            true => Seen::Fin,
        };
        let mut got = None;
        let r = from.try_io(Interest::READABLE, || {
            let n = buf.recv(from.as_raw_fd())?;
            got = Some(n);
            if n > 0 && n < buf.size {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        });
        match (r, got) {
            (Ok(n), _) => return Ok((n, closed)),
            (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => return Ok((n, closed)),
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (Err(e), _) => return Err(e),
        }
    }
}

/// Whether the socket's readiness has its write side closed, looked at without waiting (the
/// write readiness of a socket with room is already set; if it is not, the answer is "maybe",
/// and a maybe is taken as closed, which only costs the read [`Seen::Fin`] saves).
fn write_closed(from: &TcpStream) -> bool {
    let ready = std::pin::pin!(from.ready(Interest::WRITABLE));
    match ready.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(Ok(r)) => r.is_write_closed(),
        _ => true,
    }
}

/// Writes a direction's last bytes with `MSG_MORE`: the kernel holds them for the FIN that
/// [`Direction::end`] or the close sends right after, and both go in one segment. Sent
/// apart, the bytes and the FIN are two segments, and the client acknowledges each: two of
/// the ten packets a short connection costs on its client side.
async fn send_all_more(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        let r = to.try_io(Interest::WRITABLE, || {
            // SAFETY: the pointer is valid for `bytes.len()` bytes; the descriptor is held.
            let n = unsafe {
                libc::send(
                    to.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_MORE | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(n as usize)
        });
        match r {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// First buffer of a direction; it doubles, up to the configured size, while reads fill it.
const FIRST_BUFFER: usize = 16 * 1024;

/// A pipe for splicing, closed on drop.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two fds we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Larger than the default 64 KiB: fewer splices per megabyte. Best effort: past the
        // user's pipe quota the kernel refuses, and the default size still works.
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, SPLICE_CHUNK as libc::c_int) };
        use std::os::fd::FromRawFd;
        // SAFETY: fresh descriptors from pipe2.
        Ok(unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors we hold.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The pipe's capacity bounds what is in flight in this direction. 1 MiB (the kernel's
/// `pipe-max-size`) against the default 64 KiB: one iperf3 stream through the forwarder ran
/// 1.3x faster (16.3 against 12.6 Gbit/s) at three quarters of the CPU per byte (full
/// `cargo xtask bench` runs before and after).
const SPLICE_CHUNK: usize = 1024 * 1024;

async fn splice_pump(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    mut dir: Direction<'_>,
    last: Option<&AtomicU64>,
    start: Instant,
) -> io::Result<()> {
    let pipe = Pipe::new()?;
    let (src, dst): (&TcpStream, &TcpStream) = (from.as_ref(), to.as_ref());
    loop {
        // Socket → pipe.
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), pipe.write.as_raw_fd(), SPLICE_CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            dir.end(to, false).await?;
            return Ok(());
        }
        // Pipe → socket, all of it, before reading more.
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        dir.moved(n, start);
        dir.spliced.fetch_add(n as u64, Ordering::Relaxed);
        touch(last, start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::AsyncReadExt,
        net::{TcpListener, TcpStream},
    };

    /// A connected pair on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// [`bidirectional`] from a fresh start, with no first read and nobody told of the answer.
    async fn copy_between(
        fc: &mut TcpStream,
        fs: &mut TcpStream,
        path: BytePath,
        settle: bool,
        moved: &Moved,
    ) -> Copied {
        let settings = Settings {
            path,
            buffer: 64 * 1024,
            idle: None,
            settle,
        };
        bidirectional(fc, fs, settings, Instant::now(), moved, &|_| {}, None)
            .await
            .unwrap()
    }

    /// Sends `size` bytes through a forwarder pair on `path` (the backend echoes them), and
    /// returns what came back and how much of it was spliced.
    async fn through(path: BytePath, size: usize) -> (Vec<u8>, u64) {
        let (mut client, mut fc) = pair().await;
        let (mut fs, mut backend) = pair().await;
        let moved = Moved::default();
        let echo = tokio::spawn(async move {
            let (mut r, mut w) = backend.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let data = bytes(size);
        let sent = data.clone();
        let talk = tokio::spawn(async move {
            let (mut r, mut w) = client.split();
            let send = async {
                w.write_all(&sent).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut back = Vec::new();
            let recv = r.read_to_end(&mut back);
            let (_, got) = tokio::join!(send, recv);
            got.unwrap();
            back
        });
        copy_between(&mut fc, &mut fs, path, false, &moved).await;
        // The close passes the last end of stream on, as in the forwarder.
        drop((fc, fs));
        let back = talk.await.unwrap();
        echo.await.unwrap();
        assert_eq!(moved.to_backend.load(Ordering::Relaxed), size as u64);
        assert_eq!(moved.to_client.load(Ordering::Relaxed), size as u64);
        (back, moved.spliced.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn bulk_moves_on_to_splice_and_arrives_intact() {
        let size = 16 << 20;
        let (back, spliced) = through(BytePath::Splice, size).await;
        assert!(back == bytes(size), "echo differs");
        assert!(spliced > 0, "bulk never went by splice");
    }

    /// The client's first read, made before the copy (while the backend's first sign was
    /// awaited), reaches the backend first and once; an end of stream read there ends the
    /// direction.
    #[tokio::test]
    async fn the_first_read_is_passed_on_before_the_rest() {
        let (mut client, mut fc) = pair().await;
        let (mut fs, mut backend) = pair().await;
        client.write_all(b"first ").await.unwrap();
        let first = read_first(&fc, 64 * 1024).await.unwrap();
        assert_eq!(first.filled(), b"first ");
        client.write_all(b"then the rest").await.unwrap();
        client.shutdown().await.unwrap();
        let settings = Settings {
            path: BytePath::Splice,
            buffer: 64 * 1024,
            idle: None,
            settle: false,
        };
        let moved = Moved::default();
        let serve = async {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            backend.shutdown().await.unwrap();
            got
        };
        let copy = bidirectional(
            &mut fc,
            &mut fs,
            settings,
            Instant::now(),
            &moved,
            &|_| {},
            Some(first),
        );
        let (r, got) = tokio::join!(copy, serve);
        r.unwrap();
        assert_eq!(got, b"first then the rest");
        drop((fc, fs));
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert!(back.is_empty());

        // The client ended before saying anything: the backend sees the end at once.
        let (mut client, mut fc) = pair().await;
        let (mut fs, mut backend) = pair().await;
        client.shutdown().await.unwrap();
        let first = read_first(&fc, 64 * 1024).await.unwrap();
        assert!(first.filled().is_empty());
        let serve = async {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            backend.shutdown().await.unwrap();
            got
        };
        let copy = bidirectional(
            &mut fc,
            &mut fs,
            settings,
            Instant::now(),
            &moved,
            &|_| {},
            Some(first),
        );
        let (r, got) = tokio::join!(copy, serve);
        r.unwrap();
        assert!(got.is_empty());
    }

    #[test]
    fn buffer_memory_is_lent_back_and_reused_and_the_spares_are_bounded() {
        let mut first = Buffer::new(FIRST_BUFFER);
        first.bytes = memory(FIRST_BUFFER);
        let at = first.bytes.as_ptr();
        first.lend();
        assert_eq!(
            first.bytes.capacity(),
            0,
            "an idle direction holds no memory"
        );
        let again = memory(FIRST_BUFFER);
        assert_eq!(again.as_ptr(), at, "the last one lent is the next one out");
        let spares = || SPARE.with_borrow(Vec::len);
        let before = spares();
        let mut grown = Buffer::new(FIRST_BUFFER * 2);
        grown.bytes = memory(FIRST_BUFFER * 2);
        drop(grown);
        assert_eq!(spares(), before, "only first-size memory is kept");
        let many: Vec<Buffer> = (0..SPARES + 8)
            .map(|_| {
                let mut b = Buffer::new(FIRST_BUFFER);
                b.bytes = memory(FIRST_BUFFER);
                b
            })
            .collect();
        drop(many);
        assert_eq!(spares(), SPARES, "the spares are bounded");
    }

    /// A bulk upload that starts with short messages (iperf3's data connection: a cookie,
    /// then a stream that may first arrive in short reads) still moves on to splice when the
    /// connection could have settled: asking to settle does not keep bulk on the copy.
    #[tokio::test]
    async fn bulk_after_short_messages_still_goes_by_splice() {
        let (mut client, mut fc) = pair().await;
        let (mut fs, mut backend) = pair().await;
        let size = 16 << 20;
        let talk = tokio::spawn(async move {
            client.write_all(b"cookie").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(b"a short second message").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(&bytes(size)).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let serve = tokio::spawn(async move {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            backend.shutdown().await.unwrap();
            got.len()
        });
        let moved = Moved::default();
        let copied = copy_between(&mut fc, &mut fs, BytePath::Splice, true, &moved).await;
        assert_eq!(copied, Copied::Done);
        drop((fc, fs));
        assert!(talk.await.unwrap().is_empty());
        assert_eq!(serve.await.unwrap(), size + 28);
        assert!(
            moved.spliced.load(Ordering::Relaxed) > 0,
            "the bulk stayed on the copy"
        );
    }

    #[tokio::test]
    async fn short_messages_stay_on_the_copy() {
        let (back, spliced) = through(BytePath::Splice, 3000).await;
        assert_eq!(back, bytes(3000));
        assert_eq!(spliced, 0);
        let (back, spliced) = through(BytePath::Copy, 4 << 20).await;
        assert!(back == bytes(4 << 20), "echo differs");
        assert_eq!(spliced, 0);
    }
}
