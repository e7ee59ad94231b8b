//! The few system calls that need `unsafe`: the only module of the crate allowed to use it
//! (`#![deny(unsafe_code)]` holds everywhere else). Every block says why it is sound.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::process::{Pid, Signal};

/// The placeholder of `LISTEN_PID` in a worker's environment: room for any pid (at most 10
/// digits: Linux pids are below 2^22). The child writes its own pid into it.
const LISTEN_PID_PLACEHOLDER: &[u8] = b"LISTEN_PID=0000000000";

/// The master keeps the descriptors it holds per worker (pidfds, channels, captured pipes, the
/// slots' sockets) from this number up ([`lift`]), so that the numbers below stay few: a child
/// is given a copy of those only (see [`Spawn::spawn`]), whatever the number of workers.
///
/// A multiple of 4096: kernels without the fix for CVE-2024-45025 (5.9 up to 6.11 and the
/// stable releases of August 2024) copy with `CLOSE_RANGE_UNSHARE` the whole word of the
/// "full words" bitmap that holds the cut-off, one bit per 64 descriptors, 4096 per word: a
/// cut-off below descriptors the master keeps open in the same word would leave the child's
/// table believing fds up to the word's end are taken (a worker could then not use them).
pub(crate) const HIGH_FDS: RawFd = 4096;

/// Whether the short copy of the table works here: cleared the first time the child could
/// neither `close_range(CLOSE_RANGE_UNSHARE)` nor `unshare` (a seccomp profile refusing both,
/// as container runtimes' defaults may), after which spawns copy the whole table.
static SHORT_COPY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// `fd` moved to [`HIGH_FDS`] or above (close-on-exec), or `fd` itself when that fails (an
/// open-file limit at or below it): only the cost of a spawn depends on where it is.
pub(crate) fn lift(fd: OwnedFd) -> OwnedFd {
    if fd.as_raw_fd() >= HIGH_FDS {
        return fd;
    }
    rustix::io::fcntl_dupfd_cloexec(&fd, HIGH_FDS).unwrap_or(fd)
}

/// The child's stack, in bytes: what the few frames between `clone` and `execve` need, with a
/// wide margin (the child calls nothing but system-call wrappers).
const CHILD_STACK: usize = 64 * 1024;

/// A process to start with [`Spawn::spawn`]: its program, arguments and environment, the
/// descriptors it gets at given numbers, and the setup it does before `execve`, all built
/// beforehand, so that the child touches nothing but this memory and makes only system calls.
///
/// The child is started the way `posix_spawn` does it, with `clone(CLONE_VM | CLONE_VFORK)`:
/// it runs on its own small stack in the master's memory while the master's thread waits,
/// until it has called `execve` (or exited). A `fork` would copy the master's page tables,
/// and every page the master writes afterwards would fault once to be copied back: a cost
/// that grows with the master's memory, so with the number of workers (issue 16). It also
/// returns the child's pidfd (`CLONE_PIDFD`), with no window for the pid to be reused.
pub(crate) struct Spawn {
    /// NUL-terminated, as every string below.
    path: Vec<u8>,
    /// Kept for `argv_ptrs`, which point into it.
    _argv: Vec<Vec<u8>>,
    /// `KEY=VALUE` entries; with `listen_pid`, the last is [`LISTEN_PID_PLACEHOLDER`].
    envp: Vec<Vec<u8>>,
    listen_pid: bool,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// Descriptors of the master, each to be placed at a number in the child (the master's
    /// copies close when the `Spawn` is dropped).
    fds: Vec<Placed>,
    /// From this descriptor up, the child marks every descriptor close-on-exec.
    first_free: u32,
    /// The master: the child asks for `SIGTERM` when its thread dies and checks that it is
    /// still its parent.
    parent_death: Option<Pid>,
    /// The child puts itself in a process group of its own.
    own_group: bool,
    /// What failed in the child before or at `execve` (an errno; 0: nothing).
    failed: std::sync::atomic::AtomicI32,
    /// The program is `/proc/self/fd/N` (a deploy's file): N must be open in the child at exec.
    path_fd: Option<RawFd>,
    /// The child shares the master's descriptor table at first (`CLONE_FILES`) and takes a
    /// private copy of the numbers below [`HIGH_FDS`] only (set by [`Spawn::spawn`]).
    copy_below: bool,
    /// (Set by the child.) It could not take a table of its own.
    no_private_table: std::sync::atomic::AtomicBool,
    /// (Tests.) The child behaves as if the system refused it a table of its own.
    #[cfg(test)]
    refuse_private_table: bool,
}

/// A descriptor of the master to place at `at` in the child.
struct Placed {
    fd: OwnedFd,
    at: RawFd,
    /// A copy of `fd` below [`HIGH_FDS`], made by the master before the clone when `fd` is
    /// above: what the child places, since it keeps only the numbers below.
    low: Option<OwnedFd>,
    /// The child's copy of it above every `at` (written by the child).
    temporary: RawFd,
}

impl Placed {
    /// The number the child takes the descriptor from.
    fn source(&self) -> RawFd {
        match &self.low {
            Some(low) => low.as_raw_fd(),
            None => self.fd.as_raw_fd(),
        }
    }
}

impl Spawn {
    /// A process that executes `path` with `argv` and `env` (`KEY=VALUE` byte strings, without
    /// `LISTEN_PID`); with `listen_pid`, also `LISTEN_PID` set to its own pid, as the systemd
    /// convention of passed sockets requires (`sd_listen_fds`, `listenfd` and
    /// `tokio-listener` accept the sockets only then).
    ///
    /// # Errors
    /// `InvalidInput` if a string holds a NUL byte.
    pub(crate) fn new(
        path: &std::ffi::OsStr,
        argv: &[std::ffi::OsString],
        env: Vec<Vec<u8>>,
        listen_pid: bool,
    ) -> io::Result<Spawn> {
        use std::os::unix::ffi::OsStrExt;
        let c_string = |bytes: &[u8]| -> io::Result<Vec<u8>> {
            if bytes.contains(&0) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a NUL byte in a worker's program, argument or environment",
                ));
            }
            Ok([bytes, b"\0"].concat())
        };
        let mut envp = env.iter().map(|e| c_string(e)).collect::<io::Result<Vec<_>>>()?;
        if listen_pid {
            envp.push(c_string(LISTEN_PID_PLACEHOLDER)?);
        }
        let argv = argv.iter().map(|a| c_string(a.as_bytes())).collect::<io::Result<Vec<_>>>()?;
        let pointers = |strings: &[Vec<u8>]| -> Vec<*const libc::c_char> {
            strings.iter().map(|s| s.as_ptr().cast::<libc::c_char>()).chain(std::iter::once(std::ptr::null())).collect()
        };
        let path_fd = path
            .as_bytes()
            .strip_prefix(b"/proc/self/fd/")
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<RawFd>().ok());
        Ok(Spawn {
            path_fd,
            copy_below: false,
            no_private_table: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            refuse_private_table: false,
            path: c_string(path.as_bytes())?,
            argv_ptrs: pointers(&argv),
            envp_ptrs: pointers(&envp),
            _argv: argv,
            envp,
            listen_pid,
            fds: Vec::new(),
            first_free: 3,
            parent_death: None,
            own_group: false,
            failed: std::sync::atomic::AtomicI32::new(0),
        })
    }

    /// Gives the child `fd` as descriptor `at` (without close-on-exec).
    pub(crate) fn fd(&mut self, fd: OwnedFd, at: RawFd) -> &mut Spawn {
        self.fds.push(Placed { fd, at, low: None, temporary: -1 });
        self.first_free = self.first_free.max(at as u32 + 1);
        self
    }

    /// The child's stdin is `/dev/null`.
    ///
    /// # Errors
    /// If `/dev/null` cannot be opened.
    pub(crate) fn null_stdin(&mut self) -> io::Result<&mut Spawn> {
        let null = rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        Ok(self.fd(null, 0))
    }

    /// The child gets `SIGTERM` when the master's spawning thread dies
    /// (`PR_SET_PDEATHSIG`), and exits at once (the spawn fails with `ESRCH`) if `master` is
    /// not its parent any more when that is in place.
    pub(crate) fn parent_death(&mut self, master: Pid) -> &mut Spawn {
        self.parent_death = Some(master);
        self
    }

    /// The child leads a process group of its own (a terminal's Ctrl-C reaches the master
    /// only).
    pub(crate) fn own_process_group(&mut self) -> &mut Spawn {
        self.own_group = true;
        self
    }

    /// Starts the process: its pid and pidfd. In the child, before `execve`: signal handlers
    /// back to their defaults (and `SIGPIPE`, which Rust programs ignore) and an empty signal
    /// mask, as `std::process::Command` leaves them; its own process group if asked; the
    /// parent-death signal if asked; the descriptors placed; every descriptor above them marked
    /// close-on-exec (fds the master itself inherited without `O_CLOEXEC` included);
    /// `LISTEN_PID` written.
    ///
    /// # Errors
    /// What `clone` returns, or what failed in the child (`execve`'s error, `ESRCH` if the
    /// master was gone); the child has then exited and is reaped here.
    ///
    /// The child does not copy the master's whole descriptor table (the kernel's `dup_fd`:
    /// every open descriptor, three per worker in the master): it starts sharing it
    /// (`CLONE_FILES`) and its first call, `close_range(HIGH_FDS, ~0, CLOSE_RANGE_UNSHARE)`, gives
    /// it a private table with a copy of the numbers below [`HIGH_FDS`] only, where the master
    /// keeps none of its per-worker descriptors ([`lift`]). The descriptors to place that are
    /// above are copied below it first, here. When that cannot be done (no free number below,
    /// or the program is a descriptor above), the child copies the whole table as before; and
    /// when the system refuses the child a table of its own (a seccomp profile), the spawn is
    /// tried again that way, and so are all later ones.
    pub(crate) fn spawn(mut self) -> io::Result<(u32, OwnedFd)> {
        use std::sync::atomic::Ordering;
        self.copy_below = SHORT_COPY.load(Ordering::Relaxed) && self.stage_below();
        match self.clone_child() {
            Err(_) if self.copy_below && self.no_private_table.load(Ordering::Acquire) => {
                tracing::debug!("a child cannot take a descriptor table of its own here: spawns copy the whole table");
                SHORT_COPY.store(false, Ordering::Relaxed);
                self.copy_below = false;
                self.failed.store(0, Ordering::Release);
                self.clone_child()
            }
            result => result,
        }
    }

    /// One `clone` of the child, with `copy_below` as set; what [`spawn`](Spawn::spawn) returns.
    fn clone_child(&mut self) -> io::Result<(u32, OwnedFd)> {
        use std::sync::atomic::Ordering;
        let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
        // The top of the stack (it grows down), 16-byte aligned as the x86-64 and aarch64 ABIs
        // want it.
        let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;
        let mut pidfd: libc::c_int = -1;
        // SAFETY: `sigset_t` is plain data; `sigfillset` initialises it.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut before: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `sigfillset` and `rt_sigprocmask` only read and write the sets given. Every
        // signal is blocked while the child shares our memory: a handler of the master run in
        // the child (before it reset them) would act on the master's state from another
        // process. The raw system call, as glibc's posix_spawn does, because `pthread_sigmask`
        // leaves glibc's own two signals (32, 33) unblocked. The child's own mask is set before
        // `execve`.
        unsafe {
            libc::sigfillset(&mut all);
            set_signal_mask(&all, &mut before);
        }
        let copy_below = self.copy_below;
        let this: *mut Spawn = self;
        // SAFETY: `child` runs on `stack` (CHILD_STACK bytes, alive until after the call, which
        // returns only once the child called `execve` or exited: CLONE_VFORK) and uses only
        // `*this`, which nothing else touches meanwhile (this thread is suspended). With
        // CLONE_PIDFD the kernel writes the child's pidfd (close-on-exec) to `pidfd`.
        let pid = unsafe {
            libc::clone(
                child,
                top as *mut libc::c_void,
                libc::CLONE_VM
                    | libc::CLONE_VFORK
                    | libc::CLONE_PIDFD
                    | libc::SIGCHLD
                    | if copy_below { libc::CLONE_FILES } else { 0 },
                this.cast::<libc::c_void>(),
                &mut pidfd as *mut libc::c_int,
            )
        };
        let clone_error = (pid < 0).then(io::Error::last_os_error);
        // SAFETY: restores the mask saved above.
        unsafe {
            set_signal_mask(&before, std::ptr::null_mut());
        }
        drop(stack);
        if let Some(e) = clone_error {
            return Err(e);
        }
        let child = Pid::from_raw(pid).ok_or_else(|| io::Error::other("clone returned pid 0"))?;
        if pidfd < 0 {
            // A kernel that ignores CLONE_PIDFD (before 5.2, or a sandbox): a child we cannot
            // watch must not run. Killed and reaped by pid (only we reap it).
            let _ = rustix::process::kill_process(child, Signal::KILL);
            let _ =
                retry_eintr(|| rustix::process::waitpid(Some(child), rustix::process::WaitOptions::empty()).map(drop));
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel gave no pidfd (CLONE_PIDFD needs Linux 5.2)",
            ));
        }
        // SAFETY: the kernel returned this descriptor (≥ 0, checked) for the new child
        // (CLONE_PIDFD); nothing else owns it.
        let pidfd = lift(unsafe { OwnedFd::from_raw_fd(pidfd) });
        let failed = self.failed.load(Ordering::Acquire);
        if failed != 0 {
            // The child exited (127) before or at execve: reap it, nobody else will.
            let _ = retry_eintr(|| {
                rustix::process::waitid(
                    rustix::process::WaitId::PidFd(pidfd.as_fd()),
                    rustix::process::WaitIdOptions::EXITED,
                )
                .map(drop)
            });
            return Err(io::Error::from_raw_os_error(failed));
        }
        Ok((pid as u32, pidfd))
    }
}

impl Spawn {
    /// Copies below [`HIGH_FDS`] the descriptors to place that are above it; false (and none
    /// copied) if one cannot be, or if the program is a descriptor above it.
    fn stage_below(&mut self) -> bool {
        if self.path_fd.is_some_and(|n| n >= HIGH_FDS) {
            return false;
        }
        let staged = self.fds.iter_mut().filter(|p| p.fd.as_raw_fd() >= HIGH_FDS).all(|p| {
            p.low = rustix::io::fcntl_dupfd_cloexec(&p.fd, 0).ok().filter(|low| low.as_raw_fd() < HIGH_FDS);
            p.low.is_some()
        });
        if !staged {
            for p in &mut self.fds {
                p.low = None;
            }
        }
        staged
    }
}

/// Sets this thread's signal mask with the raw system call (glibc's `pthread_sigmask` would
/// leave its own two signals out of `set`).
///
/// # Safety
/// `set` is a valid signal set; `old` is null or writable.
unsafe fn set_signal_mask(set: *const libc::sigset_t, old: *mut libc::sigset_t) {
    // SAFETY: the kernel's signal set is 64 bits (`_NSIG / 8`), the first bytes of libc's
    // `sigset_t`; both pointers are valid for them (the caller's contract). The call changes
    // only this thread's mask.
    unsafe {
        libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, set, old, 8usize);
    }
}

/// Calls `f` again while it fails with `EINTR`.
fn retry_eintr(mut f: impl FnMut() -> rustix::io::Result<()>) -> rustix::io::Result<()> {
    loop {
        match f() {
            Err(rustix::io::Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// The child of [`Spawn::spawn`], between `clone` and `execve`. It shares the master's memory
/// and runs while the master's thread waits: only system calls (async-signal-safe, no
/// allocation, no lock, no logging), on memory prepared before. Returns only if something
/// failed, after saying what in `failed`.
///
/// No panic either, ever (no indexing, no `unwrap`, no arithmetic that can overflow): a panic
/// would run the panic hook — which allocates and locks — in the master's memory before the
/// `extern "C"` boundary turns it into an abort. Measured stack use (a review, filling the
/// stack with a pattern): 3.3 KiB in a debug build, 0.7 KiB in release, of [`CHILD_STACK`].
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Spawn` the parent passed, alive and untouched by anyone else until
    // this child has exec'd or exited (CLONE_VFORK).
    let s = unsafe { &mut *arg.cast::<Spawn>() };
    let errno = match child_setup(s) {
        Ok(()) => return 0,
        Err(errno) => errno,
    };
    s.failed.store(if errno == 0 { libc::EINVAL } else { errno }, std::sync::atomic::Ordering::Release);
    // SAFETY: ends this child at once, without running the master's atexit handlers or
    // flushing its stdio buffers (which belong to the master).
    unsafe { libc::_exit(127) }
}

/// The child's setup and `execve`; an errno if anything failed.
fn child_setup(s: &mut Spawn) -> Result<(), i32> {
    let errno = || io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL);
    // SAFETY (for every call below): plain system calls on this child's own state — its
    // signal dispositions and mask, process group, parent-death signal, descriptor table —
    // with arguments built before the clone; none allocates or takes a lock.
    unsafe {
        if s.copy_below {
            // First, a table of its own: until then it is the master's (CLONE_FILES), which
            // nothing here may change. The kernel copies the numbers below the range only,
            // since the range reaches the last one. Without CLOSE_RANGE_UNSHARE (before 5.9),
            // a copy of the whole table.
            #[cfg(test)]
            let refused = s.refuse_private_table;
            #[cfg(not(test))]
            let refused = false;
            let r = if refused {
                -1
            } else {
                libc::syscall(libc::SYS_close_range, HIGH_FDS as u32, u32::MAX, libc::CLOSE_RANGE_UNSHARE)
            };
            if r != 0 && (refused || libc::unshare(libc::CLONE_FILES) != 0) {
                // The parent tries again with a copy of the whole table (the shared one is
                // untouched: nothing above ran on it).
                s.no_private_table.store(true, std::sync::atomic::Ordering::Release);
                return Err(if refused { libc::EPERM } else { errno() });
            }
        }
        for signal in 1..=libc::SIGRTMAX() {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut old) != 0 {
                continue; // glibc's own signals
            }
            let ignored_pipe = signal == libc::SIGPIPE && old.sa_sigaction == libc::SIG_IGN;
            if old.sa_sigaction != libc::SIG_DFL && (old.sa_sigaction != libc::SIG_IGN || ignored_pipe) {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        set_signal_mask(&empty, std::ptr::null_mut());
        if s.own_group && libc::setpgid(0, 0) != 0 {
            return Err(errno());
        }
        if let Some(master) = s.parent_death {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(errno());
            }
            if libc::getppid() != master.as_raw_nonzero().get() {
                return Err(libc::ESRCH);
            }
        }
        // Every descriptor first copied above all the numbers to fill (close-on-exec), then
        // each copy placed at its number (`dup2` clears close-on-exec): a descriptor of the
        // master that sits at one of those numbers is copied before it is replaced.
        let above = s.first_free as libc::c_int;
        for p in s.fds.iter_mut() {
            p.temporary = libc::fcntl(p.source(), libc::F_DUPFD_CLOEXEC, above);
            if p.temporary < 0 {
                return Err(errno());
            }
        }
        for p in &s.fds {
            if libc::dup2(p.temporary, p.at) < 0 {
                return Err(errno());
            }
        }
        let r = libc::syscall(libc::SYS_close_range, s.first_free, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
        if r != 0 {
            let e = errno();
            // ENOSYS (kernel < 5.9) or EINVAL (5.9 and 5.10 lack CLOSE_RANGE_CLOEXEC): the
            // master creates all its descriptors close-on-exec, so only fds inherited from the
            // master's own parent could leak. Not fatal.
            if e != libc::ENOSYS && e != libc::EINVAL {
                return Err(e);
            }
        }
        if s.listen_pid {
            write_listen_pid(s)?;
        }
        libc::execve(s.path.as_ptr().cast::<libc::c_char>(), s.argv_ptrs.as_ptr(), s.envp_ptrs.as_ptr());
    }
    Err(errno())
}

/// Writes `LISTEN_PID`: this child's pid, in the placeholder's room (the pointer array points
/// at the same buffer). Async-signal-safe: `getpid` and writes into memory prepared before.
fn write_listen_pid(s: &mut Spawn) -> Result<(), i32> {
    let Some(entry) = s.envp.last_mut() else { return Err(libc::EINVAL) };
    let mut pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
    let mut digits = [0u8; 10];
    let mut n = 0;
    for d in digits.iter_mut() {
        *d = b'0' + (pid % 10) as u8;
        pid /= 10;
        n += 1;
        if pid == 0 {
            break;
        }
    }
    let start = b"LISTEN_PID=".len();
    for (slot, digit) in entry.iter_mut().skip(start).zip(digits.iter().take(n).rev()) {
        *slot = *digit;
    }
    if let Some(end) = entry.get_mut(start + n) {
        *end = 0;
    }
    Ok(())
}

/// Registers the heartbeat timer with the current tokio runtime's reactor, for reading.
///
/// # Errors
/// What the registration returns.
///
/// # Panics
/// Outside a runtime with I/O enabled (tokio's rule; `serve` needs I/O for its listeners anyway).
#[cfg(feature = "tokio")]
pub(crate) fn register_timer(
    timer: crate::os::timer::Timer,
) -> io::Result<tokio::io::unix::AsyncFd<crate::os::timer::Timer>> {
    // SAFETY: `Timer` owns its descriptor (an `OwnedFd`) for its whole life, and its
    // `as_raw_fd` always returns that same descriptor: it stays open and the same while the
    // `AsyncFd` owns it, as `register_with_interest` requires.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(timer, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// The tests that look at how a child copies the descriptor table, one at a time (one of
    /// them turns the short copy off for the process, and back on).
    static TABLE_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Runs `script` with `sh` through [`Spawn`], stdout to a pipe, `extra` at fd 4; its output.
    fn run(script: &str, extra: OwnedFd) -> (u32, String) {
        run_refused(script, extra, false)
    }

    /// [`run`], with the child refused a table of its own if `refused`.
    fn run_refused(script: &str, extra: OwnedFd, refused: bool) -> (u32, String) {
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let argv = ["sh", "-c", script].map(std::ffi::OsString::from);
        let mut child = Spawn::new("/bin/sh".as_ref(), &argv, vec![b"PATH=/usr/bin:/bin".to_vec()], true).unwrap();
        child.fd(write, 1).fd(extra, 4).own_process_group();
        child.refuse_private_table = refused;
        let (pid, pidfd) = child.spawn().unwrap();
        let mut out = String::new();
        std::fs::File::from(read).read_to_string(&mut out).unwrap();
        let status = rustix::process::waitid(
            rustix::process::WaitId::PidFd(pidfd.as_fd()),
            rustix::process::WaitIdOptions::EXITED,
        )
        .unwrap()
        .unwrap();
        assert_eq!(status.exit_status(), Some(0), "{out}");
        (pid, out)
    }

    #[test]
    fn a_child_gets_its_descriptors_its_own_pid_and_default_signals() {
        // A descriptor without close-on-exec (as one inherited from a shell would be), far up.
        let (leak, _keep) = rustix::pipe::pipe().unwrap();
        let leak = rustix::io::fcntl_dupfd_cloexec(&leak, 100).unwrap();
        rustix::io::fcntl_setfd(&leak, rustix::io::FdFlags::empty()).unwrap();
        let (extra, _other) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        // A signal blocked here must not stay blocked there (nor SIGPIPE ignored, as Rust does).
        // SAFETY: plain-data sets; changes this test thread's mask only, restored below.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        let mut before: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut before);
        }
        let script = format!(
            "echo pid $LISTEN_PID $$; test -e /dev/fd/4 && echo fd4; test -e /dev/fd/{} || echo closed; \
             exec grep -E '^Sig(Blk|Ign)' /proc/self/status",
            leak.as_raw_fd()
        );
        let (pid, out) = run(&script, extra);
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
        }
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.first().copied(), Some(format!("pid {pid} {pid}").as_str()), "{out}");
        assert!(lines.contains(&"fd4"), "{out}");
        assert!(lines.contains(&"closed"), "a descriptor above the placed ones leaked: {out}");
        assert!(lines.iter().any(|l| l.starts_with("SigBlk:") && l.ends_with("0000000000000000")), "{out}");
        // What is ignored is what `std::process::Command` leaves ignored (SIGPIPE not), glibc's
        // own two signals (32 and 33, which it does not let a program change) aside.
        let ignored = |status: &str| {
            let hex = status.lines().find_map(|l| l.strip_prefix("SigIgn:")).unwrap_or_default().trim();
            u64::from_str_radix(hex, 16).unwrap() & !(0b11 << 31)
        };
        let std_child = std::process::Command::new("grep").args(["^SigIgn", "/proc/self/status"]).output().unwrap();
        let std_ignored = ignored(&String::from_utf8(std_child.stdout).unwrap());
        assert_eq!(ignored(&out), std_ignored, "{out}");
        assert_eq!(std_ignored & (1 << (libc::SIGPIPE - 1)), 0, "SIGPIPE is not ignored");
    }

    /// A descriptor placed from above, and one planted above without close-on-exec; the
    /// child's output, its table's size (`FDSize`), and how many of this process's descriptors
    /// still refer to the placed pipe afterwards (its other end only, unless a copy leaked).
    fn spawn_with_descriptors_above(refused: bool) -> (String, i32, usize) {
        crate::os::fds::raise_fd_limit();
        let (extra, _other) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let extra = lift(extra);
        let pipe = std::fs::read_link(format!("/proc/self/fd/{}", extra.as_raw_fd())).unwrap();
        assert!(extra.as_raw_fd() >= HIGH_FDS, "lifted: {}", extra.as_raw_fd());
        let (leak, _keep) = rustix::pipe::pipe().unwrap();
        let leak = rustix::io::fcntl_dupfd_cloexec(&leak, HIGH_FDS + 5).unwrap();
        rustix::io::fcntl_setfd(&leak, rustix::io::FdFlags::empty()).unwrap();
        let script = format!(
            "test -e /dev/fd/4 && echo fd4; test -e /dev/fd/{} || echo closed; exec grep FDSize /proc/self/status",
            leak.as_raw_fd()
        );
        let (_, out) = run_refused(&script, extra, refused);
        assert!(out.lines().any(|l| l == "fd4"), "the descriptor placed from above: {out}");
        assert!(out.lines().any(|l| l == "closed"), "a descriptor above the copy leaked: {out}");
        let size = out.lines().find_map(|l| l.strip_prefix("FDSize:")).unwrap_or_default().trim().parse().unwrap();
        let refs = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == pipe))
            .count();
        (out, size, refs)
    }

    #[test]
    fn a_child_refused_a_table_of_its_own_is_spawned_again_with_a_copy_of_the_whole_table() {
        let _one = TABLE_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let (out, size, refs) = spawn_with_descriptors_above(true);
        assert!(size > HIGH_FDS, "the second try copied the whole table: {out}");
        assert_eq!(refs, 1, "the copy staged for the first try is closed");
        assert!(!SHORT_COPY.load(std::sync::atomic::Ordering::Relaxed), "later spawns copy the whole table");
        // And they do: a spawn that would be allowed the short copy gets the whole one.
        let (out, size, _) = spawn_with_descriptors_above(false);
        assert!(size > HIGH_FDS, "{out}");
        SHORT_COPY.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    #[test]
    fn a_child_copies_only_the_low_descriptors_and_gets_those_placed_from_above() {
        let _one = TABLE_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let (out, size, refs) = spawn_with_descriptors_above(false);
        // The child's table was sized for the numbers below HIGH_FDS (a copy of the whole
        // table would cover the planted descriptor's number, above).
        assert!(size <= HIGH_FDS, "the child copied the whole table: {out}");
        // The copy made below for the child is closed again, as is the placed descriptor: of
        // the pipe, only its other end is left.
        assert_eq!(refs, 1, "a copy of the placed descriptor is left open");
    }

    #[test]
    fn a_program_that_cannot_be_executed_fails_the_spawn_and_leaves_no_child() {
        let argv = [std::ffi::OsString::from("nothing")];
        let err = Spawn::new("/nonexistent/program".as_ref(), &argv, Vec::new(), false).unwrap().spawn().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        // Reaped: no zombie copy of this program is left among this process's children (other
        // tests' children run other programs).
        let me = std::fs::read_to_string("/proc/self/comm").unwrap();
        let zombies: Vec<String> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|c| c.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .filter(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c == me) && stat.contains(") Z ")
            })
            .collect();
        assert!(zombies.is_empty(), "unreaped children: {zombies:?}");
    }
}
