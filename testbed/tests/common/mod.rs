//! Shared helpers of the integration tests: start the testbed, talk HTTP over loopback, look at
//! processes in /proc, and clean up every process a test started (by pid), also on failure.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

pub mod sock_diag;

pub const TESTBED: &str = env!("CARGO_BIN_EXE_testbed");

/// The `ecewo-cluster` CLI binary (package `ecewo-cluster-cli`, a sibling in the workspace: cargo
/// only hands tests the binaries of their own package).
pub fn cli_binary() -> PathBuf {
    cargo_built(&["-p", "ecewo-cluster-cli", "--bin", "ecewo-cluster"], "ecewo-cluster")
}

/// An example of the library (`examples/<name>.rs`, default features).
pub fn example_binary(name: &str) -> PathBuf {
    cargo_built(&["-p", "ecewo-cluster", "--example", name], &format!("examples/{name}"))
}

/// A binary of the workspace, built by `cargo build <args>` once per test process with the
/// profile of this test, so it is never stale (cargo releases its lock while tests run);
/// `output` is its path under `target/<profile>/`.
pub fn cargo_built(args: &[&str], output: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(Vec<String>, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let key: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    // Held while building: two tests asking for the same binary build it once.
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = built.iter().find(|(k, _)| *k == key) {
        return path.clone();
    }
    // <target>/<profile>/deps/<test> → <target>/<profile>/<output>
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet"]).args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if let Some(target_dir) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target_dir);
    }
    let status = cmd.status().expect("run cargo");
    assert!(status.success(), "cargo build {args:?} failed");
    let bin = profile_dir.join(output);
    assert!(bin.is_file(), "{} was not built", bin.display());
    built.push((key, bin.clone()));
    bin
}

/// Runs `cmd` to its end (stdin closed, stdout and stderr captured), killing it by pid if it is
/// still running after `timeout`; `None` then.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Option<std::process::Output> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start");
    let read_all = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = read_all(Box::new(child.stdout.take().unwrap()));
    let err = read_all(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    status.map(|status| std::process::Output { status, stdout, stderr })
}

/// A running testbed cluster. Dropping it kills the master and every worker it ever saw.
pub struct Testbed {
    pub child: Child,
    /// This test's directory (`XDG_RUNTIME_DIR` of the cluster: its control socket is under it).
    pub dir: PathBuf,
    pub port: u16,
    pub ready_line: String,
    /// `listener NAME ADDR` lines printed before the ready line (with `--listen`).
    pub listeners: Vec<(String, String)>,
    /// The `admin ADDR` line printed before the ready line (with `--admin`).
    pub admin: Option<String>,
    pub stderr_path: PathBuf,
    _dir: tempfile::TempDir,
    known_workers: BTreeSet<u32>,
    exited: Option<std::process::ExitStatus>,
}

/// A hook that adjusts the master's command before it starts.
pub type Configure = Box<dyn FnOnce(&mut Command)>;

/// How to start a testbed.
pub struct Options {
    pub args: Vec<String>,
    pub configure: Option<Configure>,
    pub ready_timeout: Duration,
    /// Run this file instead of the built testbed.
    pub program: Option<PathBuf>,
    /// Pass `args` as they are: no `--port 0` in front (for a program that is not the testbed).
    pub exact_args: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            args: Vec::new(),
            configure: None,
            ready_timeout: Duration::from_secs(20),
            program: None,
            exact_args: false,
        }
    }
}

pub fn args(list: &[&str]) -> Options {
    Options { args: list.iter().map(|s| s.to_string()).collect(), ..Options::default() }
}

impl Testbed {
    /// Starts `testbed --port 0 <args>` and waits for its ready line.
    pub fn start(list: &[&str]) -> Testbed {
        Testbed::start_with(args(list))
    }

    pub fn start_with(opts: Options) -> Testbed {
        let timeout = opts.ready_timeout;
        let (mut tb, rx) = Testbed::spawn(opts);
        let deadline = Instant::now() + timeout;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("listener ")
                        && let Some((name, addr)) = rest.split_once(' ')
                    {
                        tb.listeners.push((name.to_owned(), addr.to_owned()));
                        continue;
                    }
                    if let Some(addr) = line.strip_prefix("admin ") {
                        tb.admin = Some(addr.to_owned());
                        continue;
                    }
                    tb.set_ready(line);
                    return tb;
                }
                Err(_) => panic!("testbed not ready within {timeout:?}; stderr:\n{}", tb.stderr()),
            }
        }
    }

    /// Starts the testbed without waiting for it; the receiver gets stdout lines.
    pub fn spawn(opts: Options) -> (Testbed, mpsc::Receiver<String>) {
        let Options { args, configure, program, exact_args, .. } = opts;
        let dir = tempfile::tempdir().unwrap();
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(program.as_deref().unwrap_or(Path::new(TESTBED)));
        if !exact_args && !args.iter().any(|a| a == "--port") {
            cmd.args(["--port", "0"]);
        }
        // Control sockets go to this test's own directory, never the user's.
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .env("RUST_LOG", "info")
            .env("XDG_RUNTIME_DIR", dir.path());
        if let Some(f) = configure {
            f(&mut cmd);
        }
        // A program file a test just wrote may be busy for a moment: another test's child, forked
        // while the file was open for writing, holds that descriptor until its own exec.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => break other.expect("start testbed"),
            }
        };
        // (Unless `configure` gave stdout elsewhere: the test reads it itself.)
        let rx = match child.stdout.take() {
            Some(stdout) => lines_of(stdout),
            None => mpsc::channel().1,
        };
        let tb = Testbed {
            dir: dir.path().to_owned(),
            child,
            port: 0,
            ready_line: String::new(),
            listeners: Vec::new(),
            admin: None,
            stderr_path,
            _dir: dir,
            known_workers: BTreeSet::new(),
            exited: None,
        };
        (tb, rx)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The master's children now (and remembers them for the clean-up).
    pub fn workers(&mut self) -> Vec<u32> {
        let w = children_of(self.pid());
        self.known_workers.extend(&w);
        w
    }

    pub fn remember_workers(&mut self) {
        self.workers();
    }

    pub fn signal(&self, sig: Signal) {
        send_signal(self.pid(), sig);
    }

    /// Waits for the master to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                self.exited = Some(st);
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Takes the port from a ready line.
    pub fn set_ready(&mut self, line: String) {
        self.port = line.rsplit(' ').next().and_then(|p| p.trim().parse().ok()).unwrap_or(0);
        self.ready_line = line;
        self.remember_workers();
    }

    /// The cluster's statistics as a worker fetches them from the master (`GET /stats`).
    pub fn stats(&self) -> serde_json::Value {
        let (status, body) = self.get("/stats").unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The cluster's statistics, or `None` when the worker that took the request could not ask
    /// its master: for a poll while a killed master's workers drain beside the cluster's (they
    /// answer what they accepted, `/stats` with a 500).
    pub fn try_stats(&self) -> Option<serde_json::Value> {
        let (status, body) = self.get("/stats").ok()?;
        (status == 200).then(|| serde_json::from_str(&body).ok()).flatten()
    }

    /// The pids that answer `n` fresh `GET /` requests, each of which must succeed.
    pub fn serving_pids(&self, n: usize) -> BTreeSet<u32> {
        (0..n)
            .map(|_| {
                let (status, body) = self.get("/").unwrap();
                assert_eq!(status, 200, "{body}");
                pid_of(&body).unwrap()
            })
            .collect()
    }

    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.port, path)
    }

    /// Sends `GET path` on a fresh connection and returns once a worker has accepted it and read
    /// the request (which is then being served: a graceful stop waits for it): the worker's pid,
    /// and the thread that reads the response.
    pub fn get_in_flight(&mut self, path: &str) -> (u32, std::thread::JoinHandle<std::io::Result<(u16, String)>>) {
        let s = send_get(self.port, path).expect("connect and send");
        let client_port = s.local_addr().unwrap().port();
        let reader = std::thread::spawn(move || read_response(s));
        let mut holder = None;
        let accepted = wait_until(Duration::from_secs(10), || {
            let Some(socket) = server_socket_of(self.port, client_port) else { return false };
            holder = self.workers().into_iter().find(|&w| fds_of(w).iter().any(|(_, t)| *t == socket));
            holder.is_some()
        });
        assert!(accepted, "no worker accepted the connection of {path} within 10 s\n{}", self.stderr());
        (holder.unwrap(), reader)
    }

    /// Sends `GET /hang?ms=<ms>` and returns once the worker that took it is blocked in it (its
    /// log line says so): from then on that worker accepts nothing, and a connection made later
    /// waits in its socket's queue. (A worker holding the connection may still accept others
    /// before the handler runs.) The worker's pid and the reader of the answer.
    pub fn hang_in_flight(&mut self, ms: u64) -> (u32, std::thread::JoinHandle<std::io::Result<(u16, String)>>) {
        let (hung, reader) = self.get_in_flight(&format!("/hang?ms={ms}"));
        let line = format!("testbed worker pid {hung}: hang: blocking the runtime");
        assert!(self.wait_log(Duration::from_secs(10), |l| l.contains(&line)), "{line}…\n{}", self.stderr());
        (hung, reader)
    }

    /// Waits until `cond` holds on the stderr log.
    pub fn wait_log(&self, timeout: Duration, cond: impl Fn(&str) -> bool) -> bool {
        wait_until(timeout, || cond(&self.stderr()))
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Kill every worker we know of (still ours: a child of the master, or our testbed by name
        // in /proc after the master died), then the master, by pid.
        let mut pids: BTreeSet<u32> = self.known_workers.clone();
        if self.exited.is_none() {
            pids.extend(children_of(self.pid()));
        }
        for pid in pids {
            if is_testbed(pid) {
                send_signal(pid, Signal::KILL);
            }
        }
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn send_signal(pid: u32, sig: Signal) {
    if let Some(p) = Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Is `pid` a live (not zombie) testbed process?
pub fn is_testbed(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    stat.contains("(testbed)") && !is_zombie_stat(&stat)
}

fn is_zombie_stat(stat: &str) -> bool {
    stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])).unwrap_or(true)
}

/// Is `pid` alive (exists and is not a zombie)?
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !is_zombie_stat(&stat),
        Err(_) => false,
    }
}

/// Pids whose parent is `parent`, in ascending order (excluding zombies).
pub fn children_of(parent: u32) -> Vec<u32> {
    // The master is single-threaded: its main thread's `children` file lists them all, cheaply.
    if let Ok(list) = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")) {
        let mut out: Vec<u32> = list.split_whitespace().filter_map(|p| p.parse().ok()).filter(|&p| alive(p)).collect();
        out.sort();
        return out;
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) && !fields[0].starts_with('Z') {
            out.push(pid);
        }
    }
    out.sort();
    out
}

/// The targets of a process's open descriptors: (fd number, link target).
pub fn fds_of(pid: u32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return out };
    for e in dir.flatten() {
        let Ok(n) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(t) = std::fs::read_link(e.path()) {
            out.push((n, t.to_string_lossy().into_owned()));
        }
    }
    out.sort();
    out
}

pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`); returns status and body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    read_response(send_get(port, path)?)
}

/// Opens a fresh connection and sends `GET path` (`Connection: close`) on it, in one write (the
/// request arrives whole: `get_in_flight` takes "nothing unread" for "the request was read").
pub fn send_get(port: u16, path: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes())?;
    Ok(s)
}

/// Reads the whole response of a [`send_get`] connection: status and body.
pub fn read_response(mut s: TcpStream) -> std::io::Result<(u16, String)> {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
        .ok_or_else(|| std::io::Error::other(format!("bad response: {:?}", String::from_utf8_lossy(&raw))))
}

/// The inode target ("socket:[N]") of the server side of the IPv4 loopback connection between
/// `server_port` and the client's `client_port`, once a process holds it (not while it waits to
/// be accepted, nor in TIME_WAIT) and has read all the client sent so far (a request sent before
/// is then being served, not waiting in the socket), from the kernel's socket lookup (see
/// `sock_diag`).
pub fn server_socket_of(server_port: u16, client_port: u16) -> Option<String> {
    let found = sock_diag::tcp4_connection(server_port, client_port).expect("a sock_diag lookup");
    found.filter(|s| s.inode != 0 && s.unread == 0).map(|s| format!("socket:[{}]", s.inode))
}

pub fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// The worker id in a testbed `/` answer.
pub fn worker_of(body: &str) -> Option<usize> {
    body.strip_prefix("Hello from worker ")?.split('!').next()?.parse().ok()
}

/// Waits until every one of `workers` answered `GET /signals` with `usr1=1` (each answer names
/// its worker, so the check is per worker, whichever one a connection reaches).
pub fn wait_all_got_usr1(tb: &Testbed, workers: usize, timeout: Duration) -> BTreeSet<usize> {
    let mut seen = BTreeSet::new();
    wait_until(timeout, || {
        if let Ok((200, body)) = tb.get("/signals")
            && let Some((worker, count)) = body.strip_prefix("worker=").and_then(|b| b.split_once(" usr1="))
            && count == "1"
            && let Ok(id) = worker.parse()
        {
            seen.insert(id);
        }
        seen.len() == workers
    });
    seen
}

/// The pid in a testbed `/` answer.
pub fn pid_of(body: &str) -> Option<u32> {
    body.split("pid=").nth(1)?.split_whitespace().next()?.parse().ok()
}

pub fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Inodes of the TCP sockets listening on `port` (IPv4 and IPv6), as `/proc/PID/fd` names them,
/// from a dump of the kernel's listening sockets (see `sock_diag`).
pub fn listening_inodes(port: u16) -> BTreeSet<String> {
    let found = sock_diag::tcp_listening(port).expect("a sock_diag dump of listening sockets");
    found.into_iter().map(|s| format!("socket:[{}]", s.inode)).collect()
}

/// How many of `pid`'s descriptors are sockets listening on `port`.
pub fn listeners_held(pid: u32, port: u16) -> usize {
    listener_fds(pid, port).len()
}

/// The numbers of `pid`'s descriptors that are sockets listening on `port`.
pub fn listener_fds(pid: u32, port: u16) -> Vec<i32> {
    fds_among(pid, &listening_inodes(port))
}

/// The numbers of `pid`'s descriptors that refer to one of `targets` (as `/proc/PID/fd` names
/// them: `socket:[INODE]`).
pub fn fds_among(pid: u32, targets: &BTreeSet<String>) -> Vec<i32> {
    fds_of(pid).into_iter().filter(|(_, t)| targets.contains(t)).map(|(n, _)| n).collect()
}

/// The sockets listening at the unix socket path `path`, as `/proc/PID/fd` names them.
pub fn unix_listening_inodes(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path; the flags of a listening socket
            // are __SO_ACCEPTCON.
            let f: Vec<&str> = line.split_whitespace().collect();
            let listening = f.get(3) == Some(&"00010000") && f.get(7).map(Path::new) == Some(path);
            listening.then(|| format!("socket:[{}]", f[6]))
        })
        .collect()
}

/// Checks that master `pid` keeps its sockets listening on `port` at descriptor 4096 or above
/// (the library's cut-off: a spawn copies only the descriptors below it), whenever its
/// open-file limit lets it; says so and checks nothing when the limit is 4096 or less.
pub fn assert_listeners_lifted(pid: u32, port: u16) {
    assert_sockets_lifted(pid, &listening_inodes(port), &format!("port {port}"));
}

/// [`assert_listeners_lifted`] for the sockets `inodes` (listening on `what`).
pub fn assert_sockets_lifted(pid: u32, inodes: &BTreeSet<String>, what: &str) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok());
    if soft.is_some_and(|s| s <= 4096) {
        eprintln!("not checked: master {pid}'s open-file limit is {soft:?}, at or below the cut-off 4096");
        return;
    }
    let fds = fds_among(pid, inodes);
    assert!(!fds.is_empty(), "master {pid} holds no socket listening on {what}");
    assert!(
        fds.iter().all(|&n| n >= 4096),
        "master {pid}'s sockets on {what} are at {fds:?}: all should be at 4096 or above"
    );
}

/// An HTTP/1.1 client on one keep-alive connection that reconnects only when the server said
/// `Connection: close` (or before the first request). It never retries a failed request.
pub struct KeepAlive {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
    /// Connections opened so far.
    pub connections: usize,
    /// The last response said `Connection: close`.
    pub last_close: bool,
}

impl KeepAlive {
    pub fn new(port: u16) -> KeepAlive {
        KeepAlive { port, conn: None, connections: 0, last_close: false }
    }

    pub fn get(&mut self, path: &str) -> std::io::Result<(u16, String)> {
        if self.conn.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            // One write per request, sent at once: a request in pieces waits for the ACK of the
            // first (Nagle and delayed ACKs), 40 ms per request.
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
            self.connections += 1;
        }
        let result = self.exchange(path);
        self.last_close = matches!(result, Ok((_, _, false)));
        if !matches!(result, Ok((_, _, true))) {
            self.conn = None;
        }
        result.map(|(status, body, _)| (status, body))
    }

    /// Waits for the server to close the idle connection; true if it did within `timeout`.
    pub fn closed_by_server_within(&mut self, timeout: Duration) -> bool {
        let Some(conn) = self.conn.as_mut() else { return true };
        conn.get_ref().set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 1];
        let closed = matches!(conn.get_mut().read(&mut buf), Ok(0));
        if closed {
            self.conn = None;
        }
        closed
    }

    /// Returns status, body, and whether the connection may be reused.
    fn exchange(&mut self, path: &str) -> std::io::Result<(u16, String, bool)> {
        let conn = self.conn.as_mut().unwrap();
        conn.get_mut().write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
        let mut line = String::new();
        if conn.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed before a response"));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut length = 0usize;
        let mut keep = true;
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed in the headers"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (name, value) = l.split_once(':').unwrap_or((l, ""));
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_ascii_lowercase());
            if name == "content-length" {
                length = value.parse().unwrap_or(0);
            } else if name == "connection" && value == "close" {
                keep = false;
            }
        }
        let mut body = vec![0u8; length];
        conn.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned(), keep))
    }
}

/// Outcome of a [`Load`] run.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub ok: usize,
    pub failed: usize,
    pub errors: Vec<String>,
    pub bodies: Vec<String>,
}

/// Client threads issuing `GET /` in a loop until stopped (bounded by 180 s and a count), half on
/// fresh connections and half on keep-alive ones; every failure counts, nothing is retried.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<LoadResult>>,
    pub done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Load {
    pub fn start(port: u16, fresh: usize, keepalive: usize, keep_bodies: bool) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let done = std::sync::Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for i in 0..fresh + keepalive {
            let stop = stop.clone();
            let done = done.clone();
            let use_keepalive = i >= fresh;
            threads.push(std::thread::spawn(move || {
                let mut r = LoadResult::default();
                let mut ka = KeepAlive::new(port);
                // Bounds for a test that never stops its load, far beyond the waits of any test
                // (a load that ended on its own would look like a cluster that stopped serving).
                let deadline = Instant::now() + Duration::from_secs(180);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && r.ok + r.failed < 200_000 {
                    let res = if use_keepalive { ka.get("/") } else { http_get(port, "/") };
                    match res {
                        Ok((200, body)) => {
                            r.ok += 1;
                            if keep_bodies {
                                r.bodies.push(body);
                            }
                        }
                        Ok((status, body)) => {
                            r.failed += 1;
                            r.errors.push(format!("status {status}: {body}"));
                        }
                        Err(e) => {
                            r.failed += 1;
                            r.errors.push(format!(
                                "{} ({}): {e}",
                                if use_keepalive { "keep-alive" } else { "fresh" },
                                e.kind()
                            ));
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                r
            }));
        }
        Load { stop, threads, done }
    }

    pub fn count(&self) -> usize {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn stop(self) -> LoadResult {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut total = LoadResult::default();
        for t in self.threads {
            let r = t.join().unwrap();
            total.ok += r.ok;
            total.failed += r.failed;
            total.errors.extend(r.errors);
            total.bodies.extend(r.bodies);
        }
        total
    }
}

/// One HTTPS request to 127.0.0.1:`port` (server name `localhost`) with a client that trusts only `ca_der`; the response as text.
pub fn https_get(port: u16, ca_der: &[u8], path: &str) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(ca_der.to_vec())).map_err(std::io::Error::other)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).map_err(std::io::Error::other)?;
    let sock = TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    write!(tls, "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    match tls.read_to_string(&mut response) {
        Ok(_) => Ok(response),
        // A peer that closes without close_notify after a complete response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => Ok(response),
        Err(e) => Err(e),
    }
}

/// The lines of a child's output as they come, read by a thread of their own (which stops, and
/// closes the pipe, at the first line after the receiver was dropped).
pub fn lines_of(output: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Kills, at the end of a test, every process of the masters it saw besides its `Testbed`s'
/// (the new master of an upgrade; the old master and its workers are the `Testbed`'s to kill):
/// their workers first, then them, each only while it still is a testbed process (by pid).
#[derive(Default)]
pub struct NewMasters(pub Vec<u32>);

impl NewMasters {
    /// Remembers `master` and its workers now (those it has later are found at the end).
    pub fn watch(&mut self, master: u32) {
        self.0.push(master);
        self.0.extend(children_of(master));
    }
}

impl Drop for NewMasters {
    fn drop(&mut self) {
        let mut pids: BTreeSet<u32> = self.0.iter().copied().collect();
        for &m in &self.0 {
            pids.extend(children_of(m));
        }
        for pid in pids.into_iter().rev() {
            if is_testbed(pid) {
                send_signal(pid, Signal::KILL);
            }
        }
    }
}
