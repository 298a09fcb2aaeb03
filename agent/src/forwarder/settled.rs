//! Connections copied by one loop per worker thread on an `epoll` of its own. A client that has
//! asked twice on one connection is a keep-alive client, and from then on each of its messages
//! cost the task-per-connection copy ([`super::copy`]) a wake-up of the connection's task, a
//! poll of both directions and tokio's readiness bookkeeping: about all of the forwarder's user
//! time per keep-alive request (see docs/benchmarks.md, "Eighth pass"). Here an event is a slab
//! lookup, a `recv` into the thread's one scratch buffer and a `send` of what it returned.
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

use slab::Slab;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

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
    moved: u64,
}

/// Starts this worker thread's loop; its connections can settle from then on. Runs until the
/// thread's runtime drops it.
pub async fn drive() {
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
                if let Some(end) = advance(c, &mut l.scratch) {
                    c.end = Some(end);
                    wake.extend(c.waker.take());
                }
            }
        });
        wake.drain(..).for_each(Waker::wake);
        // A full batch may have left events behind: look again before sleeping. Otherwise
        // any event since the wait above raises the loop's descriptor again.
        if n < BATCH {
            ready.clear_ready();
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

/// Moves what both directions can move now; the end of the copy, if this was it.
fn advance(c: &mut Conn, scratch: &mut [u8]) -> Option<io::Result<Ended>> {
    for d in 0..2 {
        if let Err(e) = pump(c, d, scratch) {
            if c.dirs[d].corked {
                // The end was a reset: the bytes held for its FIN go now, before the abort
                // that passes the reset on.
                let _ = socket2::SockRef::from(&borrowed(c.fds[1 - d])).set_tcp_nodelay(true);
            }
            return Some(Err(e));
        }
    }
    let [up, down] = &c.dirs;
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
fn pump(c: &mut Conn, d: usize, scratch: &mut [u8]) -> io::Result<()> {
    let (from, to) = (d, 1 - d);
    loop {
        let other_ended = c.dirs[to].ended;
        let dir = &mut c.dirs[d];
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
