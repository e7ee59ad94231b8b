//! Listening sockets: bound by the master, inherited and checked by workers.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{OwnedFd, RawFd};

use socket2::{Domain, Socket, Type};

use crate::error::Error;

/// Binds the cluster's listening sockets: with `per_slot`, one `SO_REUSEPORT` socket per slot
/// (`Balance::ReusePort`), else one in all (`Balance::Shared`). All are close-on-exec; workers get theirs through explicit fd
/// mappings. Returns the sockets and the address actually bound (the real port for port 0).
///
/// With `ReusePort`, a probe socket *without* `SO_REUSEPORT` is bound first: if anybody else
/// holds the address (even another `SO_REUSEPORT` group of the same user, which the kernel would
/// otherwise let us join silently) this fails with "address in use" before any worker exists.
/// The probe stays bound (not listening, `SO_REUSEADDR`, so the slots' sockets may bind beside
/// it) until the sockets asked for here are bound: for port 0, the kernel gives the port it
/// chose to no other `connect` (which would make the slots' binds fail) or `bind` to port 0
/// (which, with `SO_REUSEPORT` and the same user, would be joined) in between. A socket bound
/// to that port by number is the README's caveat, as for any port.
pub(crate) fn bind_listeners(
    addr: SocketAddr,
    per_slot: bool,
    slots: usize,
    backlog: u32,
    v6only: bool,
) -> Result<(Vec<OwnedFd>, SocketAddr), Error> {
    let bind_err = |source| Error::Bind { addr, source };
    let backlog = backlog.min(i32::MAX as u32) as i32;
    if !per_slot {
        let s = new_socket(addr, false, v6only).map_err(bind_err)?;
        s.bind(&addr.into()).map_err(bind_err)?;
        s.listen(backlog).map_err(bind_err)?;
        let local = local_addr(&s).map_err(bind_err)?;
        return Ok((vec![s.into()], local));
    }
    let probe = new_socket(addr, false, v6only).map_err(bind_err)?;
    probe.bind(&addr.into()).map_err(bind_err)?;
    let real = local_addr(&probe).map_err(bind_err)?;
    let mut fds = Vec::with_capacity(slots);
    for _ in 0..slots {
        fds.push(bind_reuseport(real, backlog, v6only).map_err(|source| Error::Bind { addr: real, source })?);
    }
    drop(probe);
    Ok((fds, real))
}

/// One more `SO_REUSEPORT` socket on `addr` (for a slot added while running).
pub(crate) fn bind_reuseport(addr: SocketAddr, backlog: i32, v6only: bool) -> io::Result<OwnedFd> {
    let s = new_socket(addr, true, v6only)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    // One per slot, kept by the master: above the numbers a spawn copies.
    Ok(crate::os::sys::lift(s.into()))
}

fn new_socket(addr: SocketAddr, reuse_port: bool, v6only: bool) -> io::Result<Socket> {
    // socket2 creates sockets with SOCK_CLOEXEC on Linux.
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // `::` serves IPv4 too, whatever the system's default, unless asked otherwise.
        s.set_only_v6(v6only)?;
    }
    Ok(s)
}

fn local_addr(s: &Socket) -> io::Result<SocketAddr> {
    s.local_addr()?.as_socket().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an internet socket"))
}

/// Why a unix socket path cannot be listened on, for the caller to name its listener.
#[derive(Debug)]
pub(crate) enum UnixBindError {
    /// A mistake of the configuration or the system state: what to do.
    Refused(String),
    /// The system call failed.
    Io(&'static str, io::Error),
}

impl std::fmt::Display for UnixBindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnixBindError::Refused(why) => f.write_str(why),
            UnixBindError::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

/// A unix socket file this process created: removed when dropped, only if the path still
/// names that very file (device and inode), so a socket another server put there since stays.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: std::path::PathBuf,
    id: (u64, u64),
    /// Another process took it over (an upgrade's new master): never removed by this one.
    disowned: bool,
}

impl SocketFile {
    /// The file a predecessor created (an upgrade): this process removes it from now on.
    pub(crate) fn adopt(path: std::path::PathBuf, id: (u64, u64)) -> SocketFile {
        SocketFile { path, id, disowned: false }
    }

    /// Its device and inode.
    pub(crate) fn id(&self) -> (u64, u64) {
        self.id
    }

    /// Another process removes it from now on (the new master of an upgrade).
    pub(crate) fn disown(&mut self) {
        self.disowned = true;
    }

    /// This process removes it again (the new master of an upgrade failed before it took over).
    pub(crate) fn reclaim(&mut self) {
        self.disowned = false;
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if self.disowned {
            return;
        }
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Listens on the unix socket `path` with `backlog`, then applies `mode` and the owner (uid,
/// gid; `None` keeps it). The directory must exist and belong to this user (or root); a
/// socket file left by a dead server is replaced, a live one (it accepts a connection) is an
/// error, and so is anything else at the path.
pub(crate) fn bind_unix_path(
    path: &std::path::Path,
    backlog: u32,
    mode: Option<u32>,
    owner: (Option<u32>, Option<u32>),
) -> Result<(OwnedFd, SocketFile), UnixBindError> {
    use UnixBindError::{Io, Refused};
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let meta = std::fs::metadata(dir).map_err(|e| {
        Refused(format!("its directory {} is missing ({e}); create it first, or choose another path", dir.display()))
    })?;
    let euid = rustix::process::geteuid().as_raw();
    if !meta.is_dir() {
        return Err(Refused(format!("{} is not a directory; choose a path in a directory", dir.display())));
    }
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(Refused(format!(
            "its directory {} belongs to uid {}, not to this user ({euid}) nor root; use a directory of this user",
            dir.display(),
            meta.uid()
        )));
    }
    if let Ok(existing) = std::fs::symlink_metadata(path) {
        if !existing.file_type().is_socket() {
            return Err(Refused(format!(
                "{} exists and is not a socket; remove it or choose another path",
                path.display()
            )));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(Refused(format!(
                    "another server listens on {}; stop it or choose another path",
                    path.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("replacing the stale socket {} (nobody listens on it)", path.display());
                std::fs::remove_file(path).map_err(|e| Io("cannot remove the stale socket", e))?;
            }
            Err(e) => {
                return Err(Refused(format!(
                    "{} cannot be checked ({e}); remove it or choose another path",
                    path.display()
                )));
            }
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| Io("cannot listen", e))?;
    socket2::SockRef::from(&listener)
        .listen(backlog.min(i32::MAX as u32) as i32)
        .map_err(|e| Io("cannot set the backlog", e))?;
    let created = std::fs::symlink_metadata(path).map_err(|e| Io("cannot read the new socket", e))?;
    // From here on the file is ours: dropped on any error below, it is removed.
    let file = SocketFile { path: path.to_owned(), id: (created.dev(), created.ino()), disowned: false };
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Io("cannot set its mode", e))?;
    }
    if owner != (None, None) {
        std::os::unix::fs::chown(path, owner.0, owner.1).map_err(|e| Io("cannot set its owner", e))?;
    }
    Ok((listener.into(), file))
}

/// Listens on the abstract unix socket `name` (Linux: no file; it vanishes with its last
/// holder).
pub(crate) fn bind_unix_abstract(name: &str, backlog: u32) -> Result<OwnedFd, UnixBindError> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| UnixBindError::Refused(format!("@{name} is not an abstract socket name ({e})")))?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            UnixBindError::Refused(format!("another server listens on @{name}; stop it or choose another name"))
        } else {
            UnixBindError::Io("cannot listen", e)
        }
    })?;
    socket2::SockRef::from(&listener)
        .listen(backlog.min(i32::MAX as u32) as i32)
        .map_err(|e| UnixBindError::Io("cannot set the backlog", e))?;
    Ok(listener.into())
}

/// Where a socket systemd passed listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PassedAddr {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
    Abstract(String),
    /// A unix socket without a name.
    Unnamed,
}

/// A listening socket systemd passed by socket activation.
#[derive(Debug)]
pub(crate) struct Passed {
    /// Its name in `LISTEN_FDNAMES` (`"unknown"` when systemd gave none, as `sd_listen_fds_with_names`).
    pub(crate) name: String,
    pub(crate) fd: OwnedFd,
    pub(crate) addr: PassedAddr,
}

/// The listening sockets systemd passed by socket activation (`LISTEN_PID` is this process,
/// `LISTEN_FDS` ≥ 1: fds 3, 4, …, named by `LISTEN_FDNAMES`), each checked to be a listening
/// TCP or unix stream socket and made close-on-exec. Empty without socket activation.
pub(crate) fn activated_sockets() -> Result<Vec<Passed>, Error> {
    let var = |k| std::env::var(k).ok().and_then(|v| v.parse::<u32>().ok());
    let ours = var("LISTEN_PID") == Some(rustix::process::getpid().as_raw_nonzero().get() as u32);
    let count = var("LISTEN_FDS").unwrap_or(0).min(1024);
    if !ours || count == 0 {
        return Ok(Vec::new());
    }
    if !crate::os::fds::claim_inherited_fds() {
        return Err(Error::AlreadyInitialized);
    }
    let bad = |what: String| Error::BadInheritance { what };
    // As `sd_listen_fds_with_names`: unset, every socket is "unknown"; set, one name per socket.
    let names: Vec<String> = match std::env::var("LISTEN_FDNAMES") {
        Ok(v) => {
            let names: Vec<String> = v.split(':').map(str::to_owned).collect();
            if names.len() != count as usize {
                return Err(bad(format!(
                    "socket activation: LISTEN_FDNAMES={v:?} names {} sockets but LISTEN_FDS={count}; give every socket of the .socket unit a FileDescriptorName=",
                    names.len()
                )));
            }
            names
        }
        Err(_) => vec!["unknown".to_owned(); count as usize],
    };
    let mut out = Vec::with_capacity(count as usize);
    for (i, name) in names.into_iter().enumerate() {
        let n = 3 + i as i32;
        let fd = crate::os::sys::take_inherited_fd(n)
            .map_err(|e| bad(format!("socket activation: fd {n} ({name}) is missing: {e}")))?;
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC).map_err(|e| bad(format!("fd {n}: {e}")))?;
        let unix =
            inspect_inherited_listener(n).map_err(|e| bad(format!("socket activation: fd {n} ({name}): {e}")))?;
        let addr = if unix {
            let local = Socket::from(fd.try_clone().map_err(|e| bad(format!("fd {n}: {e}")))?).local_addr();
            match local {
                Ok(a) if a.as_pathname().is_some() => {
                    PassedAddr::Unix(a.as_pathname().unwrap_or(std::path::Path::new("")).to_owned())
                }
                Ok(a) => match a.as_abstract_namespace() {
                    Some(name) => PassedAddr::Abstract(String::from_utf8_lossy(name).into_owned()),
                    None => PassedAddr::Unnamed,
                },
                Err(_) => PassedAddr::Unnamed,
            }
        } else {
            let l = check_inherited_listener(fd.try_clone().map_err(|e| bad(format!("fd {n}: {e}")))?, n)?;
            PassedAddr::Tcp(l.local_addr().map_err(|e| bad(format!("fd {n}: {e}")))?)
        };
        out.push(Passed { name, fd: crate::os::sys::lift(fd), addr });
    }
    Ok(out)
}

/// Checks that an inherited descriptor really is a listening unix stream socket.
pub(crate) fn check_inherited_unix_listener(
    fd: OwnedFd,
    number: i32,
) -> Result<std::os::unix::net::UnixListener, Error> {
    let s = Socket::from(fd);
    let bad = |what: String| Error::BadInheritance { what };
    let ty = s.r#type().map_err(|e| bad(format!("fd {number} is not a socket ({e})")))?;
    if ty != Type::STREAM || s.domain().ok() != Some(Domain::UNIX) {
        return Err(bad(format!("fd {number} is not a unix stream socket")));
    }
    if !s.is_listener().map_err(|e| bad(format!("fd {number}: {e}")))? {
        return Err(bad(format!("fd {number} is not a listening socket")));
    }
    Ok(std::os::unix::net::UnixListener::from(OwnedFd::from(s)))
}

/// Checks that an inherited descriptor really is a listening TCP socket and returns it as a
/// non-blocking-ready std listener (still blocking; callers choose).
pub(crate) fn check_inherited_listener(fd: OwnedFd, number: i32) -> Result<TcpListener, Error> {
    let s = Socket::from(fd);
    let bad = |what: String| Error::BadInheritance { what };
    let ty = s.r#type().map_err(|e| bad(format!("fd {number} is not a socket ({e})")))?;
    if ty != Type::STREAM {
        return Err(bad(format!("fd {number} is not a stream socket")));
    }
    let local = s.local_addr().map_err(|e| bad(format!("fd {number}: {e}")))?;
    if local.as_socket().is_none() {
        return Err(bad(format!("fd {number} is not a TCP socket")));
    }
    if !s.is_listener().map_err(|e| bad(format!("fd {number}: {e}")))? {
        return Err(bad(format!("fd {number} is not a listening socket")));
    }
    Ok(s.into())
}

/// Checks, without taking it, that descriptor `fd` of this process is a listening TCP or unix
/// stream socket (a worker's inherited listener, taken later): `Ok(true)` for unix. `Err` says
/// what it is instead.
pub(crate) fn inspect_inherited_listener(fd: RawFd) -> Result<bool, String> {
    use rustix::net::{AddressFamily, SocketType, sockopt};
    let checked = crate::os::sys::inspect_fd(fd, |sock| {
        let domain = sockopt::socket_domain(sock).map_err(|e| format!("not a socket ({e})"))?;
        let unix = domain == AddressFamily::UNIX;
        if !unix && domain != AddressFamily::INET && domain != AddressFamily::INET6 {
            return Err("not a TCP or unix socket".to_owned());
        }
        if sockopt::socket_type(sock).ok() != Some(SocketType::STREAM) {
            return Err("not a stream socket".to_owned());
        }
        match sockopt::socket_acceptconn(sock) {
            Ok(true) => Ok(unix),
            Ok(false) => Err("not a listening socket".to_owned()),
            Err(e) => Err(format!("cannot tell whether it listens: {e}")),
        }
    });
    checked.unwrap_or_else(|e| Err(format!("not open ({e})")))
}

/// Checks that descriptor `fd` of this process is a channel from `master_pid`: an open unix
/// stream socket whose peer (`SO_PEERCRED`) is that process. `Err` says what it is instead.
/// The descriptor is only looked at, never taken or closed.
pub(crate) fn check_channel_peer(fd: RawFd, master_pid: u32) -> Result<(), String> {
    use rustix::net::{AddressFamily, SocketType, sockopt};
    let checked = crate::os::sys::inspect_fd(fd, |sock| {
        if sockopt::socket_domain(sock).ok() != Some(AddressFamily::UNIX)
            || sockopt::socket_type(sock).ok() != Some(SocketType::STREAM)
        {
            return Err(format!("fd {fd} is not a unix stream socket"));
        }
        match crate::os::sys::unix_peer_cred(sock).map(|c| c.pid) {
            Ok(Some(pid)) if pid == master_pid => Ok(()),
            Ok(Some(pid)) => Err(format!("the peer of fd {fd} is process {pid}, not the master {master_pid}")),
            Ok(None) => Err(format!("fd {fd} has no peer process in this PID namespace")),
            Err(e) => Err(format!("fd {fd}: cannot read its peer's credentials: {e}")),
        }
    });
    checked.unwrap_or_else(|e| Err(format!("fd {fd} is not open ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn loopback(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
    }

    #[test]
    fn port_zero_gives_one_real_port_for_every_slot() {
        let (fds, addr) = bind_listeners(loopback(0), true, 3, 128, false).unwrap();
        assert_ne!(addr.port(), 0);
        assert_eq!(fds.len(), 3);
        for fd in fds {
            let l = check_inherited_listener(fd, 3).unwrap();
            assert_eq!(l.local_addr().unwrap(), addr);
        }
    }

    #[test]
    fn shared_is_one_socket() {
        let (fds, addr) = bind_listeners(loopback(0), false, 4, 128, false).unwrap();
        assert_eq!(fds.len(), 1);
        assert_ne!(addr.port(), 0);
    }

    #[test]
    fn address_in_use_is_an_error_naming_it_even_against_a_reuseport_group() {
        for per_slot in [true, false] {
            let (_held, addr) = bind_listeners(loopback(0), true, 1, 128, false).unwrap();
            match bind_listeners(addr, per_slot, 2, 128, false) {
                Err(e @ Error::Bind { .. }) => assert!(e.to_string().contains(&addr.to_string()), "{e}"),
                other => panic!("per_slot={per_slot}: expected a bind error, got {other:?}"),
            }
        }
    }

    #[test]
    fn non_listening_descriptors_are_refused() {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        assert!(check_inherited_listener(s.into(), 3).is_err());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(check_inherited_listener(a.into(), 3).is_err());
    }

    #[test]
    fn a_channel_is_a_unix_stream_socket_from_the_master() {
        use std::os::fd::AsRawFd;
        let me = std::process::id();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        // Both ends of a pair carry the credentials of the process that created it: here, us.
        assert_eq!(check_channel_peer(a.as_raw_fd(), me), Ok(()));
        let err = check_channel_peer(a.as_raw_fd(), me + 1).unwrap_err();
        assert!(err.contains(&format!("is process {me}, not the master {}", me + 1)), "{err}");
        let tcp = TcpListener::bind(loopback(0)).unwrap();
        assert!(check_channel_peer(tcp.as_raw_fd(), me).unwrap_err().contains("not a unix stream socket"));
        let (d, _e) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert!(check_channel_peer(d.as_raw_fd(), me).unwrap_err().contains("not a unix stream socket"));
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(check_channel_peer(file.as_raw_fd(), me).unwrap_err().contains("not a unix stream socket"));
        // A unix stream socket without a peer: the kernel reports pid 0.
        let lone = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        assert!(check_channel_peer(lone.as_raw_fd(), me).unwrap_err().contains("no peer"));
        // Numbers that are not open.
        assert!(check_channel_peer(i32::MAX, me).unwrap_err().contains("not open"));
        assert!(check_channel_peer(-1, me).unwrap_err().contains("not open"));
    }

    #[test]
    fn an_abstract_name_in_use_is_refused_and_serves_once_bound() {
        let name = format!("ecewo-cluster-test-{}", std::process::id());
        let fd = bind_unix_abstract(&name, 16).unwrap();
        match bind_unix_abstract(&name, 16) {
            Err(UnixBindError::Refused(why)) => assert!(why.contains("another server listens on @"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        assert!(std::os::unix::net::UnixStream::connect_addr(&addr).is_ok());
        drop(fd);
        assert!(std::os::unix::net::UnixStream::connect_addr(&addr).is_err(), "gone with its last holder");
    }

    #[test]
    fn a_unix_socket_file_gets_its_mode_and_is_removed_only_while_ours() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ecewo-cluster-unix-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let (fd, file) = bind_unix_path(&path, 16, Some(0o660), (None, None)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o660);
        assert!(matches!(bind_unix_path(&path, 16, None, (None, None)), Err(UnixBindError::Refused(_))), "live");
        drop(fd);
        drop(file);
        assert!(!path.exists(), "removed: it was ours");
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn tcp_info_gives_the_accept_queue_length() {
        use std::os::fd::AsFd;
        let (fds, addr) = bind_listeners(loopback(0), false, 1, 16, false).unwrap();
        assert_eq!(crate::os::sys::tcp_accept_queue(fds[0].as_fd()).unwrap(), 0);
        let clients: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        // The handshakes complete in the kernel; nobody accepts.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while crate::os::sys::tcp_accept_queue(fds[0].as_fd()).unwrap() < 3 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(crate::os::sys::tcp_accept_queue(fds[0].as_fd()).unwrap(), 3);
        drop(clients);
    }

    #[test]
    fn an_ipv6_wildcard_is_dual_stack_unless_v6only() {
        let any6: SocketAddr = "[::]:0".parse().unwrap();
        if bind_listeners(any6, false, 1, 16, false).is_err() {
            eprintln!("no IPv6 here: skipped");
            return;
        }
        for (v6only, ipv4_served) in [(false, true), (true, false)] {
            let (_fds, addr) = bind_listeners(any6, true, 1, 16, v6only).unwrap();
            let v4 = std::net::TcpStream::connect(loopback(addr.port()));
            assert_eq!(v4.is_ok(), ipv4_served, "v6only={v6only}: IPv4 connect {v4:?}");
            assert!(std::net::TcpStream::connect(("::1", addr.port())).is_ok(), "v6only={v6only}: IPv6 connect");
        }
    }
}
