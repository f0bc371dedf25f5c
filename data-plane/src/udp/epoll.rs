//! The epoll backend: readiness from epoll, datagrams moved in batches with
//! `recvmmsg` and `sendmmsg`.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};

use super::{BATCH, Backend, Io, MAX_DATAGRAM, Waker};

const SOCKET: u64 = 1;
const WAKER: u64 = 2;

pub(super) struct EpollIo {
    socket: UdpSocket,
    epoll: Epoll,
    waker: Waker,
    recv_bufs: Vec<Vec<u8>>,
    /// Queued datagrams, back to back, with their destinations and ends.
    send_data: Vec<u8>,
    send_meta: Vec<(SockaddrStorage, usize)>,
    send_drops: u64,
}

impl EpollIo {
    pub(super) fn new(socket: UdpSocket, waker: Waker) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&socket, EpollEvent::new(EpollFlags::EPOLLIN, SOCKET))?;
        epoll.add(waker.fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKER))?;
        Ok(Self {
            socket,
            epoll,
            waker,
            recv_bufs: vec![vec![0; MAX_DATAGRAM]; BATCH],
            send_data: Vec::with_capacity(BATCH * 1500),
            send_meta: Vec::with_capacity(BATCH),
            send_drops: 0,
        })
    }

    /// Reads until the socket is empty; returns how many datagrams came.
    fn recv_all(&mut self, on: &mut dyn FnMut(SocketAddr, &[u8])) -> io::Result<usize> {
        let fd = self.socket.as_raw_fd();
        let mut total = 0;
        loop {
            let outcome = {
                let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
                let mut slices: Vec<[IoSliceMut<'_>; 1]> = self
                    .recv_bufs
                    .iter_mut()
                    .map(|b| [IoSliceMut::new(b)])
                    .collect();
                recvmmsg(
                    fd,
                    &mut headers,
                    slices.iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                )
                .map(|results| {
                    results
                        .map(|m| (m.address.and_then(to_socket_addr), m.bytes))
                        .collect::<Vec<_>>()
                })
            };
            let received = match outcome {
                Ok(received) => received,
                Err(Errno::EAGAIN) => return Ok(total),
                // ICMP errors of earlier sends surface on receive; they concern one peer.
                Err(Errno::ECONNREFUSED | Errno::EHOSTUNREACH | Errno::ENETUNREACH) => continue,
                Err(e) => return Err(e.into()),
            };
            let n = received.len();
            for (i, (from, len)) in received.into_iter().enumerate() {
                if let Some(from) = from {
                    on(from, &self.recv_bufs[i][..len.min(MAX_DATAGRAM)]);
                }
            }
            total += n;
            if n < BATCH {
                return Ok(total);
            }
        }
    }
}

pub(super) fn to_socket_addr(a: SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

impl Io for EpollIo {
    fn backend(&self) -> Backend {
        Backend::Epoll
    }

    fn poll(&mut self, deadline: Instant, on: &mut dyn FnMut(SocketAddr, &[u8])) -> io::Result<()> {
        // Datagrams already waiting are taken without a wait.
        if self.recv_all(on)? > 0 {
            return Ok(());
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        // Round up so a wake-up is never early (which would spin).
        let ms = wait.as_micros().div_ceil(1000).min(60_000) as u16;
        let mut events = [EpollEvent::empty(); 2];
        let n = match self.epoll.wait(&mut events, EpollTimeout::from(ms)) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            match ev.data() {
                SOCKET => {
                    self.recv_all(on)?;
                }
                WAKER => self.waker.drain(),
                _ => {}
            }
        }
        Ok(())
    }

    fn queue(&mut self, destination: SocketAddr, data: &[u8]) {
        self.send_data.extend_from_slice(data);
        self.send_meta
            .push((SockaddrStorage::from(destination), self.send_data.len()));
        if self.send_meta.len() >= BATCH {
            let _ = self.flush();
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.send_meta.is_empty() {
            return Ok(());
        }
        let fd = self.socket.as_raw_fd();
        let mut start = 0;
        let slices: Vec<[IoSlice<'_>; 1]> = self
            .send_meta
            .iter()
            .map(|(_, end)| {
                let s = [IoSlice::new(&self.send_data[start..*end])];
                start = *end;
                s
            })
            .collect();
        let addrs: Vec<Option<SockaddrStorage>> =
            self.send_meta.iter().map(|(a, _)| Some(*a)).collect();
        let mut sent = 0;
        let mut result = Ok(());
        while sent < slices.len() {
            let mut headers =
                MultiHeaders::<SockaddrStorage>::preallocate(slices.len() - sent, None);
            let cmsgs: [nix::sys::socket::ControlMessage<'_>; 0] = [];
            match sendmmsg(
                fd,
                &mut headers,
                &slices[sent..],
                &addrs[sent..],
                cmsgs,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(results) => {
                    let n = results.count();
                    if n == 0 {
                        break;
                    }
                    sent += n;
                }
                // A full send buffer or an unreachable peer costs that one datagram.
                Err(
                    Errno::EAGAIN
                    | Errno::ENOBUFS
                    | Errno::ECONNREFUSED
                    | Errno::EHOSTUNREACH
                    | Errno::ENETUNREACH
                    | Errno::EPERM,
                ) => {
                    self.send_drops += 1;
                    sent += 1;
                }
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            }
        }
        drop(slices);
        self.send_data.clear();
        self.send_meta.clear();
        result
    }

    fn send_drops(&self) -> u64 {
        self.send_drops
    }
}
