//! Batched UDP I/O for the shards behind one small interface, so a shard
//! does not care which backend runs: io_uring where the kernel allows it,
//! epoll with `recvmmsg`/`sendmmsg` otherwise (containers often forbid
//! io_uring). Chosen once at start: `auto` tries io_uring and falls back.

mod epoll;
mod uring;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use nix::sys::eventfd::{EfdFlags, EventFd};

/// Datagrams received per system call, and sends per ring submission.
pub const BATCH: usize = 32;
/// Datagrams queued before the epoll backend sends them without waiting
/// for a flush.
const SEND_BATCH: usize = 256;
/// Most segments in one GSO message (the kernel's `UDP_MAX_SEGMENTS`).
const MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO message.
const MAX_GSO_BYTES: usize = 32 * 1024;
/// Largest datagram received; WebRTC stays well under it.
pub const MAX_DATAGRAM: usize = 2048;

/// Which I/O backend a shard runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    IoUring,
    Epoll,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::IoUring => "io_uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// Datagrams that leave in one `sendmsg`: `count` queued datagrams from
/// `first` on, to one destination, every one but the last of the same size
/// (a GSO message, `UDP_SEGMENT`), or one datagram alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Message {
    first: usize,
    count: usize,
}

/// Whether a datagram of `len` bytes to the same peer may join a GSO message
/// of `segment`-byte datagrams that holds `count` of them, `total` bytes, and
/// has not yet been ended by a shorter one. (Both backends group by this.)
fn joins_gso(segment: usize, count: usize, total: usize, len: usize) -> bool {
    len <= segment && count < MAX_SEGMENTS && total + len <= MAX_GSO_BYTES
}

/// Cuts queued datagrams (destinations and lengths, in order) into GSO
/// messages: a run to one destination whose datagrams are as long as the
/// first, and a last one that may be shorter. A peer's order is kept.
fn gso_messages<A: PartialEq>(dests: &[A], lens: &[usize]) -> Vec<Message> {
    let mut messages = Vec::new();
    let mut i = 0;
    while i < lens.len() {
        let (segment, mut total, mut count) = (lens[i], lens[i], 1);
        while i + count < lens.len() {
            let j = i + count;
            if dests[j] != dests[i] || !joins_gso(segment, count, total, lens[j]) {
                break;
            }
            total += lens[j];
            count += 1;
            if lens[j] < segment {
                break;
            }
        }
        messages.push(Message { first: i, count });
        i += count;
    }
    messages
}

/// How many of `messages` (at least one) can share one `sendmmsg` call,
/// and their shared segment size: GSO messages of one segment size, and
/// single datagrams no longer than it (the kernel sends those as they are).
fn gso_run(messages: &[Message], lens: &[usize]) -> (usize, Option<u16>) {
    // sendmmsg takes at most UIO_MAXIOV messages.
    const MAX_RUN: usize = 1024;
    let mut segment: Option<usize> = None;
    let mut longest_single = 0;
    let mut n = 0;
    for m in messages.iter().take(MAX_RUN) {
        let len = lens[m.first];
        if m.count == 1 {
            if segment.is_some_and(|s| len > s) {
                break;
            }
            longest_single = longest_single.max(len);
        } else {
            match segment {
                None if longest_single <= len => segment = Some(len),
                Some(s) if s == len => {}
                _ => break,
            }
        }
        n += 1;
    }
    (n.max(1), segment.map(|s| s as u16))
}

/// What the operator asked for (`--io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoChoice {
    /// io_uring if the kernel allows it, else epoll.
    #[default]
    Auto,
    IoUring,
    Epoll,
}

impl std::str::FromStr for IoChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoChoice::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(IoChoice::IoUring),
            "epoll" => Ok(IoChoice::Epoll),
            other => Err(format!(
                "unknown I/O backend {other:?}: expected auto, io_uring or epoll"
            )),
        }
    }
}

/// Wakes a shard blocked in [`Io::poll`] (a command arrived, or shutdown).
#[derive(Clone, Debug)]
pub struct Waker(Arc<EventFd>);

impl Waker {
    fn new() -> io::Result<Self> {
        Ok(Self(Arc::new(EventFd::from_flags(
            EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
        )?)))
    }

    /// Makes the next (or current) poll return.
    pub fn wake(&self) {
        // EAGAIN means the counter is already non-zero: the shard will wake.
        let _ = self.0.write(1);
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }

    fn drain(&self) {
        let _ = self.0.read();
    }
}

/// A shard's socket: batched receive and send.
pub trait Io: Send {
    fn backend(&self) -> Backend;

    /// Waits until datagrams arrive, the waker fires, or `deadline` passes,
    /// and hands every received datagram to `on`.
    fn poll(&mut self, deadline: Instant, on: &mut dyn FnMut(SocketAddr, &[u8])) -> io::Result<()>;

    /// Queues a datagram; it leaves with the next [`Io::flush`] (or sooner
    /// when the batch is full).
    fn queue(&mut self, destination: SocketAddr, data: &[u8]);

    /// Sends what is queued.
    fn flush(&mut self) -> io::Result<()>;

    /// Datagrams dropped because the kernel refused them (send buffer full).
    fn send_drops(&self) -> u64;
}

/// Opens the backend `choice` asks for on `socket`; with `Auto`, io_uring
/// unless the kernel refuses it. With `gso`, consecutive datagrams to one
/// peer (a video frame's packets) leave as one GSO message (`UDP_SEGMENT`)
/// where the kernel allows it; where it refuses, GSO turns itself off.
pub fn open(socket: UdpSocket, choice: IoChoice, gso: bool) -> io::Result<(Box<dyn Io>, Waker)> {
    socket.set_nonblocking(true)?;
    let waker = Waker::new()?;
    let io: Box<dyn Io> = match choice {
        IoChoice::Epoll => Box::new(epoll::EpollIo::new(socket, waker.clone(), gso)?),
        IoChoice::IoUring => Box::new(uring::UringIo::new(socket, waker.clone(), gso)?),
        IoChoice::Auto => match uring::UringIo::new(socket.try_clone()?, waker.clone(), gso) {
            Ok(io) => Box::new(io),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring is not available here; using epoll");
                Box::new(epoll::EpollIo::new(socket, waker.clone(), gso)?)
            }
        },
    };
    Ok((io, waker))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn gso_messages_group_a_peers_equal_datagrams_and_a_shorter_last() {
        let m = |first, count| Message { first, count };
        // Peer 1: a frame of three full packets and a short one, then audio;
        // peer 2: one packet; peer 1 again.
        let dests = [1, 1, 1, 1, 1, 2, 1];
        let lens = [1200, 1200, 1200, 700, 120, 1200, 1200];
        assert_eq!(
            gso_messages(&dests, &lens),
            vec![m(0, 4), m(4, 1), m(5, 1), m(6, 1)]
        );
        // A longer datagram starts a new message; so does the segment limit.
        assert_eq!(gso_messages(&[1, 1], &[100, 200]), vec![m(0, 1), m(1, 1)]);
        let many = vec![7; MAX_SEGMENTS + 3];
        let lens = vec![100; MAX_SEGMENTS + 3];
        assert_eq!(
            gso_messages(&many, &lens),
            vec![m(0, MAX_SEGMENTS), m(MAX_SEGMENTS, 3)]
        );
        // And the byte limit.
        let lens = vec![2000; 20];
        let per = MAX_GSO_BYTES / 2000;
        assert_eq!(gso_messages(&[3; 20], &lens)[0], m(0, per));
    }

    #[test]
    fn gso_runs_share_one_segment_size() {
        let m = |first, count| Message { first, count };
        let lens = [120, 1200, 1200, 700, 1200, 1200, 100, 1000, 1000, 1300];
        // Audio (120), a GSO message of 1200s, then another, then a single
        // datagram: one run with segment 1200.
        let messages = [m(0, 1), m(1, 3), m(4, 2), m(6, 1), m(7, 2), m(9, 1)];
        assert_eq!(gso_run(&messages, &lens), (4, Some(1200)));
        // A GSO message of another size, then a single datagram longer than it.
        assert_eq!(gso_run(&messages[4..], &lens), (1, Some(1000)));
        assert_eq!(gso_run(&messages[5..], &lens), (1, None));
        // Singles only: no GSO at all; a single longer than a later segment
        // ends the run before it.
        assert_eq!(gso_run(&[m(9, 1), m(7, 2)], &lens), (1, None));
    }

    /// Both backends move datagrams both ways and wake on demand.
    fn exercise(choice: IoChoice, gso: bool) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let io_addr = socket.local_addr().unwrap();
        let (mut io, waker) = open(socket, choice, gso).unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        io.queue(peer.local_addr().unwrap(), b"hello");
        io.flush().unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"hello"[..], io_addr));
        for i in 0..100u8 {
            peer.send_to(&[i; 100], io_addr).unwrap();
        }
        let mut seen = 0;
        let deadline = Instant::now() + Duration::from_secs(2);
        while seen < 100 && Instant::now() < deadline {
            io.poll(
                Instant::now() + Duration::from_millis(200),
                &mut |from, data| {
                    assert_eq!(from, peer.local_addr().unwrap());
                    assert_eq!(data.len(), 100);
                    seen += 1;
                },
            )
            .unwrap();
        }
        assert_eq!(seen, 100, "{choice:?} received everything");
        // A batch bigger than one system call leaves in order.
        for i in 0..(BATCH as u8 * 3) {
            io.queue(peer.local_addr().unwrap(), &[i; 10]);
        }
        io.flush().unwrap();
        let mut buf = [0u8; 64];
        for i in 0..(BATCH as u8 * 3) {
            let (n, _) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 10]);
        }
        // Frames to several peers, interleaved as a shard sends them: every
        // peer gets every datagram, whole and in order (GSO messages are
        // cut back into the datagrams they were made of).
        let peers: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let frame = |p: usize, f: u8| -> Vec<Vec<u8>> {
            let mut d: Vec<Vec<u8>> = (0..4u8).map(|i| vec![f * 16 + i; 1100 + p]).collect();
            d.push(vec![f * 16 + 4; 300]);
            d
        };
        for f in 0..3u8 {
            for (p, peer) in peers.iter().enumerate() {
                for d in frame(p, f) {
                    io.queue(peer.local_addr().unwrap(), &d);
                }
                io.queue(peer.local_addr().unwrap(), &[0xee; 90]);
            }
        }
        io.flush().unwrap();
        let mut buf = [0u8; 2048];
        for (p, peer) in peers.iter().enumerate() {
            peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            for f in 0..3u8 {
                let mut want = frame(p, f);
                want.push(vec![0xee; 90]);
                for w in want {
                    let (n, from) = peer.recv_from(&mut buf).unwrap();
                    assert_eq!(from, io_addr);
                    assert_eq!(&buf[..n], &w[..], "{choice:?} gso={gso} peer {p} frame {f}");
                }
            }
        }
        assert_eq!(io.send_drops(), 0);
        // The waker ends a long poll at once.
        let w = waker.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.wake();
        });
        let start = Instant::now();
        io.poll(Instant::now() + Duration::from_secs(5), &mut |_, _| {})
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(2), "woken early");
        t.join().unwrap();
        // A deadline in the past returns at once.
        io.poll(Instant::now(), &mut |_, _| {}).unwrap();
    }

    #[test]
    fn epoll_backend_carries_datagrams() {
        exercise(IoChoice::Epoll, false);
        exercise(IoChoice::Epoll, true);
    }

    #[test]
    fn io_uring_backend_carries_datagrams() {
        exercise(IoChoice::IoUring, false);
        exercise(IoChoice::IoUring, true);
    }

    /// What piled up while a shard was busy (more than the receives it
    /// keeps armed) is taken in by one poll, before the shard sends again.
    #[test]
    fn io_uring_takes_a_backlog_in_one_poll() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let io_addr = socket.local_addr().unwrap();
        let (mut io, _waker) = open(socket, IoChoice::IoUring, true).unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..40u8 {
            peer.send_to(&[i; 100], io_addr).unwrap();
        }
        let mut got = Vec::new();
        io.poll(Instant::now() + Duration::from_secs(2), &mut |_, data| {
            got.push(data[0])
        })
        .unwrap();
        assert_eq!(got, (0..40).collect::<Vec<u8>>(), "all 40, in order");
    }
}
