//! The io_uring backend: a ring of `RECVMSG` operations kept armed on the
//! shard's socket, `SENDMSG` operations submitted in batches, a `READ` on
//! the waker's eventfd, and waits bounded by the ring's own timeout.
//!
//! This is the one module of the node with `unsafe` code: the kernel reads
//! and writes the buffers, addresses and `msghdr`s of in-flight operations,
//! so they live in boxed slots whose addresses never change and that are not
//! touched (or freed) until their completion has been reaped.
#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Instant;

use io_uring::{IoUring, opcode, types};
use nix::sys::socket::{SockaddrLike, SockaddrStorage};

use super::epoll::to_socket_addr;
use super::{BATCH, Backend, Io, MAX_DATAGRAM, MAX_GSO_BYTES, Waker, joins_gso};

/// Receive operations kept armed. Each one waiting for data is an entry on
/// the socket's wait queue, which the kernel walks on every wakeup, and
/// that includes each datagram this socket sends (its buffer space is given
/// back). With 64, a node sending to 1,000 viewers spent about a sixth
/// more kernel time than with 16, 4 or 1 (no difference among those). A
/// backlog bigger than that is taken in rounds ([`RECV_ROUNDS`]).
const RECV_SLOTS: usize = 16;
/// Rounds of receives one poll takes at most while datagrams keep coming.
const RECV_ROUNDS: usize = 4;
/// Send operations (single datagrams or GSO messages) in flight at most.
const SEND_SLOTS: usize = 128;
/// Room for one GSO message's UDP_SEGMENT control message (cmsghdr + u16,
/// aligned): 8-byte words.
const CONTROL_WORDS: usize = 4;

type OnDatagram<'a> = &'a mut dyn FnMut(SocketAddr, &[u8]);

const WAKER_TAG: u64 = u64::MAX;
const CANCEL_TAG: u64 = u64::MAX - 1;
const SEND_TAG: u64 = 1 << 32;

/// One message's buffer, address, control data and header, never moved
/// while the kernel may use them (slots live in boxed slices that are never
/// resized, and the buffer is a boxed slice of its own).
struct Slot {
    buf: Box<[u8]>,
    addr: SockaddrStorage,
    iov: libc::iovec,
    msg: libc::msghdr,
    control: [u64; CONTROL_WORDS],
    /// Send slots: datagrams in the message (more than one: GSO).
    segments: usize,
}

// SAFETY: the raw pointers in a slot point into the same boxed slot; moving
// the owning `UringIo` to another thread moves no slot memory.
unsafe impl Send for Slot {}

impl Slot {
    fn new(capacity: usize) -> Slot {
        Slot {
            buf: vec![0; capacity].into_boxed_slice(),
            addr: SockaddrStorage::from(SocketAddr::from(([0, 0, 0, 0], 0))),
            // SAFETY: all-zero is a valid iovec and msghdr (null pointers, zero lengths).
            iov: unsafe { std::mem::zeroed() },
            msg: unsafe { std::mem::zeroed() },
            control: [0; CONTROL_WORDS],
            segments: 0,
        }
    }

    /// Asks the kernel to cut the message into datagrams of `segment` bytes
    /// (UDP_SEGMENT); call after `prepare`.
    fn set_segment(&mut self, segment: u16) {
        let header = std::mem::size_of::<libc::cmsghdr>();
        const { assert!(CONTROL_WORDS * 8 >= 24) };
        // SAFETY: all-zero is a valid cmsghdr (some libcs add padding fields).
        let mut cmsg: libc::cmsghdr = unsafe { std::mem::zeroed() };
        cmsg.cmsg_len = (header + 2) as _;
        cmsg.cmsg_level = libc::SOL_UDP;
        cmsg.cmsg_type = libc::UDP_SEGMENT;
        let base: *mut u8 = self.control.as_mut_ptr().cast();
        // SAFETY: `control` is 8-byte aligned (u64 words) and holds at least
        // 24 bytes: one 16-byte cmsghdr, then the u16 at offset 16.
        unsafe {
            std::ptr::write(base.cast::<libc::cmsghdr>(), cmsg);
            std::ptr::write_unaligned(base.add(header).cast::<u16>(), segment);
        }
        self.msg.msg_control = base.cast();
        // CMSG_SPACE(2): the header and the data rounded up to 8 bytes.
        self.msg.msg_controllen = (header + 8) as _;
    }

    /// Points the header at this slot's own buffer and address, `len` bytes.
    fn prepare(&mut self, len: usize) {
        self.iov.iov_base = self.buf.as_mut_ptr().cast();
        self.iov.iov_len = len;
        self.msg.msg_name = (&raw mut self.addr).cast();
        self.msg.msg_namelen = std::mem::size_of::<SockaddrStorage>() as libc::socklen_t;
        self.msg.msg_iov = &raw mut self.iov;
        self.msg.msg_iovlen = 1;
        self.msg.msg_control = std::ptr::null_mut();
        self.msg.msg_controllen = 0;
        self.msg.msg_flags = 0;
    }
}

pub(super) struct UringIo {
    socket: UdpSocket,
    ring: IoUring,
    waker: Waker,
    waker_buf: Box<u64>,
    /// Fixed-size boxed slices: never resized, so slots never move.
    recv: Box<[Slot]>,
    send: Box<[Slot]>,
    free_send: Vec<usize>,
    /// Sends pushed but not yet submitted.
    unsubmitted: usize,
    /// Receive completions reaped while waiting for send slots, delivered at
    /// the next poll: (slot, length).
    ready: Vec<(usize, usize)>,
    send_drops: u64,
    /// The send slot still being filled: more datagrams to its destination
    /// may join it as GSO segments until it is pushed to the ring.
    open: Option<OpenSend>,
    gso: bool,
}

/// A send slot being filled.
struct OpenSend {
    slot: usize,
    destination: SocketAddr,
    /// Size of every segment but the last.
    segment: usize,
    len: usize,
    /// A shorter datagram ended the message.
    closed: bool,
}

impl UringIo {
    pub(super) fn new(socket: UdpSocket, waker: Waker, gso: bool) -> io::Result<Self> {
        let ring = IoUring::new((RECV_SLOTS + SEND_SLOTS + 8).next_power_of_two() as u32)?;
        let mut me = Self {
            socket,
            ring,
            waker,
            waker_buf: Box::new(0),
            recv: (0..RECV_SLOTS).map(|_| Slot::new(MAX_DATAGRAM)).collect(),
            send: (0..SEND_SLOTS)
                .map(|_| Slot::new(if gso { MAX_GSO_BYTES } else { MAX_DATAGRAM }))
                .collect(),
            free_send: (0..SEND_SLOTS).rev().collect(),
            unsubmitted: 0,
            ready: Vec::new(),
            send_drops: 0,
            open: None,
            gso,
        };
        for i in 0..RECV_SLOTS {
            me.arm_recv(i)?;
        }
        me.arm_waker()?;
        me.ring.submit()?;
        // Probe once: a kernel that forbids io_uring fails here, not later.
        Ok(me)
    }

    fn push(&mut self, entry: &io_uring::squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry built here points into a boxed slot (or the
            // boxed waker buffer) of `self`, which stays alive and in place
            // until the operation's completion is reaped; see `Slot`.
            let pushed = unsafe { self.ring.submission().push(entry).is_ok() };
            if pushed {
                return Ok(());
            }
            // The submission queue is full: hand it to the kernel.
            self.ring.submit()?;
        }
    }

    fn arm_recv(&mut self, i: usize) -> io::Result<()> {
        let fd = types::Fd(self.socket.as_raw_fd());
        let slot = &mut self.recv[i];
        slot.prepare(MAX_DATAGRAM);
        let entry = opcode::RecvMsg::new(fd, &raw mut slot.msg)
            .build()
            .user_data(i as u64);
        self.push(&entry)
    }

    fn arm_waker(&mut self) -> io::Result<()> {
        let fd = types::Fd(self.waker.fd().as_raw_fd());
        let buf: *mut u64 = &mut *self.waker_buf;
        let entry = opcode::Read::new(fd, buf.cast(), 8)
            .build()
            .user_data(WAKER_TAG);
        self.push(&entry)
    }

    /// After a round that received, a few more: the receives just armed
    /// again complete at once when datagrams are waiting, so a backlog
    /// (what came in during a long fan-out) is taken in before the next
    /// send; [`RECV_ROUNDS`] rounds in all at most.
    fn receive_more(&mut self, on: OnDatagram<'_>) -> io::Result<()> {
        for _ in 1..RECV_ROUNDS {
            if self.reap(Some(&mut *on))? == 0 {
                break;
            }
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Handles every completion in the queue. Receives go to `on` when given,
    /// else they are kept for the next poll.
    fn reap(&mut self, mut on: Option<OnDatagram<'_>>) -> io::Result<usize> {
        let mut received = 0;
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (tag, result) in done {
            if tag == WAKER_TAG {
                self.arm_waker()?;
            } else if tag == CANCEL_TAG {
            } else if tag >= SEND_TAG {
                let i = (tag - SEND_TAG) as usize;
                if result < 0 {
                    let segments = self.send[i].segments;
                    self.send_drops += segments as u64;
                    if segments > 1 && (result == -libc::EIO || result == -libc::EINVAL) {
                        // The device cannot segment (no checksum offload,
                        // IPsec): GSO stays off from now on.
                        tracing::warn!(
                            "UDP GSO refused by the kernel; sending datagrams one by one"
                        );
                        self.gso = false;
                    }
                }
                self.free_send.push(i);
            } else {
                let i = tag as usize;
                if result >= 0 {
                    received += 1;
                    let len = (result as usize).min(MAX_DATAGRAM);
                    match on.as_mut() {
                        Some(on) => self.deliver(i, len, &mut **on),
                        None => {
                            self.ready.push((i, len));
                            continue;
                        }
                    }
                }
                // Errors (ICMP from a peer gone away) concern one datagram.
                self.arm_recv(i)?;
            }
        }
        Ok(received)
    }

    /// Pushes the send slot being filled to the ring: one datagram, or a
    /// GSO message of several.
    fn close_open(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        let fd = types::Fd(self.socket.as_raw_fd());
        let slot = &mut self.send[open.slot];
        slot.prepare(open.len);
        slot.addr = SockaddrStorage::from(open.destination);
        slot.msg.msg_namelen = slot.addr.len();
        if slot.segments > 1 {
            slot.set_segment(open.segment as u16);
        }
        let entry = opcode::SendMsg::new(fd, &raw const slot.msg)
            .build()
            .user_data(SEND_TAG + open.slot as u64);
        if self.push(&entry).is_err() {
            self.send_drops += self.send[open.slot].segments as u64;
            self.free_send.push(open.slot);
            return;
        }
        self.unsubmitted += 1;
        if self.unsubmitted >= BATCH {
            self.unsubmitted = 0;
            let _ = self.ring.submit();
        }
    }

    fn deliver(&mut self, i: usize, len: usize, on: &mut dyn FnMut(SocketAddr, &[u8])) {
        let slot = &self.recv[i];
        if let Some(from) = to_socket_addr(slot.addr) {
            on(from, &slot.buf[..len]);
        }
    }
}

impl Io for UringIo {
    fn backend(&self) -> Backend {
        Backend::IoUring
    }

    fn poll(&mut self, deadline: Instant, on: &mut dyn FnMut(SocketAddr, &[u8])) -> io::Result<()> {
        self.close_open();
        let ready = std::mem::take(&mut self.ready);
        let had_ready = !ready.is_empty();
        for (i, len) in ready {
            self.deliver(i, len, on);
            self.arm_recv(i)?;
        }
        self.unsubmitted = 0;
        if had_ready || self.reap(Some(on))? > 0 {
            self.ring.submit()?;
            self.receive_more(on)?;
            return Ok(());
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            self.ring.submit()?;
            return Ok(());
        }
        let ts = types::Timespec::new()
            .sec(wait.as_secs())
            .nsec(wait.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::ETIME)
                    || e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
        let received = self.reap(Some(on))?;
        self.ring.submit()?;
        if received > 0 {
            self.receive_more(on)?;
        }
        Ok(())
    }

    fn queue(&mut self, destination: SocketAddr, data: &[u8]) {
        if data.len() > MAX_DATAGRAM {
            self.send_drops += 1;
            return;
        }
        if let Some(open) = self.open.as_mut()
            && self.gso
            && open.destination == destination
            && !open.closed
            && joins_gso(
                open.segment,
                self.send[open.slot].segments,
                open.len,
                data.len(),
            )
        {
            let slot = &mut self.send[open.slot];
            slot.buf[open.len..open.len + data.len()].copy_from_slice(data);
            slot.segments += 1;
            open.len += data.len();
            open.closed = data.len() < open.segment;
            return;
        }
        self.close_open();
        let i = loop {
            if let Some(i) = self.free_send.pop() {
                break i;
            }
            // Every send slot is in flight: wait for one to complete.
            if self.ring.submit_and_wait(1).is_err() || self.reap(None).is_err() {
                self.send_drops += 1;
                return;
            }
        };
        let slot = &mut self.send[i];
        slot.buf[..data.len()].copy_from_slice(data);
        slot.segments = 1;
        let open = OpenSend {
            slot: i,
            destination,
            segment: data.len(),
            len: data.len(),
            closed: false,
        };
        self.open = Some(open);
        if !self.gso {
            self.close_open();
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.close_open();
        if self.unsubmitted > 0 {
            self.unsubmitted = 0;
            self.ring.submit()?;
        }
        Ok(())
    }

    fn send_drops(&self) -> u64 {
        self.send_drops
    }
}

impl Drop for UringIo {
    fn drop(&mut self) {
        // In-flight operations still point into our slots: cancel them all and
        // wait until the kernel has let go before the slots are freed.
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL_TAG);
        // SAFETY: the cancel entry references no memory of ours.
        if unsafe { self.ring.submission().push(&cancel) }.is_ok() {
            let _ = self.ring.submit();
        }
        // A slot still being filled was never handed to the kernel.
        let filling = usize::from(self.open.is_some());
        let in_flight = RECV_SLOTS + 1 + (SEND_SLOTS - self.free_send.len() - filling);
        let mut seen = 0;
        let deadline = Instant::now() + std::time::Duration::from_secs(2);
        let ts = types::Timespec::new().nsec(100_000_000);
        while seen < in_flight && Instant::now() < deadline {
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            seen += self
                .ring
                .completion()
                .filter(|c| c.user_data() != CANCEL_TAG)
                .count();
        }
        if seen < in_flight {
            // The kernel did not release every buffer: leak them rather than
            // free memory it may still write to.
            std::mem::forget(std::mem::replace(&mut self.recv, Box::new([])));
            std::mem::forget(std::mem::replace(&mut self.send, Box::new([])));
            std::mem::forget(std::mem::replace(&mut self.waker_buf, Box::new(0)));
        }
    }
}
