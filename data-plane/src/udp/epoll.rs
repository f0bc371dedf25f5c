//! The epoll backend: readiness from epoll, datagrams moved in batches with
//! `recvmmsg` and `sendmmsg`.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg,
};

use super::{BATCH, Backend, Io, MAX_DATAGRAM, SEND_BATCH, Waker};

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
    /// Runs of datagrams to one destination leave as one GSO message.
    gso: bool,
}

impl EpollIo {
    pub(super) fn new(socket: UdpSocket, waker: Waker, gso: bool) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&socket, EpollEvent::new(EpollFlags::EPOLLIN, SOCKET))?;
        epoll.add(waker.fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKER))?;
        Ok(Self {
            socket,
            epoll,
            waker,
            recv_bufs: vec![vec![0; MAX_DATAGRAM]; BATCH],
            send_data: Vec::with_capacity(SEND_BATCH * 1500),
            send_meta: Vec::with_capacity(SEND_BATCH),
            send_drops: 0,
            gso,
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

    /// Sends every queued datagram: runs of datagrams to one destination as
    /// one GSO message where the kernel takes them, messages in as few
    /// `sendmmsg` calls as their segment sizes allow.
    fn send_queued(&mut self) -> io::Result<()> {
        // Where each queued datagram starts in `send_data`, and its length.
        let spans: Vec<(usize, usize)> = self
            .send_meta
            .iter()
            .scan(0, |start, (_, end)| {
                let span = (*start, end - *start);
                *start = *end;
                Some(span)
            })
            .collect();
        let lens: Vec<usize> = spans.iter().map(|(_, len)| *len).collect();
        let dests: Vec<SockaddrStorage> = self.send_meta.iter().map(|(a, _)| *a).collect();
        let messages = if self.gso {
            super::gso_messages(&dests, &lens)
        } else {
            (0..lens.len())
                .map(|i| super::Message { first: i, count: 1 })
                .collect()
        };
        let mut at = 0;
        while at < messages.len() {
            let (run, segment) = super::gso_run(&messages[at..], &lens);
            let sent = self.send_run(&messages[at..at + run], segment, &spans)?;
            at += sent.max(1);
        }
        Ok(())
    }

    /// Sends `messages` (one `sendmmsg`, `segment` as their shared GSO size
    /// when set); returns how many were taken (or dropped).
    fn send_run(
        &mut self,
        messages: &[super::Message],
        segment: Option<u16>,
        spans: &[(usize, usize)],
    ) -> io::Result<usize> {
        if segment.is_some() && !self.gso {
            // GSO was refused earlier in this flush: no message of it goes
            // to the kernel whole again.
            return self.send_plain(messages, spans);
        }
        let fd = self.socket.as_raw_fd();
        let slices: Vec<Vec<IoSlice<'_>>> = messages
            .iter()
            .map(|m| {
                (m.first..m.first + m.count)
                    .map(|i| {
                        let (start, len) = spans[i];
                        IoSlice::new(&self.send_data[start..start + len])
                    })
                    .collect()
            })
            .collect();
        let addrs: Vec<Option<SockaddrStorage>> = messages
            .iter()
            .map(|m| Some(self.send_meta[m.first].0))
            .collect();
        let segment_size = segment.unwrap_or(0);
        let gso_cmsg = [ControlMessage::UdpGsoSegments(&segment_size)];
        let cmsgs: &[ControlMessage<'_>] = if segment.is_some() { &gso_cmsg } else { &[] };
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(
            messages.len(),
            segment.map(|_| nix::cmsg_space!(u16)),
        );
        match sendmmsg(
            fd,
            &mut headers,
            &slices,
            &addrs,
            cmsgs,
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(results) => Ok(results.count()),
            // The device cannot segment (no checksum offload, IPsec):
            // GSO stays off from now on and this run goes out again plainly.
            Err(Errno::EIO | Errno::EINVAL) if segment.is_some() => {
                tracing::warn!("UDP GSO refused by the kernel; sending datagrams one by one");
                self.gso = false;
                drop(slices);
                self.send_plain(messages, spans)
            }
            // A full send buffer or an unreachable peer costs that one message.
            Err(
                Errno::EAGAIN
                | Errno::ENOBUFS
                | Errno::ECONNREFUSED
                | Errno::EHOSTUNREACH
                | Errno::ENETUNREACH
                | Errno::EPERM,
            ) => {
                self.send_drops += messages.first().map_or(1, |m| m.count as u64);
                Ok(1)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends the datagrams of GSO `messages` one by one; returns how many
    /// messages that was.
    fn send_plain(
        &mut self,
        messages: &[super::Message],
        spans: &[(usize, usize)],
    ) -> io::Result<usize> {
        let plain: Vec<super::Message> = messages
            .iter()
            .flat_map(|m| {
                (m.first..m.first + m.count).map(|i| super::Message { first: i, count: 1 })
            })
            .collect();
        let mut at = 0;
        while at < plain.len() {
            at += self.send_run(&plain[at..], None, spans)?.max(1);
        }
        Ok(messages.len())
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
        if self.send_meta.len() >= SEND_BATCH {
            let _ = self.flush();
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.send_meta.is_empty() {
            return Ok(());
        }
        let result = self.send_queued();
        self.send_data.clear();
        self.send_meta.clear();
        result
    }

    fn send_drops(&self) -> u64 {
        self.send_drops
    }
}
