//! Captured worker output over real processes: whole lines that name their worker, a slow
//! reader of the master's stdout that never slows a worker (lines dropped and counted),
//! `ecewo-cluster logs` (recent lines, one worker, `--follow` across a `kill -9` and the
//! respawn), rotation and reopening of the log file (signal and CLI), and `--log-format json`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;

fn cli(tb: &Testbed, args: &[&str]) -> Output {
    let mut cmd = Command::new(cli_binary());
    cmd.args(args).env("XDG_RUNTIME_DIR", &tb.dir);
    run_bounded(cmd, Duration::from_secs(20)).expect("the CLI answers")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Checks a line the testbed's `/print` wrote (`print PID I LEN <filler>`): whole (LEN bytes,
/// one letter of filler chosen by I) and written by `pid`. The line's number.
fn check_print(line: &str, pid: u32) -> u64 {
    parse_print(line, pid).unwrap_or_else(|e| panic!("{e}: {line:.200}"))
}

/// As [`check_print`], what is wrong as an `Err`.
fn parse_print(line: &str, pid: u32) -> Result<u64, &'static str> {
    let fields: Vec<&str> = line.split(' ').collect();
    let [print, by, i, len, filler] = fields[..] else { return Err("a print line has 5 fields") };
    if print != "print" {
        return Err("not a print line");
    }
    if by.parse::<u32>() != Ok(pid) {
        return Err("not written by the worker it names");
    }
    let i: u64 = i.parse().map_err(|_| "no line number")?;
    if len.parse::<usize>() != Ok(line.len()) {
        return Err("the line is not whole");
    }
    let fill = (b'a' + (i % 26) as u8) as char;
    if !filler.chars().all(|c| c == fill) {
        return Err("something of another line is in it");
    }
    Ok(i)
}

/// `[worker W pid P] text` or `[worker W pid P stderr] text`: (W, P, stderr, text).
fn parse_prefixed(line: &str) -> Option<(usize, u32, bool, &str)> {
    let rest = line.strip_prefix("[worker ")?;
    let (head, text) = rest.split_once("] ")?;
    let mut parts = head.split(' ');
    let worker = parts.next()?.parse().ok()?;
    (parts.next()? == "pid").then_some(())?;
    let pid = parts.next()?.parse().ok()?;
    let stderr = match parts.next() {
        None => false,
        Some("stderr") => true,
        Some(_) => return None,
    };
    Some((worker, pid, stderr, text))
}

fn dropped(tb: &Testbed) -> u64 {
    tb.stats()["cluster"]["log_lines_dropped"].as_u64().expect("the statistics count dropped lines")
}

/// A child process killed (by pid) when the test ends, also when it fails.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ecewo-cluster logs -f` against `tb`: the process, the lines it prints on stdout and those
/// on stderr, as they come.
fn follow_logs(tb: &Testbed) -> (Kid, mpsc::Receiver<String>, mpsc::Receiver<String>) {
    let mut follow = Kid(Command::new(cli_binary())
        .args(["logs", "-f"])
        .env("XDG_RUNTIME_DIR", &tb.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());
    let rx = common::lines_of(follow.0.stdout.take().expect("piped stdout"));
    let said = common::lines_of(follow.0.stderr.take().unwrap());
    (follow, rx, said)
}

/// Waits for a line that `find` accepts, up to `timeout`; what it returned.
fn wait_line<T>(rx: &mpsc::Receiver<String>, timeout: Duration, mut find: impl FnMut(&str) -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok()?;
        if let Some(found) = find(&line) {
            return Some(found);
        }
    }
}

/// The cluster's control socket.
fn control_socket(tb: &Testbed) -> std::path::PathBuf {
    std::fs::read_dir(tb.dir.join("ecewo-cluster"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "sock"))
        .expect("the control socket")
}

/// A raw control connection that sent `request` (a JSON line) and read its first answer.
fn control_request(sock: &Path, request: &str) -> (BufReader<std::os::unix::net::UnixStream>, serde_json::Value) {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    (reader, v)
}

/// The whole lines of a log file the master may be writing meanwhile: a line it has written only
/// part of yet (its writer flushes a buffer at a time) is left for the next read.
fn whole_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let done = text.rfind('\n').map_or(0, |i| i + 1);
    text[..done].lines().map(str::to_owned).collect()
}

/// The print lines in a JSON log file, checked, by pid: each pid's worker and line numbers.
fn json_prints(path: &Path) -> BTreeMap<u32, (usize, Vec<u64>)> {
    let mut by_pid: BTreeMap<u32, (usize, Vec<u64>)> = BTreeMap::new();
    for line in whole_lines(path) {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("a line that is not JSON ({e}): {line:.300}"));
        let Some(text) = v["line"].as_str().filter(|t| t.starts_with("print ")) else { continue };
        let pid = v["pid"].as_u64().unwrap() as u32;
        let worker = v["worker"].as_u64().unwrap() as usize;
        assert_eq!(v["stream"], "stdout");
        assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{line:.200}");
        let i = check_print(text, pid);
        let entry = by_pid.entry(pid).or_insert((worker, Vec::new()));
        assert_eq!(entry.0, worker, "pid {pid} is one worker's");
        entry.1.push(i);
    }
    by_pid
}

/// Several workers write many long lines at the same time (each longer than what a pipe writes
/// at once): every captured line parses, is whole, and names the worker and pid that wrote it;
/// a line longer than the maximum comes in marked pieces.
#[test]
fn captured_lines_are_whole_and_name_their_worker() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("workers.log");
    // A queue that holds everything: no line may be missing here (drops have their own test).
    let mut tb = Testbed::start(&[
        "--workers",
        "3",
        "--capture-output",
        "json",
        "--log-file",
        log.to_str().unwrap(),
        "--log-queue",
        "100000:67108864",
    ]);
    let (requests, per, bytes) = (9usize, 100usize, 6000usize);
    let port = tb.port;
    let calls: Vec<_> = (0..requests)
        .map(|_| std::thread::spawn(move || http_get(port, &format!("/print?lines={per}&bytes={bytes}"))))
        .collect();
    for c in calls {
        let (status, body) = c.join().unwrap().expect("a /print answer");
        assert_eq!((status, body.as_str()), (200, format!("printed {per}").as_str()));
    }
    let expected = (requests * per) as u64;
    let counted = || json_prints(&log).values().map(|(_, l)| l.len() as u64).sum::<u64>();
    assert!(wait_until(Duration::from_secs(20), || counted() >= expected), "{} lines of {expected}", counted());
    let prints = json_prints(&log);
    assert_eq!(counted(), expected, "every line once");
    assert_eq!(dropped(&tb), 0);
    let workers: BTreeSet<u32> = tb.workers().into_iter().collect();
    assert!(prints.keys().all(|pid| workers.contains(pid)), "{:?} vs {workers:?}", prints.keys());
    assert!(prints.len() >= 2, "several workers wrote at once: {:?}", prints.keys());
    // Each worker's lines come in the order it wrote them: request after request, 0 to per-1.
    for (pid, (_, numbers)) in &prints {
        for (n, i) in numbers.iter().enumerate() {
            assert_eq!(*i, (n % per) as u64, "pid {pid}: line {n} out of order");
        }
    }
    // A line of 40000 bytes with lines of at most 16384: three pieces, all but the last marked.
    let (status, _) = tb.get("/print?lines=1&bytes=40000").unwrap();
    assert_eq!(status, 200);
    let pieces = || {
        whole_lines(&log)
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .skip_while(|v| !v["line"].as_str().is_some_and(|t| t.starts_with("print ") && t.contains(" 40000 ")))
            .take(3)
            .collect::<Vec<_>>()
    };
    assert!(wait_until(Duration::from_secs(10), || pieces().len() == 3), "the long line's pieces");
    let p = pieces();
    let sizes: Vec<usize> = p.iter().map(|v| v["line"].as_str().unwrap().len()).collect();
    assert_eq!(sizes, [16384, 16384, 40000 - 2 * 16384]);
    assert_eq!(p.iter().map(|v| v["continued"] == true).collect::<Vec<_>>(), [true, true, false]);
    let whole: String = p.iter().map(|v| v["line"].as_str().unwrap()).collect();
    check_print(&whole, p[0]["pid"].as_u64().unwrap() as u32);
}

/// The master's stdout is a pipe the test stops reading: a worker that writes 10 MB still
/// answers at once (the master reads on and drops), the drops are counted in the statistics
/// and the metrics, and once stdout is read again a line says how many were dropped; every line
/// that got through is whole.
#[test]
fn a_stdout_nobody_reads_never_slows_a_worker() {
    let (reader, writer) = std::io::pipe().unwrap();
    let opts = Options {
        args: ["--workers", "1", "--capture-output", "prefix"].map(String::from).to_vec(),
        configure: Some(Box::new(move |c: &mut Command| {
            c.stdout(writer);
        })),
        ..Options::default()
    };
    let (mut tb, _) = Testbed::spawn(opts);
    // A reader the test holds back: it takes one line at a time, when the test asks.
    let (tx, lines) = mpsc::sync_channel::<String>(0);
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready = wait_line(&lines, Duration::from_secs(20), |l| l.starts_with("ready: ").then(|| l.to_owned()));
    tb.set_ready(ready.unwrap_or_else(|| panic!("no ready line; stderr:\n{}", tb.stderr())));
    // From here on nobody reads the master's stdout.
    let started = Instant::now();
    let (status, body) = tb.get("/print?lines=20000&bytes=500").expect("the worker answers");
    let took = started.elapsed();
    assert_eq!((status, body.as_str()), (200, "printed 20000"));
    assert!(took < Duration::from_secs(10), "writing 10 MB took {took:?} with stdout blocked");
    assert!(wait_until(Duration::from_secs(10), || dropped(&tb) > 0), "drops are counted");
    // Still answering, still dropping: a second burst is as quick.
    let started = Instant::now();
    assert_eq!(tb.get("/burst?mb=4").unwrap(), (200, "burst 4".to_owned()));
    assert!(started.elapsed() < Duration::from_secs(10), "a 4 MiB burst took {:?}", started.elapsed());
    let metrics = cli(&tb, &["metrics"]);
    let value = text(&metrics.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("ecewo_cluster_log_lines_dropped_total{")?.split_once("} ")?.1.parse::<f64>().ok())
        .expect("the drop counter is a metric");
    assert!(value > 0.0, "{}", text(&metrics.stdout));
    // Read again: the lines that were queued come out whole, and the drops are said.
    let worker = tb.workers()[0];
    let mut notice = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while notice.is_none() && Instant::now() < deadline {
        let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) else { break };
        if let Some(rest) = line.strip_prefix("[ecewo-cluster] dropped ") {
            notice = rest.split(' ').next().and_then(|n| n.parse::<u64>().ok());
            continue;
        }
        let (w, pid, stderr, text) =
            parse_prefixed(&line).unwrap_or_else(|| panic!("not a captured line: {line:.200}"));
        assert_eq!((w, pid), (0, worker));
        if !stderr && text.starts_with("print ") {
            check_print(text, pid);
        }
    }
    let said = notice.expect("a line says how many lines were dropped");
    assert!(said > 0 && said <= dropped(&tb), "said {said}, counted {}", dropped(&tb));
}

/// `logs --follow` shows the recent lines, then sees a worker killed with SIGKILL and the
/// start-up line of its replacement, with the new pid.
#[test]
fn logs_follow_sees_a_kill_and_the_respawned_worker() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("w.log");
    let mut tb = Testbed::start(&["--workers", "2", "--respawn", "--log-file", log.to_str().unwrap()]);
    let (_follow, rx, _said) = follow_logs(&tb);
    let starting = |slot: usize| {
        move |line: &str| {
            let (w, pid, stderr, text) = parse_prefixed(line)?;
            (w == slot && stderr && text == format!("testbed worker {slot} pid {pid} starting")).then_some(pid)
        }
    };
    let old =
        wait_line(&rx, Duration::from_secs(10), starting(1)).expect("worker 1's start-up line, from the recent lines");
    assert!(tb.workers().contains(&old));
    send_signal(old, Signal::KILL);
    let new = wait_line(&rx, Duration::from_secs(20), starting(1)).expect("the replacement's start-up line, followed");
    assert_ne!(new, old, "the new worker's pid");
    assert!(wait_until(Duration::from_secs(5), || tb.workers().contains(&new)));
    // And its output as it comes.
    assert_eq!(http_get(tb.port, "/print?lines=3&bytes=50").unwrap().0, 200);
    let printed = wait_line(&rx, Duration::from_secs(10), |l| {
        let (_, pid, _, text) = parse_prefixed(l)?;
        text.starts_with("print ").then(|| check_print(text, pid))
    });
    assert!(printed.is_some(), "followed lines of /print");
}

/// `logs --worker N` shows that worker's lines only (text and JSON); a cluster that does not
/// capture says so in one sentence and `logs` exits 1, as `reopen-logs` does.
#[test]
fn logs_of_one_worker_and_of_a_cluster_without_capture() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("w.log");
    let tb = Testbed::start(&["--workers", "2", "--capture-output", "json", "--log-file", file.to_str().unwrap()]);
    // The start-up lines of both workers are kept; make both write more.
    for _ in 0..6 {
        assert_eq!(tb.get("/print?lines=2&bytes=60").unwrap().0, 200);
    }
    let out = cli(&tb, &["logs", "--worker", "1", "-n", "50"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.lines().count() >= 1, "{shown}");
    assert!(shown.lines().all(|l| l.starts_with("[worker 1 pid ")), "{shown}");
    assert!(shown.contains("testbed worker 1 pid "), "{shown}");
    let out = cli(&tb, &["logs", "--json", "-n", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "-n 3");
    assert!(lines.iter().all(|v| v["pid"].is_u64() && v["worker"].is_u64() && v["line"].is_string()));
    drop(tb);
    let plain = Testbed::start(&["--workers", "1"]);
    for args in [&["logs"][..], &["logs", "-f"], &["reopen-logs"]] {
        let out = cli(&plain, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "one sentence: {err}");
        assert!(err.contains("does not capture its workers' output"), "{err}");
    }
}

/// Size-based rotation keeps `path.1` … `path.K` and no more; after the file was moved away,
/// the reopen signal (SIGALRM by default) and `ecewo-cluster reopen-logs` each make the master
/// write to a new file at the path.
#[test]
fn the_log_file_rotates_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("r.log");
    let numbered = |n: usize| dir.path().join(format!("r.log.{n}"));
    let tb = Testbed::start(&[
        "--workers",
        "1",
        "--log-file",
        log.to_str().unwrap(),
        "--log-max-bytes",
        "100000",
        "--log-keep",
        "2",
    ]);
    assert_eq!(tb.get("/print?lines=600&bytes=1000").unwrap(), (200, "printed 600".to_owned()));
    let written =
        |p: &Path, i: u64, len: usize| std::fs::read_to_string(p).unwrap_or_default().contains(&format!(" {i} {len} "));
    assert!(wait_until(Duration::from_secs(10), || written(&log, 599, 1000)), "the last line reached the file");
    assert!(numbered(1).exists() && numbered(2).exists(), "rotated files");
    assert!(!numbered(3).exists(), "--log-keep 2 keeps two");
    for p in [log.clone(), numbered(1), numbered(2)] {
        let size = std::fs::metadata(&p).unwrap().len();
        assert!(size <= 100_000, "{} has {size} bytes", p.display());
        let text = std::fs::read_to_string(&p).unwrap();
        for line in text.lines() {
            let (_, pid, _, t) = parse_prefixed(line).unwrap_or_else(|| panic!("{line:.200}"));
            if t.starts_with("print ") {
                check_print(t, pid);
            }
        }
    }
    // logrotate's way: move the file, then say so.
    let moved = dir.path().join("r.moved");
    std::fs::rename(&log, &moved).unwrap();
    tb.signal(Signal::ALARM);
    assert!(wait_until(Duration::from_secs(10), || log.exists()), "the signal reopened the file at its path");
    assert_eq!(tb.get("/print?lines=5&bytes=70").unwrap().0, 200);
    assert!(wait_until(Duration::from_secs(10), || written(&log, 4, 70)), "new lines go to the new file");
    let before = std::fs::read_to_string(&moved).unwrap();
    assert!(!before.contains(" 4 70 "), "not to the moved one");
    // And through the control socket.
    let moved2 = dir.path().join("r.moved2");
    std::fs::rename(&log, &moved2).unwrap();
    let out = cli(&tb, &["reopen-logs"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("reopened the log file {}", log.display()));
    assert!(log.exists());
    assert_eq!(tb.get("/print?lines=3&bytes=80").unwrap().0, 200);
    assert!(wait_until(Duration::from_secs(10), || written(&log, 2, 80)));
    assert!(!std::fs::read_to_string(&moved2).unwrap().contains(" 2 80 "));
    assert!(tb.stderr().contains(&format!("reopened the log file {}", log.display())), "{}", tb.stderr());
}

/// `--log-format json`: every line the testbed (master and workers) and `ecewo-cluster run`
/// log is a JSON object with the time, level, target and message; `run --capture-output json`
/// captures a command's output as JSON lines.
#[test]
fn log_format_json_gives_json_lines() {
    let check = |log: &str| {
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 3, "{log}");
        for line in lines {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{log}"));
            assert!(v["timestamp"].is_string() && v["level"].is_string() && v["target"].is_string(), "{line}");
            assert!(v["fields"]["message"].is_string(), "{line}");
            assert!(!line.contains('\u{1b}'), "no colour codes: {line}");
        }
    };
    let mut tb = Testbed::start(&["--workers", "2", "--log-format", "json"]);
    assert_eq!(tb.get("/").unwrap().0, 200);
    tb.signal(Signal::TERM);
    assert!(tb.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()));
    let log = tb.stderr();
    check(&log);
    assert!(log.contains("on_exit id=1"), "the testbed's own lines too: {log}");
    drop(tb);
    // The CLI's `run`, over a command cluster whose output is captured to a JSON file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("py.log");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
    let args = [
        "--log-format",
        "json",
        "run",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--capture-output",
        "json",
        "--log-file",
        file.to_str().unwrap(),
        "--",
        "python3",
        "examples/python/server.py",
    ];
    let mut run = Testbed::start_with(Options {
        program: Some(cli_binary()),
        exact_args: true,
        args: args.map(String::from).to_vec(),
        configure: Some(Box::new(move |c: &mut Command| {
            c.current_dir(root);
        })),
        ready_timeout: Duration::from_secs(30),
    });
    let pid = run.workers()[0];
    assert_eq!(run.get("/").unwrap().0, 200);
    run.signal(Signal::TERM);
    assert!(run.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()), "{}", run.stderr());
    check(&run.stderr());
    let captured = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<serde_json::Value> = captured.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!lines.is_empty(), "the command's own output was captured");
    assert!(lines.iter().all(|v| v["pid"] == pid && v["worker"] == 0), "{captured}");
    assert!(lines.iter().any(|v| v["stream"] == "stderr"), "{captured}");
}

/// A `logs --follow` client that never reads: the master neither blocks nor grows (its memory
/// stays within the bounds while the workers write far more than that), answers other requests
/// at once, and the client is told how many lines it missed once it reads again.
#[test]
fn a_follower_that_does_not_read_is_left_behind() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("w.log");
    let tb = Testbed::start(&["--workers", "1", "--log-file", log.to_str().unwrap()]);
    let sock = control_socket(&tb);
    let rss = || {
        let out = cli(&tb, &["status", "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["master"]["rss_bytes"].as_u64().expect("the master's memory")
    };
    let before = rss();
    let mut follower = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    follower.write_all(b"{\"v\":1,\"cmd\":\"logs\",\"lines\":0,\"follow\":true}\n").unwrap();
    // 48 MiB of output while the follower reads nothing.
    for _ in 0..6 {
        assert_eq!(tb.get("/burst?mb=8").unwrap(), (200, "burst 8".to_owned()));
    }
    let started = Instant::now();
    let after = rss();
    assert!(started.elapsed() < Duration::from_secs(5), "status took {:?}", started.elapsed());
    assert!(after < before + (24 << 20), "the master grew from {before} to {after} bytes");
    // Read what waits, then one more line: the notice of what was left out comes first.
    follower.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(follower.try_clone().unwrap());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.contains("\"ok\":true") && first.contains("\"lines\":[]"), "{first}");
    // Drain what is buffered (the master holds at most 1 MiB for it, the socket some more).
    follower.set_nonblocking(true).unwrap();
    let mut sink = vec![0u8; 1 << 16];
    let mut drained = 0usize;
    // The notice may come as soon as there is room again, in what is drained here.
    let mut backlog = Vec::new();
    let draining = Instant::now();
    loop {
        match reader.get_mut().read(&mut sink) {
            Ok(0) => panic!("the master closed the follower"),
            Ok(n) => {
                drained += n;
                backlog.extend_from_slice(&sink[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if draining.elapsed() > Duration::from_millis(500) && drained > 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
        assert!(draining.elapsed() < Duration::from_secs(20), "the follower's backlog never ended");
    }
    assert!(drained < 8 << 20, "{drained} bytes were kept for a client that did not read");
    let mut saw_notice = backlog.split(|&b| b == b'\n').any(|line| {
        serde_json::from_slice::<serde_json::Value>(line).is_ok_and(|v| v["dropped"].as_u64().is_some_and(|n| n > 0))
    });
    follower.set_nonblocking(false).unwrap();
    let mut reader = BufReader::new(follower);
    assert_eq!(tb.get("/print?lines=1&bytes=64").unwrap().0, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(n) = v["dropped"].as_u64() {
            assert!(n > 0);
            saw_notice = true;
        }
        if v["line"]["line"].as_str().is_some_and(|t| t.starts_with("print ") && t.contains(" 64 ")) {
            break;
        }
    }
    assert!(saw_notice, "the follower was told how many lines it missed");
}

/// The reopen signal of a cluster that captures to its stdout (no log file): handled, said,
/// harmless; the master and its workers serve on (an unhandled `SIGALRM` would end them).
#[test]
fn the_reopen_signal_without_a_log_file_is_harmless() {
    let mut tb = Testbed::start(&["--workers", "1", "--capture-output", "prefix"]);
    let workers = tb.workers();
    tb.signal(Signal::ALARM);
    assert!(
        tb.wait_log(Duration::from_secs(10), |l| l.contains("nothing to reopen: the captured output goes to stdout")),
        "{}",
        tb.stderr()
    );
    assert!(tb.child.try_wait().unwrap().is_none(), "the master survives SIGALRM");
    let out = cli(&tb, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["master"]["pid"], tb.pid());
    assert_eq!(tb.workers(), workers, "the workers too");
}

/// `logs --follow` connections count with the event followers: past 16 the next one is refused
/// in a sentence and `status` still answers; a request sent on a following connection is
/// answered with an error and the connection closed (never mixed into the stream).
#[test]
fn log_followers_are_bounded_and_take_no_requests() {
    let tb = Testbed::start(&["--workers", "1", "--capture-output", "prefix"]);
    let sock = control_socket(&tb);
    let follow = r#"{"v":1,"cmd":"logs","lines":0,"follow":true}"#;
    let mut held = Vec::new();
    for i in 0..16 {
        let (conn, v) = control_request(&sock, follow);
        assert_eq!(v["ok"], true, "follower {i}: {v}");
        held.push(conn);
    }
    let (_, v) = control_request(&sock, follow);
    assert_eq!(v["ok"], false, "the 17th follower is refused: {v}");
    let error = v["error"].as_str().unwrap();
    assert!(error.contains("16 connections follow the events or the logs already"), "{error}");
    let (_, v) = control_request(&sock, r#"{"v":1,"cmd":"events","follow":true}"#);
    assert_eq!(v["ok"], false, "and so is a 17th events follower: {v}");
    let out = cli(&tb, &["status"]);
    assert!(out.status.success(), "status answers: {}", text(&out.stderr));
    // A request on a following connection: an error line, then the end of the connection.
    use std::io::Write;
    let mut conn = held.pop().unwrap();
    conn.get_mut().write_all(b"{\"v\":1,\"cmd\":\"status\"}\n").unwrap();
    let mut answer = None;
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).expect("the master closes the connection") == 0 {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(v.get("cluster").is_none(), "no status answer in the stream: {line:.200}");
        if v["ok"] == false {
            answer = Some(v["error"].as_str().unwrap().to_owned());
        }
    }
    let answer = answer.expect("an error line before the end");
    assert!(answer.contains("follows the logs"), "{answer}");
    // Its place is free again.
    let (_, v) = control_request(&sock, follow);
    assert_eq!(v["ok"], true, "{v}");
}

/// The master's stdout and stderr are one pipe (`2>&1`, systemd's journal stream): while the
/// workers print bursts and the master logs (scaling up and down), every line read is a whole
/// captured line or a whole log line of the master, never pieces of both.
#[test]
fn captured_lines_and_the_masters_log_on_one_pipe_never_cut_each_other() {
    let (reader, writer) = std::io::pipe().unwrap();
    let writer2 = writer.try_clone().unwrap();
    let opts = Options {
        args: ["--workers", "2", "--capture-output", "prefix", "--log-format", "json"].map(String::from).to_vec(),
        configure: Some(Box::new(move |c: &mut Command| {
            // The master's debug lines too: many log lines while the workers print.
            c.stdout(writer).stderr(writer2).env("RUST_LOG", "debug");
        })),
        ..Options::default()
    };
    let (mut tb, _) = Testbed::spawn(opts);
    // A reader slower than the writers (a log collector under load): the pipe is full most of
    // the time, so that a large write waits half done while the other writer writes.
    let rx = {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for (n, line) in BufReader::new(reader).lines().enumerate() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
                if n % 32 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        rx
    };
    let ready = wait_line(&rx, Duration::from_secs(20), |l| l.starts_with("ready: ").then(|| l.to_owned()));
    tb.set_ready(ready.expect("the ready line"));
    let port = tb.port;
    let bursts = std::thread::spawn(move || {
        for _ in 0..8 {
            let calls: Vec<_> =
                (0..3).map(|_| std::thread::spawn(move || http_get(port, "/print?lines=2000&bytes=1500"))).collect();
            for c in calls {
                let _ = c.join();
            }
        }
    });
    for round in 0..6 {
        let n = if round % 2 == 0 { 3 } else { 2 };
        let out = cli(&tb, &["scale", &n.to_string()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(wait_until(Duration::from_secs(20), || tb.workers().len() == n), "scaled to {n}");
    }
    bursts.join().unwrap();
    // What reaches the pipe by now, then a quiet moment: all of it.
    let (mut prints, mut logs, mut logs_among_prints, mut bad) = (0u64, 0u64, 0u64, Vec::new());
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(3)) {
        if line.starts_with("ready: ") || line.starts_with("[ecewo-cluster] dropped ") {
            continue;
        }
        let whole = match parse_prefixed(&line) {
            Some((_, pid, false, text)) => parse_print(text, pid).map(|_| prints += 1).is_ok(),
            Some((_, _, true, text)) => serde_json::from_str::<serde_json::Value>(text).is_ok(),
            None => match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) if v["timestamp"].is_string() => {
                    logs += 1;
                    logs_among_prints += u64::from(prints > 0);
                    true
                }
                _ => false,
            },
        };
        if !whole {
            bad.push(line);
        }
    }
    assert!(
        prints > 1000 && logs_among_prints > 5,
        "{prints} captured lines, {logs} log lines ({logs_among_prints} among them)"
    );
    assert!(bad.is_empty(), "{} lines cut, such as {:.300}", bad.len(), bad[0]);
}

/// `logs -f` across `ecewo-cluster upgrade --wait`: once the old master is gone it says which
/// master it follows now, shows the start-up lines of the new master's workers (each once),
/// and goes on with their new output.
#[test]
fn logs_follow_goes_on_across_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("w.log");
    let mut tb = Testbed::start(&["--workers", "2", "--log-file", log.to_str().unwrap()]);
    let (mut follow, rx, said) = follow_logs(&tb);
    let mut seen = Vec::new();
    let starting = |line: &str| {
        let (w, pid, stderr, text) = parse_prefixed(line)?;
        (stderr && text == format!("testbed worker {w} pid {pid} starting")).then_some(pid)
    };
    let old = wait_line(&rx, Duration::from_secs(10), |l| {
        seen.push(l.to_owned());
        starting(l)
    });
    assert!(old.is_some_and(|pid| tb.workers().contains(&pid)), "an old worker's start-up line");
    let out = cli(&tb, &["upgrade", "--wait"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), tb.stderr());
    let new_master: u32 = text(&out.stdout)
        .split("master pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{}", text(&out.stdout)));
    let mut cleanup = NewMasters::default();
    cleanup.watch(new_master);
    assert_ne!(new_master, tb.pid());
    let new_workers: BTreeSet<u32> = children_of(new_master).into_iter().collect();
    assert!(tb.wait_exit(Duration::from_secs(30)).is_some(), "the old master exits after the hand-over");
    let following = wait_line(&said, Duration::from_secs(20), |l| {
        l.contains(&format!("now following master pid {new_master}")).then_some(())
    });
    assert!(following.is_some(), "logs -f says which master it follows now");
    let new = wait_line(&rx, Duration::from_secs(20), |l| {
        seen.push(l.to_owned());
        starting(l).filter(|pid| new_workers.contains(pid))
    });
    let new = new.expect("a new worker's start-up line, with its pid");
    // And the new workers' output as it comes.
    assert_eq!(http_get(tb.port, "/print?lines=2&bytes=50").unwrap().0, 200);
    let printed = wait_line(&rx, Duration::from_secs(10), |l| {
        seen.push(l.to_owned());
        let (_, pid, _, text) = parse_prefixed(l)?;
        (text.starts_with("print ") && new_workers.contains(&pid)).then(|| check_print(text, pid))
    });
    assert!(printed.is_some(), "followed lines of a new worker");
    let once = seen.iter().filter(|l| starting(l) == Some(new)).count();
    assert_eq!(once, 1, "the start-up line of pid {new} once: {seen:#?}");
    assert!(follow.0.try_wait().unwrap().is_none(), "logs -f runs on");
    // Ctrl-C ends it with status 0.
    send_signal(follow.0.id(), Signal::INT);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = follow.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "logs -f did not end on SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
}
