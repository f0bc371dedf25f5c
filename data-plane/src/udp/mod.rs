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

/// Datagrams received or sent per system call (or per ring submission).
pub const BATCH: usize = 32;
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
/// unless the kernel refuses it.
pub fn open(socket: UdpSocket, choice: IoChoice) -> io::Result<(Box<dyn Io>, Waker)> {
    socket.set_nonblocking(true)?;
    let waker = Waker::new()?;
    let io: Box<dyn Io> = match choice {
        IoChoice::Epoll => Box::new(epoll::EpollIo::new(socket, waker.clone())?),
        IoChoice::IoUring => Box::new(uring::UringIo::new(socket, waker.clone())?),
        IoChoice::Auto => match uring::UringIo::new(socket.try_clone()?, waker.clone()) {
            Ok(io) => Box::new(io),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring is not available here; using epoll");
                Box::new(epoll::EpollIo::new(socket, waker.clone())?)
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

    /// Both backends move datagrams both ways and wake on demand.
    fn exercise(choice: IoChoice) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let io_addr = socket.local_addr().unwrap();
        let (mut io, waker) = open(socket, choice).unwrap();
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
        exercise(IoChoice::Epoll);
    }

    #[test]
    fn io_uring_backend_carries_datagrams() {
        exercise(IoChoice::IoUring);
    }
}
