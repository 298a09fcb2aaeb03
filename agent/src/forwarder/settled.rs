//! Connections copied by one loop per worker thread on an `epoll` of its own. A client that has
//! asked twice on one connection is a keep-alive client, and from then on each of its messages
//! cost the task-per-connection copy ([`super::copy`]) a wake-up of the connection's task, a
//! poll of both directions and tokio's readiness bookkeeping: about all of the forwarder's user
//! time per keep-alive request (see docs/benchmarks.md, "Eighth pass"). Here an event is a slab
//! lookup and a `recv` into the thread's one scratch buffer; what it returned is sent with the
//! rest of the pass's messages in one `io_uring_enter` ([`Sends`]), where the kernel allows it.
//!
//! A connection whose client's first bytes went with a connect that completed in the call
//! starts here, before its first answer: its sockets never join tokio's event loop, which
//! saves the two `epoll_ctl` that would take them out of it before the close (docs/benchmarks.md,
//! "Twelfth pass"). The loop then tells the backend's health its response time.
//!
//! The connection's task still owns the sockets and everything counted for the connection; it
//! sleeps until the loop says the copy has ended. A cut or a drain deadline aborts that task
//! as before, and dropping its wait takes the connection out of the loop.
//!
//! Bulk is not copied here: a read that fills the scratch buffer sends the connection back to
//! the task's copy (which moves bulk on to `splice(2)`) as soon as nothing is buffered.

use std::{
    cell::RefCell,
    future::Future,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll, Waker},
    time::Instant,
};

use io_uring::{IoUring, opcode, types};
use slab::Slab;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{info, warn};

use super::copy::Moved;
use crate::health::BackendHealth;

/// For a connection that starts on the loop: when its client's first bytes went to the
/// backend, and the backend's health, told the response time when the first answer passes.
pub struct Answer {
    pub asked: Instant,
    pub health: Arc<BackendHealth>,
}

/// How a settled connection's copy ended, if it did not fail.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both directions have seen their end of stream: the sockets can close.
    Done,
    /// A direction carries bulk: back to the task's copy, with nothing buffered and both
    /// directions open.
    Bulk,
}

/// The largest read, and what marks a direction as bulk: the copy's first buffer size.
const SCRATCH: usize = 16 * 1024;

/// Events taken per `epoll_wait`.
const BATCH: usize = 256;

struct Loop {
    ep: RawFd,
    conns: Slab<Conn>,
    scratch: Box<[u8]>,
    /// None where the kernel refuses `io_uring` (a seccomp filter, `io_uring_disabled`):
    /// every send is then its own system call.
    sends: Option<Sends>,
}

thread_local! {
    static LOOP: RefCell<Option<Loop>> = const { RefCell::new(None) };
}

/// Side 0 is the client, side 1 the backend; direction `d` reads side `d` and writes the
/// other one (0: to the backend, 1: to the client).
struct Conn {
    fds: [RawFd; 2],
    /// What the last events said of each side, cleared by the read or write that finds it
    /// no longer so (edge-triggered: an event comes only with news).
    readable: [bool; 2],
    writable: [bool; 2],
    /// The side's end of stream (or a reset) has come: reads go on to return it.
    closed: [bool; 2],
    /// Of those, a FIN with the side's write direction still open: no reset. A read that
    /// empties the queue after it has taken every byte before the FIN.
    fin: [bool; 2],
    dirs: [Dir; 2],
    bulk: bool,
    end: Option<io::Result<Ended>>,
    waker: Option<Waker>,
    answer: Option<Answer>,
}

#[derive(Default)]
struct Dir {
    /// Bytes read but not yet taken by the other side, from `sent` on.
    pending: Vec<u8>,
    sent: usize,
    ended: bool,
    /// The last bytes went with `MSG_MORE`, held for the FIN that follows them.
    corked: bool,
    /// A read emptied the queue after the reading side's FIN: the next read can only return
    /// 0, and is not made.
    drained: bool,
    /// What was read last waits in [`Sends`] for the end of the pass; nothing else moves
    /// this direction before it has gone.
    queued: bool,
    moved: u64,
}

/// The sends of one pass over the events, made in one `io_uring_enter`. Each `send` that
/// wakes the backend lets it preempt the loop on the way back to user space, and the backend
/// then finds one request where the whole pass had several for it (docs/benchmarks.md,
/// "Thirteenth pass"). Inside one system call the loop is not preempted.
struct Sends {
    ring: IoUring,
    /// The bytes of the queued sends, back to back; they stay put until the sends complete.
    bytes: Vec<u8>,
    queued: Vec<Queued>,
}

/// What became of a queued send.
#[derive(Clone, Copy)]
enum Outcome {
    /// The kernel's result: bytes taken, or a negated errno.
    Made(i32),
    /// Never handed to the kernel (the submission queue was full): the bytes are all still
    /// to send.
    NotMade,
    /// Handed to the kernel, which failed before it said whether the send was made.
    Lost,
}

struct Queued {
    key: usize,
    /// The direction whose bytes these are.
    dir: usize,
    fd: RawFd,
    start: usize,
    len: usize,
}

/// Sends per `io_uring_enter`, and the bytes they may hold, before the pass sends early.
const SENDS: usize = 256;
const SEND_BYTES: usize = 256 * 1024;

impl Sends {
    fn new() -> io::Result<Sends> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(SENDS as u32)
            .or_else(|_| IoUring::new(SENDS as u32))?;
        Ok(Sends {
            ring,
            bytes: Vec::new(),
            queued: Vec::with_capacity(SENDS),
        })
    }

    /// Whether one more connection's two directions may not fit.
    fn full(&self) -> bool {
        self.queued.len() + 2 > SENDS || self.bytes.len() > SEND_BYTES
    }

    fn queue(&mut self, key: usize, dir: usize, fd: RawFd, bytes: &[u8]) {
        self.queued.push(Queued {
            key,
            dir,
            fd,
            start: self.bytes.len(),
            len: bytes.len(),
        });
        self.bytes.extend_from_slice(bytes);
    }

    /// Makes the queued sends and waits for them all: each takes what the socket takes now
    /// (`MSG_DONTWAIT`), so none outlives the call. An outcome per queued send.
    fn make(&mut self) -> (Vec<Outcome>, io::Result<()>) {
        let mut results = vec![Outcome::NotMade; self.queued.len()];
        let mut left = 0;
        {
            let mut sq = self.ring.submission();
            for (i, q) in self.queued.iter().enumerate() {
                let send = opcode::Send::new(
                    types::Fd(q.fd),
                    self.bytes[q.start..].as_ptr(),
                    q.len as u32,
                )
                .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
                .build()
                .user_data(i as u64);
                // SAFETY: the bytes are not touched until every completion has come (below),
                // and the descriptor is held open by the connection's task, which cannot run
                // meanwhile (it runs on this thread).
                if unsafe { sq.push(&send) }.is_err() {
                    break;
                }
                results[i] = Outcome::Lost;
                left += 1;
            }
        }
        while left > 0 {
            match self.ring.submit_and_wait(left) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (results, Err(e)),
            }
            for done in self.ring.completion() {
                if let Some(r) = results.get_mut(done.user_data() as usize) {
                    *r = Outcome::Made(done.result());
                    left -= 1;
                }
            }
        }
        (results, Ok(()))
    }
}

/// Starts this worker thread's loop; its connections can settle from then on. Runs until the
/// thread's runtime drops it.
pub async fn drive() {
    let sends = Sends::new()
        .inspect_err(|e| info!("settled loop sends one system call at a time: io_uring: {e}"))
        .ok();
    drive_with(sends).await
}

/// A loop that makes each send its own system call, as where `io_uring` is refused.
#[cfg(test)]
pub async fn drive_without_io_uring() {
    drive_with(None).await
}

async fn drive_with(sends: Option<Sends>) {
    // SAFETY: plain system call; the descriptor it returns is owned below.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if raw < 0 {
        return warn!(
            "forwarder thread without a settled loop: {}",
            io::Error::last_os_error()
        );
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: the AsyncFd owns the descriptor and keeps it open and the same while it holds
    // it.
    let ep = match unsafe { AsyncFd::register_with_interest(ep, Interest::READABLE) } {
        Ok(ep) => ep,
        Err(e) => return warn!("forwarder thread without a settled loop: {e}"),
    };
    LOOP.set(Some(Loop {
        ep: raw,
        conns: Slab::new(),
        scratch: vec![0; SCRATCH].into_boxed_slice(),
        sends,
    }));
    let _gone = Gone;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; BATCH];
    let mut wake = Vec::new();
    loop {
        let Ok(mut ready) = ep.readable().await else {
            return;
        };
        // SAFETY: the buffer holds BATCH events; the descriptor is ours.
        let n = unsafe { libc::epoll_wait(raw, events.as_mut_ptr(), BATCH as i32, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Every connection on it then ends as aborted (see `Settled::poll`).
            warn!("settled loop stops: {e}");
            wake_all();
            return;
        }
        let n = n as usize;
        LOOP.with_borrow_mut(|l| {
            let Some(l) = l else { return };
            for ev in &events[..n] {
                if l.sends.as_ref().is_some_and(Sends::full) {
                    send_queued(l, &mut wake);
                }
                let (key, side) = ((ev.u64 >> 1) as usize, (ev.u64 & 1) as usize);
                let Some(c) = l.conns.get_mut(key) else {
                    continue;
                };
                if c.end.is_some() {
                    continue;
                }
                let bits = ev.events as i32;
                let broken = bits & (libc::EPOLLERR | libc::EPOLLHUP) != 0;
                if broken || bits & (libc::EPOLLIN | libc::EPOLLRDHUP) != 0 {
                    c.readable[side] = true;
                }
                if broken || bits & libc::EPOLLRDHUP != 0 {
                    c.closed[side] = true;
                }
                // A reset, or the peer's FIN after our own shutdown, reports a hang-up: the
                // next read says which.
                c.fin[side] = !broken && (c.fin[side] || bits & libc::EPOLLRDHUP != 0);
                if broken || bits & libc::EPOLLOUT != 0 {
                    c.writable[side] = true;
                }
                if let Some(end) = advance(c, key, &mut l.scratch, l.sends.as_mut()) {
                    c.end = Some(end);
                    wake.extend(c.waker.take());
                }
            }
            send_queued(l, &mut wake);
        });
        wake.drain(..).for_each(Waker::wake);
        // A full batch may have left events behind: look again before sleeping. Otherwise
        // any event since the wait above raises the loop's descriptor again.
        if n < BATCH {
            ready.clear_ready();
        }
    }
}

/// Makes the pass's queued sends, then moves on each direction that had one: what the send
/// left is kept as pending, and what came after it (a FIN, more bytes) goes now.
fn send_queued(l: &mut Loop, wake: &mut Vec<Waker>) {
    let Some(sends) = l.sends.as_mut() else {
        return;
    };
    if sends.queued.is_empty() {
        return;
    }
    let (results, failed) = sends.make();
    let mut again = Vec::with_capacity(sends.queued.len());
    for (q, result) in sends.queued.drain(..).zip(results) {
        let Some(c) = l.conns.get_mut(q.key) else {
            continue;
        };
        let dir = &mut c.dirs[q.dir];
        dir.queued = false;
        let bytes = &sends.bytes[q.start..q.start + q.len];
        match result {
            Outcome::Made(n) if n >= 0 => dir
                .pending
                .extend_from_slice(&bytes[(n as usize).min(q.len)..]),
            Outcome::Made(e) if e == -libc::EAGAIN => {
                c.writable[1 - q.dir] = false;
                dir.pending.extend_from_slice(bytes);
            }
            Outcome::Made(e) => c.end = Some(Err(io::Error::from_raw_os_error(-e))),
            // `advance` below sends it as any pending bytes.
            Outcome::NotMade => dir.pending.extend_from_slice(bytes),
            // Its send may still be made, or not: the connection cannot go on.
            Outcome::Lost => {
                c.end = Some(Err(io::Error::other("io_uring failed with a send queued")))
            }
        }
        if c.end.is_some() {
            wake.extend(c.waker.take());
        } else {
            again.push(q.key);
        }
    }
    sends.bytes.clear();
    if sends.bytes.capacity() > 2 * SEND_BYTES {
        sends.bytes = Vec::new();
    }
    if let Err(e) = failed {
        // Dropping the ring cancels what it still holds.
        warn!("settled loop sends one system call at a time from now on: io_uring: {e}");
        l.sends = None;
    }
    for key in again {
        let Some(c) = l.conns.get_mut(key) else {
            continue;
        };
        if c.end.is_none()
            && let Some(end) = advance(c, key, &mut l.scratch, None)
        {
            c.end = Some(end);
            wake.extend(c.waker.take());
        }
    }
}

/// Takes the loop out of the thread when its runtime drops it: nothing can settle then.
struct Gone;

impl Drop for Gone {
    fn drop(&mut self) {
        let _ = LOOP.try_with(|l| l.borrow_mut().take());
    }
}

fn wake_all() {
    let wakers: Vec<Waker> = LOOP.with_borrow_mut(|l| {
        l.iter_mut()
            .flat_map(|l| l.conns.iter_mut())
            .filter_map(|(_, c)| c.waker.take())
            .collect()
    });
    wakers.into_iter().for_each(Waker::wake);
}

/// How many connections this thread's loop copies.
pub fn connections() -> usize {
    LOOP.with_borrow(|l| l.as_ref().map_or(0, |l| l.conns.len()))
}

/// Whether this thread has a loop for connections to settle on.
pub fn available() -> bool {
    LOOP.with_borrow(Option::is_some)
}

/// Copies between `client` and `server` on this thread's loop until both ends have come, a
/// side fails, or a direction turns out to carry bulk. Nothing must be buffered for either
/// direction when it is called (the task's copy stops each direction between messages). The
/// bytes moved are added to `moved` when it returns or is dropped. `answer`: the backend has
/// not answered yet, and its response time is to be told when it does.
pub async fn copy(
    client: &std::net::TcpStream,
    server: &std::net::TcpStream,
    moved: &Moved,
    answer: Option<Answer>,
) -> io::Result<Ended> {
    let fds = [client.as_raw_fd(), server.as_raw_fd()];
    let key = LOOP.with_borrow_mut(|l| {
        let l = l
            .as_mut()
            .ok_or_else(|| io::Error::other("no settled loop"))?;
        let entry = l.conns.vacant_entry();
        let key = entry.key();
        for (side, fd) in fds.into_iter().enumerate() {
            if let Err(e) = epoll_ctl(l.ep, libc::EPOLL_CTL_ADD, fd, token(key, side)) {
                if side == 1 {
                    let _ = epoll_ctl(l.ep, libc::EPOLL_CTL_DEL, fds[0], 0);
                }
                return Err(e);
            }
        }
        entry.insert(Conn {
            fds,
            readable: [false; 2],
            writable: [true; 2],
            closed: [false; 2],
            fin: [false; 2],
            dirs: Default::default(),
            bulk: false,
            end: None,
            waker: None,
            answer,
        });
        Ok(key)
    })?;
    Settled {
        key,
        moved,
        out: false,
    }
    .await
}

fn token(key: usize, side: usize) -> u64 {
    ((key as u64) << 1) | side as u64
}

fn epoll_ctl(ep: RawFd, op: i32, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
        u64: token,
    };
    // SAFETY: plain system call with a valid event.
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A connection on the loop, waited for by its task.
struct Settled<'a> {
    key: usize,
    moved: &'a Moved,
    /// Taken out of the loop already.
    out: bool,
}

impl Settled<'_> {
    /// Takes the connection out of the loop and counts what it moved there.
    fn take_out(&mut self) -> Option<Conn> {
        if std::mem::replace(&mut self.out, true) {
            return None;
        }
        let c = LOOP
            .try_with(|l| {
                let mut l = l.borrow_mut();
                let l = l.as_mut()?;
                let c = l.conns.try_remove(self.key)?;
                if matches!(c.end, Some(Ok(Ended::Bulk))) {
                    // Back to tokio's event loop: out of this one first.
                    for fd in c.fds {
                        let _ = epoll_ctl(l.ep, libc::EPOLL_CTL_DEL, fd, 0);
                    }
                }
                Some(c)
            })
            .ok()
            .flatten()?;
        let [up, down] = &c.dirs;
        self.moved.to_backend.fetch_add(up.moved, Ordering::Relaxed);
        self.moved
            .to_client
            .fetch_add(down.moved, Ordering::Relaxed);
        Some(c)
    }
}

impl Future for Settled<'_> {
    type Output = io::Result<Ended>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let key = self.key;
        let ended = LOOP.with_borrow_mut(|l| {
            let Some(c) = l.as_mut().and_then(|l| l.conns.get_mut(key)) else {
                return true;
            };
            if c.end.is_some() {
                return true;
            }
            match &c.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => c.waker = Some(cx.waker().clone()),
            }
            false
        });
        if !ended {
            return Poll::Pending;
        }
        let end = self
            .take_out()
            .and_then(|c| c.end)
            .unwrap_or_else(|| Err(io::Error::other("the settled loop stopped")));
        Poll::Ready(end)
    }
}

impl Drop for Settled<'_> {
    fn drop(&mut self) {
        // Aborted (a cut, a drain deadline): the task closes the sockets right after, which
        // takes them out of the epoll set; the entry goes now.
        self.take_out();
    }
}

/// Moves what both directions can move now, queuing plain sends on `sends` for the end of the
/// pass; the end of the copy, if this was it.
fn advance(
    c: &mut Conn,
    key: usize,
    scratch: &mut [u8],
    mut sends: Option<&mut Sends>,
) -> Option<io::Result<Ended>> {
    for d in 0..2 {
        if let Err(e) = pump(c, key, d, scratch, sends.as_deref_mut()) {
            if c.dirs[d].corked {
                // The end was a reset: the bytes held for its FIN go now, before the abort
                // that passes the reset on.
                let _ = socket2::SockRef::from(&borrowed(c.fds[1 - d])).set_tcp_nodelay(true);
            }
            return Some(Err(e));
        }
    }
    let [up, down] = &c.dirs;
    if up.queued || down.queued {
        return None;
    }
    if up.ended && down.ended {
        return Some(Ok(Ended::Done));
    }
    if c.bulk && !up.ended && !down.ended && up.pending.is_empty() && down.pending.is_empty() {
        return Some(Ok(Ended::Bulk));
    }
    None
}

fn borrowed(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only used for a call while the connection's task holds the socket open (the
    // loop never outlives an entry's sockets: the task takes the entry out before closing).
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// One direction: sends what is pending, then reads and sends until the reading side has
/// nothing more or the writing side takes nothing more.
fn pump(
    c: &mut Conn,
    key: usize,
    d: usize,
    scratch: &mut [u8],
    mut sends: Option<&mut Sends>,
) -> io::Result<()> {
    let (from, to) = (d, 1 - d);
    loop {
        let other_ended = c.dirs[to].ended;
        let dir = &mut c.dirs[d];
        if dir.queued {
            return Ok(());
        }
        if dir.sent < dir.pending.len() {
            if !c.writable[to] {
                return Ok(());
            }
            match send(c.fds[to], &dir.pending[dir.sent..], dir.corked) {
                Ok(n) => {
                    dir.sent += n;
                    if dir.sent == dir.pending.len() {
                        // Let go: a connection between messages holds no buffer.
                        dir.pending = Vec::new();
                        dir.sent = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.writable[to] = false;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
            continue;
        }
        if dir.ended || !c.readable[from] || (c.bulk && !other_ended) {
            return Ok(());
        }
        let n = match if dir.drained {
            Ok(0)
        } else {
            recv(c.fds[from], scratch)
        } {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                c.readable[from] = false;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            dir.ended = true;
            // Half-close: the FIN goes on while the other direction runs. Once both have
            // ended, the close sends it.
            if !other_ended {
                shutdown(c.fds[to])?;
            }
            return Ok(());
        }
        dir.moved += n as u64;
        if d == 1
            && let Some(a) = c.answer.take()
        {
            let now = Instant::now();
            // Whole milliseconds, as the task's copy measures it (`Moved::response_time`):
            // one backend's samples from both copies stay comparable.
            let took = now.saturating_duration_since(a.asked).as_millis() as u64;
            a.health
                .observe_at(std::time::Duration::from_millis(took), now);
        }
        if n == scratch.len() {
            c.bulk = true;
        } else if c.fin[from] {
            dir.drained = true;
        } else if !c.closed[from] {
            // A short read emptied the queue; new bytes raise a new event. (With the end
            // already there, the next read returns it.)
            c.readable[from] = false;
        }
        // Bytes right before the end go with `MSG_MORE`, in one segment with its FIN.
        let last = c.closed[from] && n < scratch.len();
        dir.corked = last;
        let bytes = &scratch[..n];
        if !last
            && !c.bulk
            && c.writable[to]
            && let Some(sends) = sends.as_deref_mut()
        {
            sends.queue(key, d, c.fds[to], bytes);
            dir.queued = true;
            return Ok(());
        }
        let sent = if c.writable[to] {
            match send(c.fds[to], bytes, last) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.writable[to] = false;
                    0
                }
                Err(e) => return Err(e),
            }
        } else {
            0
        };
        if sent < n {
            // Kept until the next send takes it: tried again at once, so a short send is
            // followed by the `EAGAIN` that asks the kernel for a write-space event.
            dir.pending.extend_from_slice(&bytes[sent..]);
        }
    }
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the pointer is valid for `buf.len()` bytes; the descriptor is held open by the
    // connection's task.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn send(fd: RawFd, bytes: &[u8], more: bool) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    // SAFETY: the pointer is valid for `bytes.len()` bytes; the descriptor is held open.
    let n = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn shutdown(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain system call on a descriptor held open.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    /// More sends than the ring holds: those it could not take are reported as not made, so
    /// their bytes are sent later rather than the connection aborted.
    #[test]
    fn sends_past_the_ring_are_not_made_and_not_lost() {
        let mut sends = match Sends::new() {
            Ok(sends) => sends,
            Err(e) if std::env::var_os("CI").is_none() => {
                return eprintln!("SKIPPED: io_uring refused here ({e})");
            }
            Err(e) => panic!("io_uring refused under CI: {e}"),
        };
        let (a, b) = UnixStream::pair().expect("socket pair");
        for i in 0..SENDS + 3 {
            sends.queue(i, 0, a.as_raw_fd(), b"x");
        }
        let (results, failed) = sends.make();
        failed.expect("the ring works");
        assert!(
            results[..SENDS]
                .iter()
                .all(|r| matches!(r, Outcome::Made(1)))
        );
        assert!(
            results[SENDS..]
                .iter()
                .all(|r| matches!(r, Outcome::NotMade))
        );
        drop(b);
    }
}
