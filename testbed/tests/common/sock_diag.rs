//! TCP sockets looked up through the kernel's `sock_diag` netlink interface (what `ss` uses)
//! instead of by reading `/proc/net/tcp`.
//!
//! Under the parallel tests' connection churn (tens of thousands of TIME_WAIT entries) one read of
//! `/proc/net/tcp` took up to 14 s on a 2-core machine: the file comes a page per `read`, and the
//! kernel walks its table again from the start whenever the table changed in between. A poll
//! for the connection of a 3 s request then never saw it held. Here an exact lookup by address is
//! one hash lookup in the kernel, and a dump of listening sockets walks the listening table only.

use std::io;
use std::os::fd::OwnedFd;

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, netlink, recv, send, socket};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const TCP_LISTEN: u8 = 10;
/// `struct nlmsghdr`.
const HEADER: usize = 16;
/// `struct inet_diag_msg` up to and including `idiag_inode`.
const MESSAGE: usize = 72;

/// One socket as the kernel describes it (`struct inet_diag_msg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiagSocket {
    /// The TCP state (`TCP_ESTABLISHED` = 1, `TCP_TIME_WAIT` = 6, `TCP_LISTEN` = 10, …).
    pub state: u8,
    pub local_port: u16,
    pub remote_port: u16,
    /// Bytes received and not read yet by the process that holds the socket (for a listener,
    /// the connections waiting to be accepted).
    pub unread: u32,
    /// The socket's inode: 0 while no process holds it (not accepted yet, or TIME_WAIT).
    pub inode: u32,
}

/// The server side of the loopback connection from `client_port` to `server_port` (IPv4), if the
/// kernel has it: a socket in any state but the listener's (which the kernel's lookup falls back
/// to when no connection has the address).
pub fn tcp4_connection(server_port: u16, client_port: u16) -> io::Result<Option<DiagSocket>> {
    let loopback = [127, 0, 0, 1];
    let mut req = request(AF_INET, u32::MAX, NLM_F_REQUEST);
    // inet_diag_sockid: the lookup takes `src` as the local end and `dst` as the remote one.
    req[HEADER + 8..HEADER + 10].copy_from_slice(&server_port.to_be_bytes());
    req[HEADER + 10..HEADER + 12].copy_from_slice(&client_port.to_be_bytes());
    req[HEADER + 12..HEADER + 16].copy_from_slice(&loopback);
    req[HEADER + 28..HEADER + 32].copy_from_slice(&loopback);
    let found = match exchange(&req) {
        Ok(found) => found,
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(found.into_iter().find(|s| s.state != TCP_LISTEN && s.local_port == server_port && s.remote_port == client_port))
}

/// The TCP sockets listening on `port`, IPv4 and IPv6.
pub fn tcp_listening(port: u16) -> io::Result<Vec<DiagSocket>> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let mut req = request(family, 1 << TCP_LISTEN, NLM_F_REQUEST | NLM_F_DUMP);
        // The kernel skips listeners on other ports itself.
        req[HEADER + 8..HEADER + 10].copy_from_slice(&port.to_be_bytes());
        let found = exchange(&req)?;
        out.extend(found.into_iter().filter(|s| s.state == TCP_LISTEN && s.local_port == port));
    }
    Ok(out)
}

/// A `SOCK_DIAG_BY_FAMILY` request (`nlmsghdr` + `inet_diag_req_v2`) for TCP sockets of `family`
/// in `states`, with an empty socket id and no cookie.
fn request(family: u8, states: u32, flags: u16) -> Vec<u8> {
    let len = HEADER + 56;
    let mut req = vec![0u8; len];
    req[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[HEADER] = family;
    req[HEADER + 1] = IPPROTO_TCP;
    req[HEADER + 4..HEADER + 8].copy_from_slice(&states.to_ne_bytes());
    // idiag_cookie = INET_DIAG_NOCOOKIE.
    req[HEADER + 48..HEADER + 56].fill(0xff);
    req
}

/// Sends `req` to the kernel and reads the answer to the end: every socket it describes, or the
/// error it answered with.
fn exchange(req: &[u8]) -> io::Result<Vec<DiagSocket>> {
    let fd: OwnedFd = socket(AddressFamily::NETLINK, SocketType::DGRAM, Some(netlink::SOCK_DIAG))?;
    send(&fd, req, SendFlags::empty())?;
    let dump = u16::from_ne_bytes([req[6], req[7]]) & NLM_F_DUMP != 0;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, _) = recv(&fd, &mut buf[..], RecvFlags::empty())?;
        let mut at = 0;
        while at + HEADER <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < HEADER || at + len > n {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a truncated netlink message"));
            }
            let body = &buf[at + HEADER..at + len];
            // NLMSG_ERROR carries an errno (0: an acknowledgement), and so does NLMSG_DONE when
            // the dump failed.
            let errno = body.get(0..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
            match kind {
                NLMSG_DONE | NLMSG_ERROR if errno < 0 => return Err(io::Error::from_raw_os_error(-errno)),
                NLMSG_DONE | NLMSG_ERROR => return Ok(out),
                SOCK_DIAG_BY_FAMILY if body.len() >= MESSAGE => out.push(DiagSocket {
                    state: body[1],
                    local_port: u16::from_be_bytes([body[4], body[5]]),
                    remote_port: u16::from_be_bytes([body[6], body[7]]),
                    unread: u32::from_ne_bytes(body[56..60].try_into().unwrap()),
                    inode: u32::from_ne_bytes(body[68..72].try_into().unwrap()),
                }),
                _ => {}
            }
            at += len.next_multiple_of(4);
        }
        if !dump {
            return Ok(out);
        }
    }
}
