//! The few system calls that need `unsafe`: the only module of the crate allowed to use it
//! (`#![deny(unsafe_code)]` holds everywhere else). Every block says why it is sound.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::process::{Pid, Signal};

/// Arranges for the child of `cmd`, between fork and exec, to:
/// - receive `SIGTERM` when the master's spawning thread dies (`PR_SET_PDEATHSIG`), and exit at
///   once if the master already died before that was in place (`getppid()` re-check);
/// - mark every descriptor from `first_free` up close-on-exec, so nothing but stdio and the
///   descriptors placed below `first_free` reach the worker (fds the master itself inherited
///   from its shell without `O_CLOEXEC` included).
///
/// Call after any other `pre_exec` hook that places descriptors (they run in order).
pub(crate) fn set_child_setup(cmd: &mut Command, master_pid: Pid, first_free: u32) {
    let hook = move || -> io::Result<()> {
        // Only async-signal-safe system calls below: no allocation, no locks, no logging.
        // `io::Error::from_raw_os_error` does not allocate.
        rustix::process::set_parent_process_death_signal(Some(Signal::TERM))
            .map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))?;
        if rustix::process::getppid() != Some(master_pid) {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: close_range(2) only changes descriptor flags of this (child) process; the range
        // starts above the descriptors the child must keep. The raw syscall is used because
        // musl has no wrapper; it is async-signal-safe.
        let r = unsafe { libc::syscall(libc::SYS_close_range, first_free, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) };
        if r != 0 {
            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL);
            // ENOSYS (kernel < 5.9) or EINVAL (5.9 and 5.10 lack CLOSE_RANGE_CLOEXEC): the
            // master creates all its descriptors close-on-exec, so only fds inherited from the
            // master's own parent could leak. Not fatal.
            if errno != libc::ENOSYS && errno != libc::EINVAL {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec and makes only async-signal-safe
    // system calls (prctl, getppid, close_range); it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Arranges for the child of `cmd` (the new master of an upgrade), between fork and exec, to
/// mark every descriptor from `first_free` up close-on-exec, so that only stdio and the
/// descriptors placed below `first_free` (its upgrade channel and the sockets it inherits)
/// reach it. No parent-death signal: it must outlive the old master.
///
/// Call after any other `pre_exec` hook that places descriptors (they run in order).
pub(crate) fn set_master_child_setup(cmd: &mut Command, first_free: u32) {
    let hook = move || -> io::Result<()> {
        // SAFETY: close_range(2) only changes descriptor flags of this (child) process; the range
        // starts above the descriptors the child must keep. Async-signal-safe; no allocation.
        let r = unsafe { libc::syscall(libc::SYS_close_range, first_free, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) };
        if r != 0 {
            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL);
            // As for workers: old kernels lack it, and the master's own descriptors are all
            // close-on-exec anyway.
            if errno != libc::ENOSYS && errno != libc::EINVAL {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec and makes one async-signal-safe
    // system call (close_range); it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// The placeholder of `LISTEN_PID` in a worker's environment before fork: room for any pid
/// (at most 10 digits: Linux pids are below 2^22).
const LISTEN_PID_PLACEHOLDER: &[u8] = b"LISTEN_PID=0000000000";

/// Everything the child of a spawn executes, built before fork so that the child only patches
/// one pre-allocated buffer and calls `execve`: no allocation, no lock.
struct ExecImage {
    path: Vec<u8>,
    argv: Vec<Vec<u8>>,
    /// `KEY=VALUE\0` entries; the last is [`LISTEN_PID_PLACEHOLDER`].
    envp: Vec<Vec<u8>>,
    /// Room for the pointer arrays (their capacity is reserved before fork).
    argv_ptrs: Ptrs,
    envp_ptrs: Ptrs,
}

/// A pointer array for `execve`, filled in the child only.
struct Ptrs(Vec<*const libc::c_char>);

// SAFETY: the pointers are written and read only in the forked child, inside the hook that owns
// the buffers they point into; the parent never reads them. Moving the (empty-or-stale) vector
// between threads before fork is harmless.
unsafe impl Send for Ptrs {}
// SAFETY: as above: nothing dereferences them outside the child's hook.
unsafe impl Sync for Ptrs {}

/// Makes the child of `cmd` execute `path` with `argv` and `env` (`KEY=VALUE` byte strings,
/// without `LISTEN_PID`) itself, with `LISTEN_PID` set to the child's own pid, as the systemd
/// convention of passed sockets requires (`sd_listen_fds`, `listenfd` and `tokio-listener`
/// accept the sockets only then). std cannot set a variable to a value only known after fork,
/// so the environment is built here beforehand with a placeholder, and the hook, in the child,
/// writes `getpid()`'s digits into it and calls `execve`; `cmd`'s own program, arguments and
/// environment are then never used. If `execve` fails the hook returns its error, which std
/// reports to the parent as the spawn's error.
///
/// Register it last: hooks run in order, and nothing after it runs.
pub(crate) fn set_exec_with_own_pid(
    cmd: &mut Command,
    path: &std::ffi::OsStr,
    argv: &[std::ffi::OsString],
    env: Vec<Vec<u8>>,
) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_string = |bytes: &[u8]| -> io::Result<Vec<u8>> {
        if bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a NUL byte in a worker's argument or environment",
            ));
        }
        Ok([bytes, b"\0"].concat())
    };
    let mut envp = env.iter().map(|e| c_string(e)).collect::<io::Result<Vec<_>>>()?;
    envp.push(c_string(LISTEN_PID_PLACEHOLDER)?);
    let argv = argv.iter().map(|a| c_string(a.as_bytes())).collect::<io::Result<Vec<_>>>()?;
    let mut image = ExecImage {
        path: c_string(path.as_bytes())?,
        argv_ptrs: Ptrs(Vec::with_capacity(argv.len() + 1)),
        envp_ptrs: Ptrs(Vec::with_capacity(envp.len() + 1)),
        argv,
        envp,
    };
    let hook = move || -> io::Result<()> {
        // Only async-signal-safe calls: getpid, execve; writes into buffers allocated before
        // fork; `Vec::push` within the reserved capacity does not allocate. An array built
        // before fork is not used, so that no pointer outlives a write to its buffer.
        let img = &mut image;
        let Some(pid_entry) = img.envp.last_mut() else { return Err(io::Error::from_raw_os_error(libc::EINVAL)) };
        let mut pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
        let mut digits = [0u8; 10];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (pid % 10) as u8;
            pid /= 10;
            n += 1;
            if pid == 0 || n == digits.len() {
                break;
            }
        }
        let start = b"LISTEN_PID=".len();
        for i in 0..n {
            pid_entry[start + i] = digits[n - 1 - i];
        }
        pid_entry[start + n] = 0;
        for (ptrs, strings) in [(&mut img.argv_ptrs, &img.argv), (&mut img.envp_ptrs, &img.envp)] {
            ptrs.0.clear();
            for s in strings {
                ptrs.0.push(s.as_ptr().cast::<libc::c_char>());
            }
            ptrs.0.push(std::ptr::null());
        }
        // SAFETY: `path` and every entry are NUL-terminated buffers owned by this closure and
        // alive for the call; both pointer arrays end with a null pointer. On success execve
        // does not return; on failure it changes nothing but errno.
        unsafe {
            libc::execve(img.path.as_ptr().cast::<libc::c_char>(), img.argv_ptrs.0.as_ptr(), img.envp_ptrs.0.as_ptr());
        }
        Err(io::Error::last_os_error())
    };
    // SAFETY: the hook runs in the forked child before exec and makes only async-signal-safe
    // calls (getpid, execve) on memory allocated before fork (`push` stays within the capacity
    // reserved above); it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(hook);
    }
    Ok(())
}

/// The number of connections waiting in the accept queue of a listening TCP socket
/// (`TCP_INFO`'s `tcpi_unacked`, which the kernel fills with the queue length for a socket in
/// the listen state).
pub(crate) fn tcp_accept_queue(socket: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: `tcp_info` is plain data (integers); all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    // SAFETY: `TCP_INFO` fills a `tcp_info`, integers only: any bytes the kernel writes are valid.
    unsafe { get_socket_option(socket, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)? };
    Ok(info.tcpi_unacked)
}

/// `getsockopt(socket, level, option, value)`: the kernel writes the option into `value`.
/// Returns how many bytes it wrote.
///
/// # Safety
///
/// `T` must be the plain C type the option fills, made of integers only, so that whatever
/// bytes the kernel writes (all of `T` or a prefix) leave a valid `T`.
unsafe fn get_socket_option<T>(
    socket: BorrowedFd<'_>,
    level: libc::c_int,
    option: libc::c_int,
    value: &mut T,
) -> io::Result<usize> {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a valid, initialised `T` borrowed mutably for the whole call, and `len`
    // is exactly its size: the kernel writes at most `len` bytes into it and stores how many it
    // wrote in `len`; the caller guarantees any such bytes make a valid `T`.
    let r = unsafe {
        libc::getsockopt(std::os::fd::AsRawFd::as_raw_fd(&socket), level, option, (value as *mut T).cast(), &mut len)
    };
    if r == 0 { Ok(len as usize) } else { Err(io::Error::last_os_error()) }
}

/// Takes ownership of descriptor `fd`, which the master placed in this worker at a fixed number.
///
/// Fails if `fd` is not open. Must be called at most once per number: the worker takes its
/// channel once, at initialisation (which runs once per process), and each listener once (its
/// entry in the `Worker`'s table is marked taken under a lock).
pub(crate) fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: `fd` is not -1 (checked above), and borrowing a raw number is safe to *use* with fcntl even if it is not open: the call
    // then fails with EBADF and we return that error without taking ownership.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed)?;
    // SAFETY: `fd` is open (checked above) and was placed here by our master for this process
    // alone; nothing else in this process owns it: each number is taken once (see above), and
    // the documentation forbids taking a listener through another crate as well.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `f` on descriptor `fd` of this process without taking ownership of it (to look at a
/// descriptor that may or may not be what the environment says it is). Fails with `EBADF`,
/// without calling `f`, if `fd` is not open.
///
/// For process initialisation, before any other thread exists: `f` must only query the
/// descriptor, never close it.
pub(crate) fn inspect_fd<R>(fd: RawFd, f: impl FnOnce(BorrowedFd<'_>) -> R) -> io::Result<R> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: `fd` is not -1 (checked above). The borrow is first used with fcntl, which fails
    // with EBADF without touching anything if the number is not open; once it is known open, the
    // borrow lives only for the call of `f`, during which nothing in this process closes it: `f`
    // only queries it, and the caller runs during initialisation, before any other thread.
    // Ownership is not claimed.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed)?;
    Ok(f(borrowed))
}

/// The credentials of the process at the other end of a connected unix socket
/// (`SO_PEERCRED`: the process that created the pair, or connected, at that time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerCred {
    /// Its pid, or `None` when the kernel knows none (a socket with no peer, or a peer outside
    /// this PID namespace: pid 0).
    pub(crate) pid: Option<u32>,
    /// Its effective uid.
    pub(crate) uid: u32,
}

/// The credentials of the peer of a connected unix socket.
///
/// Read through libc, never rustix: rustix's `socket_peercred` reads the pid into a non-zero
/// type, which the kernel's 0 (a peer in another PID namespace) would make undefined behaviour.
/// Do not use it anywhere in this crate.
pub(crate) fn unix_peer_cred(socket: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    // SAFETY: `SO_PEERCRED` fills a `ucred`, three integers: any bytes make a valid one.
    let written = unsafe { get_socket_option(socket, libc::SOL_SOCKET, libc::SO_PEERCRED, &mut cred)? };
    if written != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(PeerCred { pid: u32::try_from(cred.pid).ok().filter(|&pid| pid != 0), uid: cred.uid })
}

/// What a signal does in this process right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// The kernel's default action (`SIG_DFL`).
    Default,
    /// Ignored (`SIG_IGN`), for example `SIGHUP` under `nohup`.
    Ignored,
    /// A handler is installed.
    Handled,
}

/// The current disposition of `signal`, read without changing it.
pub(crate) fn disposition(signal: crate::signal::Signal) -> io::Result<Disposition> {
    // SAFETY: `sigaction` is plain data; a zeroed one is a valid value to be overwritten.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `old`, a valid `sigaction`
    // borrowed for the call; nothing in this process changes.
    let r = unsafe { libc::sigaction(signal.as_raw(), std::ptr::null(), &mut old) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(match old.sa_sigaction {
        libc::SIG_DFL => Disposition::Default,
        libc::SIG_IGN => Disposition::Ignored,
        _ => Disposition::Handled,
    })
}

/// Removes the variables `keys` from this process's environment, but only while the process
/// has exactly one thread (this one). `Err` says why it did not (more than one thread, or
/// `/proc` unreadable): then the environment is left as it is.
pub(crate) fn remove_env_if_single_threaded(keys: &[&str]) -> Result<(), String> {
    match crate::os::procfs::thread_count() {
        Some(1) => {}
        Some(n) => return Err(format!("the process already has {n} threads")),
        None => return Err("/proc/self/status gives no thread count".into()),
    }
    for key in keys {
        // SAFETY: `remove_var` is unsafe because the C library's environment has no lock: another
        // thread reading or writing it at the same time (C code calling getenv, or setenv) would
        // race with us. /proc/self/status just said this process has exactly one thread, the one
        // running this loop; no other can appear meanwhile, because only a thread of this
        // process can create one and the only one is busy here. (A signal handler interrupting
        // this thread could read the environment, but getenv is not async-signal-safe, so no
        // correct handler does.)
        unsafe { std::env::remove_var(key) };
    }
    Ok(())
}

/// Marks descriptor `fd` close-on-exec without taking ownership of it (for descriptors this
/// process inherited but does not use, such as extra sockets passed by socket activation).
pub(crate) fn set_cloexec_raw(fd: RawFd) -> io::Result<()> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: `fd` is not -1, and fcntl on a number that is not open fails with EBADF without
    // touching anything; the borrow ends with this call, and ownership is not claimed.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    Ok(rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC)?)
}

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h); the libc crate only defines it for Android.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// `SO_DETACH_REUSEPORT_BPF` (asm-generic/socket.h).
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

/// Removes the steering program of `socket`'s `SO_REUSEPORT` group: the kernel's hashing applies.
pub(crate) fn detach_reuseport_bpf(socket: BorrowedFd<'_>) -> io::Result<()> {
    // The kernel ignores the value of this option.
    set_socket_option(socket, SO_DETACH_REUSEPORT_BPF, &0 as &libc::c_int)
}

/// Attaches a classic BPF program to the `SO_REUSEPORT` group of `socket`: for each new
/// connection the kernel runs it and hands the connection to the group's socket whose index it
/// returns.
pub(crate) fn attach_reuseport_cbpf(socket: BorrowedFd<'_>, program: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        // The kernel copies the instructions during the call and keeps no pointer to them.
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    set_socket_option(socket, SO_ATTACH_REUSEPORT_CBPF, &prog)
}

/// `setsockopt(socket, SOL_SOCKET, option, value)`, for the options rustix does not wrap.
/// `T` must be the plain C type the option expects (the kernel reads `size_of::<T>()` bytes).
fn set_socket_option<T>(socket: BorrowedFd<'_>, option: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a valid, initialised `T` borrowed for the whole call, and the length
    // passed is exactly its size; the kernel only reads it (and whatever memory a `sock_fprog`
    // points to, which the caller keeps alive) during the call.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Sends `signal` to the process behind `pidfd` (which cannot have been reused: a pidfd names
/// one process for its whole life).
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: crate::signal::Signal) -> rustix::io::Result<()> {
    let raw = signal.as_raw();
    let sig = match Signal::from_named_raw(raw) {
        Some(named) => named,
        // SAFETY: a `crate::signal::Signal` only holds valid signal numbers, and the ones without
        // a name are real-time signals from the C library's `SIGRTMIN()` to 64, none of which it
        // reserves for itself (glibc keeps 32 and 33, musl 32 to 34; both start `SIGRTMIN` above).
        None => unsafe { Signal::from_raw_unchecked(raw) },
    };
    rustix::process::pidfd_send_signal(pidfd, sig)
}

/// Whether the orphan guard's timer was armed (a lock-free flag: set in the signal handler).
#[cfg(feature = "tokio")]
static ORPHAN_TIMER_ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`kill_if_orphaned_on_sigterm`] is in place in this process.
#[cfg(feature = "tokio")]
static ORPHAN_GUARD: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

/// From now on, a `SIGTERM` that arrives when this process's parent is no longer `master` (the
/// master died: its `PR_SET_PDEATHSIG` is that `SIGTERM`) arms a kernel timer that kills this
/// process (`SIGKILL`) `after` later. It runs in the signal handler, next to the program's own
/// (tokio's) handling of `SIGTERM`, so it works even when no thread of the process can run
/// (a runtime stuck in a handler): what keeps a worker whose master died from outliving it
/// without a thread of its own watching the channel. Installed once per process; later calls do
/// nothing.
///
/// # Caveats
///
/// `SIGTERM` no longer ends the process by default: call it only where the program handles
/// `SIGTERM` already (`serve`, after tokio's handler is installed).
#[cfg(feature = "tokio")]
pub(crate) fn kill_if_orphaned_on_sigterm(master: Pid, after: std::time::Duration) -> io::Result<()> {
    let mut installed = ORPHAN_GUARD.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(());
    }
    // SAFETY: `sigevent` is plain data; zeroed, then the two fields that matter are set.
    let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
    event.sigev_notify = libc::SIGEV_SIGNAL;
    event.sigev_signo = libc::SIGKILL;
    let mut timer: libc::timer_t = std::ptr::null_mut();
    // SAFETY: both pointers are valid for the call; with SIGEV_SIGNAL the C library starts no
    // thread and keeps no pointer to `event`.
    if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let after = after.max(std::time::Duration::from_millis(1));
    let spec = libc::itimerspec {
        it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
        it_value: libc::timespec {
            tv_sec: libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
            // Below 10^9: fits a `c_long` of any width.
            tv_nsec: after.subsec_nanos() as libc::c_long,
        },
    };
    // The timer's id, as a plain number the handler can own (`timer_t` is a pointer).
    let id = timer as usize;
    let action = move || {
        // Armed once: later SIGTERMs must not push the kill further away.
        if rustix::process::getppid() != Some(master)
            && !ORPHAN_TIMER_ARMED.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            // SAFETY: `id` is the timer created above, never deleted; `spec` is a valid
            // `itimerspec` on this closure. timer_settime(2) is async-signal-safe (POSIX).
            unsafe {
                libc::timer_settime(id as libc::timer_t, 0, &spec, std::ptr::null_mut());
            }
        }
    };
    // SAFETY: the action only makes two async-signal-safe system calls (getppid, timer_settime)
    // on values it owns and swaps a lock-free atomic: no allocation, no lock, no panic.
    if let Err(e) = unsafe { signal_hook::low_level::register(libc::SIGTERM, action) } {
        // SAFETY: the timer was created above and nothing else refers to it.
        unsafe { libc::timer_delete(timer) };
        return Err(e);
    }
    *installed = true;
    Ok(())
}
