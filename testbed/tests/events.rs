//! Integration tests of the event history (issue 15) over real processes: `ecewo-cluster
//! events` (the CLI as a child process, its output read as it comes), the control protocol's
//! `events` stream, and the event log file.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;
use serde_json::Value;

/// Runs the CLI to its end, within 20 s (or the test fails, the CLI killed).
fn cli(tb: &Testbed, args: &[&str]) -> Output {
    let mut cmd = Command::new(cli_binary());
    cmd.args(args).env("XDG_RUNTIME_DIR", &tb.dir);
    run_bounded(cmd, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("`ecewo-cluster {}` still ran after 20 s", args.join(" ")))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn socket_of(tb: &Testbed) -> PathBuf {
    tb.dir.join("ecewo-cluster").join(format!("testbed-{}.sock", tb.port))
}

/// `events --json` now, parsed.
fn history(tb: &Testbed) -> Vec<Value> {
    let out = cli(tb, &["events", "--json"]);
    assert!(out.status.success(), "events --json: {}", text(&out.stderr));
    text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// Waits until the history has an entry for which `f` holds; returns the history then.
fn wait_history(tb: &Testbed, what: &str, f: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut got = Vec::new();
    let found = wait_until(Duration::from_secs(20), || {
        got = history(tb);
        got.iter().any(&f)
    });
    assert!(found, "no {what} in the history:\n{got:#?}\n{}", tb.stderr());
    got
}

/// `ecewo-cluster events …` running as a child process: its stdout lines as they come.
/// Dropping it kills it (by pid).
struct Follower {
    child: Child,
    rx: Receiver<String>,
    /// Every line read so far.
    lines: Vec<String>,
    stderr: PathBuf,
}

impl Follower {
    fn start(tb: &Testbed, args: &[&str]) -> Follower {
        Follower::start_in(&tb.dir, args)
    }

    /// As [`start`](Follower::start), with `dir` as its `XDG_RUNTIME_DIR` (and for its stderr).
    fn start_in(dir: &Path, args: &[&str]) -> Follower {
        let stderr = dir.join(format!("follower-{}.err", std::process::id()));
        let stderr_file = std::fs::File::create(&stderr).unwrap();
        let mut child = Command::new(cli_binary())
            .args(args)
            .env("XDG_RUNTIME_DIR", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr_file)
            .spawn()
            .expect("start the CLI");
        let rx = lines_of(child.stdout.take().unwrap());
        Follower { child, rx, lines: Vec::new(), stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Reads lines (JSON) until one for which `f` holds, within `timeout`.
    fn wait_for(&mut self, what: &str, timeout: Duration, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        if let Some(v) = self.lines.iter().map(|l| serde_json::from_str::<Value>(l).unwrap()).find(|v| f(v)) {
            return v;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
                    self.lines.push(line);
                    if f(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "the follower printed no {what} within {timeout:?}; it printed:\n{}\nstderr:\n{}",
                    self.lines.join("\n"),
                    self.stderr()
                ),
            }
        }
    }

    /// Ctrl-C: it must exit by itself, cleanly.
    fn interrupt(&mut self) -> std::process::ExitStatus {
        send_signal(self.child.id(), Signal::INT);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "the follower did not exit on SIGINT");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is(v: &Value, kind: &str) -> bool {
    v["kind"] == kind
}

/// The scenario: `events --follow` sees a worker killed by `kill -9` exit with reason
/// crash, then its respawn and ready with the new pid; the event log file gets the same lines;
/// Ctrl-C ends the follower with status 0.
#[test]
fn follow_sees_a_kill_9_and_the_respawn_and_the_event_log_gets_the_same_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    let mut tb = Testbed::start(&["--workers", "2", "--respawn", "--event-log", log.to_str().unwrap()]);
    let mut f = Follower::start(&tb, &["events", "--follow", "--json"]);
    f.wait_for("all_ready", Duration::from_secs(10), |v| is(v, "all_ready"));
    let first = f.wait_for("spawn of worker 0", Duration::from_secs(1), |v| is(v, "spawned") && v["worker_id"] == 0);
    let victim = first["pid"].as_u64().unwrap() as u32;
    assert!(tb.workers().contains(&victim), "{victim} is a worker of the master");
    send_signal(victim, Signal::KILL);
    let exited =
        f.wait_for("exit of the killed worker", Duration::from_secs(10), |v| is(v, "exited") && v["pid"] == victim);
    assert_eq!(exited["worker_id"], 0);
    assert_eq!(exited["reason"], "crash", "{exited}");
    assert_eq!(exited["status"], serde_json::json!({"signal": 9}));
    assert_eq!(exited["crash"], true);
    assert_eq!(exited["master_pid"], tb.pid());
    let after = exited["seq"].as_u64().unwrap();
    let respawn = f.wait_for("respawn of worker 0", Duration::from_secs(10), |v| {
        is(v, "spawned") && v["worker_id"] == 0 && v["seq"].as_u64().unwrap() > after
    });
    let new_pid = respawn["pid"].as_u64().unwrap() as u32;
    assert_ne!(new_pid, victim);
    let ready =
        f.wait_for("ready of the new worker", Duration::from_secs(10), |v| is(v, "ready") && v["pid"] == new_pid);
    assert!(tb.workers().contains(&new_pid), "the new pid is a live worker");
    // Sequence numbers go up by one, whatever was printed.
    let seqs: Vec<u64> =
        f.lines.iter().map(|l| serde_json::from_str::<Value>(l).unwrap()["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());

    // The event log has the very same lines.
    let last = ready["seq"].as_u64().unwrap() as usize;
    let mut file = Vec::new();
    assert!(wait_until(Duration::from_secs(5), || {
        file = std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_owned).collect();
        file.len() >= last
    }));
    assert_eq!(file[..last], f.lines[..last], "the event log and `events --json` agree");

    let status = f.interrupt();
    assert!(status.success(), "Ctrl-C ends `events --follow` with status 0: {status:?}\n{}", f.stderr());
}

#[test]
fn events_prints_json_lines_human_lines_and_what_follows_since() {
    let tb = Testbed::start(&["--workers", "2"]);
    let all = wait_history(&tb, "all_ready", |v| is(v, "all_ready"));
    let seqs: Vec<u64> = all.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>(), "{all:#?}");
    assert!(all.iter().all(|v| v["master_pid"] == tb.pid()));
    let spawned: BTreeSet<u64> =
        all.iter().filter(|v| is(v, "spawned")).map(|v| v["worker_id"].as_u64().unwrap()).collect();
    assert_eq!(spawned, BTreeSet::from([0, 1]));

    let out = cli(&tb, &["events", "--json", "--since", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let since: Vec<Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(since, all[2..], "--since 2: the entries after #2");
    let out = cli(&tb, &["events", "--since", "1000"]);
    assert!(out.status.success() && out.stdout.is_empty(), "nothing after the last one");

    // One human line per entry: time, #seq, the worker, what happened.
    let out = cli(&tb, &["events"]);
    assert!(out.status.success());
    let human = text(&out.stdout);
    let lines: Vec<&str> = human.lines().collect();
    assert!(lines.len() >= all.len(), "{human}");
    for (line, v) in lines.iter().zip(&all) {
        let head = format!("{}  #{}  ", v["time"].as_str().unwrap(), v["seq"]);
        assert!(line.starts_with(&head), "{line:?} starts with {head:?}");
    }
    let start = &all.iter().find(|v| is(v, "spawned")).unwrap();
    let want = format!("worker {} pid {}  started", start["worker_id"], start["pid"]);
    assert!(human.contains(&want), "{want:?} in\n{human}");
    assert!(human.contains(&format!("master {}  all 2 workers ready", tb.pid())), "{human}");
}

#[test]
fn a_rolling_restart_and_a_scale_show_up() {
    let mut tb = Testbed::start(&["--workers", "2", "--startup-delay-ms", "10"]);
    let old: BTreeSet<u32> = tb.workers().into_iter().collect();
    let out = cli(&tb, &["restart", "--wait"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = cli(&tb, &["scale", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let all = wait_history(&tb, "the ready of worker 2", |v| is(v, "ready") && v["worker_id"] == 2);
    let kinds: Vec<&str> = all.iter().map(|v| v["kind"].as_str().unwrap()).collect();
    let at = |kind: &str| kinds.iter().position(|k| *k == kind).unwrap_or_else(|| panic!("no {kind}: {all:#?}"));
    let (started, finished, scaled) = (at("restart_started"), at("restart_finished"), at("scaled"));
    assert!(started < finished && finished < scaled, "{kinds:?}");
    assert_eq!(all[started]["workers"], 2);
    assert_eq!(all[finished]["outcome"], serde_json::json!({"result": "completed", "replaced": 2}));
    assert_eq!((all[scaled]["from"].as_u64(), all[scaled]["to"].as_u64()), (Some(2), Some(3)));
    // Each old worker was asked to stop by the rollout and replaced; it exited as a restart.
    let replaced: BTreeSet<u32> =
        all.iter().filter(|v| is(v, "replaced")).map(|v| v["old_pid"].as_u64().unwrap() as u32).collect();
    assert_eq!(replaced, old);
    for pid in &old {
        let signalled = all.iter().any(|v| is(v, "signalled") && v["pid"] == *pid && v["reason"] == "restart");
        assert!(signalled, "worker {pid} sent SIGTERM for the restart: {all:#?}");
    }
    wait_history(&tb, "the exits of the replaced workers", |v| {
        is(v, "exited") && v["reason"] == "restart" && old.contains(&(v["pid"].as_u64().unwrap() as u32))
    });
    assert!(all[scaled..].iter().any(|v| is(v, "spawned") && v["worker_id"] == 2));
}

/// A client that follows the events and never reads: the master keeps a bounded buffer for
/// it, goes on answering everyone else, and tells the follower how many entries it missed
/// once it reads again.
#[test]
fn a_follower_that_never_reads_does_not_stall_the_master() {
    let tb = Testbed::start(&["--workers", "2", "--event-history", "100"]);
    let path = socket_of(&tb);
    let mut stuck = UnixStream::connect(&path).unwrap();
    stuck.write_all(b"{\"v\":1,\"cmd\":\"events\",\"follow\":true}\n").unwrap();
    // Entries, two per request (a signal to each of the two workers, about 170 bytes each),
    // several times what the master's buffer and the kernel's socket buffer hold.
    let socket_buffer: u64 = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(212_992);
    let requests = ((socket_buffer + 64 * 1024) * 4 / 340).clamp(2500, 50_000);
    let mut producer = BufReader::new(UnixStream::connect(&path).unwrap());
    producer.get_ref().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for i in 0..requests {
        producer.get_mut().write_all(b"{\"v\":1,\"cmd\":\"signal\",\"signal\":\"USR1\"}\n").unwrap();
        let mut answer = String::new();
        producer.read_line(&mut answer).expect("the master answers while a follower does not read");
        assert!(answer.contains("\"ok\":true"), "{answer}");
        if i % 500 == 0 {
            // Every other client is answered meanwhile (within the CLI's 5 s timeout).
            let out = cli(&tb, &["status", "--json"]);
            assert!(out.status.success(), "status while a follower does not read: {}", text(&out.stderr));
        }
    }
    let last = history(&tb).last().unwrap()["seq"].as_u64().unwrap();
    assert!(last >= 2 * requests, "{last} entries recorded");
    // The follower reads at last: a bounded part of the history, then one line saying how
    // many entries left the ring before it could read them, then the entries kept.
    stuck.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stuck);
    let (mut events, mut missed, mut after_missed) = (0u64, None, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the follower never caught up");
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("the master streams to the follower once it reads");
        assert!(n > 0, "the master closed the follower");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], true, "{line}");
        if let Some(m) = v.get("missed") {
            missed = Some((m["count"].as_u64().unwrap(), m["next_seq"].as_u64().unwrap()));
        } else if let Some(e) = v.get("event") {
            events += 1;
            let seq = e["seq"].as_u64().unwrap();
            if missed.is_some() {
                after_missed.push(seq);
            }
            if seq == last {
                break;
            }
        }
    }
    let (count, next) = missed.expect("a `missed` line");
    assert!(count > 0 && events + count >= last, "{events} read + {count} missed cover {last}");
    assert!(events < last, "the master did not buffer everything: {events} of {last}");
    assert_eq!(after_missed.first(), Some(&next), "the entries go on where the gap ends");
    assert!(after_missed.windows(2).all(|w| w[1] == w[0] + 1));
}

/// The protocol on one connection: the history, then `end`, and the connection takes
/// requests again; a request sent behind `events` before its end is refused, closing it.
#[test]
fn a_connection_takes_requests_after_the_end_of_its_stream_only() {
    let tb = Testbed::start(&["--workers", "1"]);
    wait_history(&tb, "all_ready", |v| is(v, "all_ready"));
    let read_all = |s: &mut BufReader<UnixStream>| {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if s.read_line(&mut line).expect("read") == 0 {
                return (lines, true);
            }
            let v: Value = serde_json::from_str(&line).unwrap();
            let last = v.get("end").is_some();
            lines.push(v);
            if last {
                return (lines, false);
            }
        }
    };
    let connect = || {
        let s = UnixStream::connect(socket_of(&tb)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        BufReader::new(s)
    };
    let mut s = connect();
    s.get_mut().write_all(b"{\"v\":1,\"cmd\":\"events\",\"since\":1}\n").unwrap();
    let (lines, closed) = read_all(&mut s);
    assert!(!closed);
    assert_eq!(lines[0]["history"]["master_pid"], tb.pid(), "{lines:?}");
    let last = lines[0]["history"]["last_seq"].as_u64().unwrap();
    let seqs: Vec<u64> = lines[1..lines.len() - 1].iter().map(|l| l["event"]["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (2..=last).collect::<Vec<_>>());
    assert_eq!(lines.last().unwrap()["end"]["last_seq"], last);
    s.get_mut().write_all(b"{\"v\":1,\"cmd\":\"probe\",\"probe\":\"live\"}\n").unwrap();
    let mut answer = String::new();
    s.read_line(&mut answer).unwrap();
    assert!(answer.contains("\"pass\":true"), "after the end, requests again: {answer}");

    let mut s = connect();
    s.get_mut().write_all(b"{\"v\":1,\"cmd\":\"events\"}\n{\"v\":1,\"cmd\":\"status\"}\n").unwrap();
    let (lines, closed) = read_all(&mut s);
    assert!(closed, "closed after the refusal: {lines:?}");
    let refusal = lines.last().unwrap();
    assert_eq!(refusal["ok"], false);
    assert!(refusal["error"].as_str().unwrap().contains("streams events"), "{refusal}");
    assert!(lines.iter().all(|l| l.get("cluster").is_none()), "no status answer inside the stream");
}

/// `events --follow` across an upgrade of the master: it sees the old master's hand-over and
/// end, says on stderr that it follows the new master, and prints the new master's history.
#[test]
fn follow_goes_on_with_the_new_master_after_an_upgrade() {
    let mut tb = Testbed::start(&["--workers", "1"]);
    let old_master = tb.pid();
    let mut f = Follower::start(&tb, &["events", "-f", "--json"]);
    f.wait_for("all_ready", Duration::from_secs(10), |v| is(v, "all_ready"));
    let mut new_masters = NewMasters::default();
    tb.signal(Signal::USR1);
    let started = f.wait_for("the new master's start", Duration::from_secs(20), |v| is(v, "master_started"));
    new_masters.watch(started["new_pid"].as_u64().unwrap() as u32);
    let ended = f.wait_for("the old master's end", Duration::from_secs(30), |v| is(v, "ended"));
    assert_eq!(
        (ended["master_pid"].as_u64(), &ended["outcome"]["result"]),
        (Some(old_master as u64), &Value::from("upgraded"))
    );
    let new_master = started["new_pid"].as_u64().unwrap();
    let took = f.wait_for("the new master's take-over", Duration::from_secs(20), |v| {
        is(v, "took_over") && v["master_pid"] == new_master
    });
    assert_eq!(took["handed_over"], true);
    // From the start of the new master's history.
    assert!(f.lines.iter().any(|l| l.contains("\"seq\":1,") && l.contains(&format!("\"master_pid\":{new_master},"))));
    assert!(f.stderr().contains(&format!("now following master pid {new_master}")), "stderr: {}", f.stderr());
    assert!(tb.wait_exit(Duration::from_secs(20)).is_some(), "the old master exited");
    let status = f.interrupt();
    assert!(status.success(), "{status:?}");
}

/// A reader that goes away (`events -f | head -n 1`): the CLI ends with status 0 at its next
/// line, quietly.
#[test]
fn follow_ends_quietly_when_its_reader_goes_away() {
    let tb = Testbed::start(&["--workers", "1"]);
    let mut f = Follower::start(&tb, &["events", "--follow"]);
    assert!(f.rx.recv_timeout(Duration::from_secs(10)).is_ok(), "a first line");
    // Close the read end: stop the thread that reads it, and drop the pipe.
    drop(std::mem::replace(&mut f.rx, mpsc::channel().1));
    // Lines for it to write: the worker gets signals.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let _ = cli(&tb, &["signal", "USR1"]);
        if let Some(st) = f.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the CLI did not end when its reader went away");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}: {}", f.stderr());
    assert!(!f.stderr().contains("panicked"), "{}", f.stderr());
}

/// `ecewo-cluster run`'s `--event-log` and `--event-history`: the master keeps the last N
/// events, the file gets every one, to the end.
#[test]
fn run_mode_keeps_n_events_and_logs_every_one() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    let args: Vec<String> = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--ready",
        "delay=100",
        "--event-history",
        "3",
        "--event-log",
        log.to_str().unwrap(),
        "--",
        "sleep",
        "300",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut tb =
        Testbed::start_with(Options { program: Some(cli_binary()), exact_args: true, args, ..Options::default() });
    let mut sleepers = Sleepers(tb.workers());
    let out = cli(&tb, &["scale", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let kept = wait_history(&tb, "the ready of worker 1", |v| is(v, "ready") && v["worker_id"] == 1);
    sleepers.0.extend(tb.workers());
    let seqs: Vec<u64> = kept.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![4, 5, 6], "the last 3 of spawned, ready, all_ready, scaled, spawned, ready: {kept:#?}");
    let out = cli(&tb, &["stop"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(tb.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()), "{}", tb.stderr());
    let file: Vec<Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seqs: Vec<u64> = file.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=file.len() as u64).collect::<Vec<_>>(), "every event, in order");
    assert_eq!(
        file[..6].iter().map(|v| v["kind"].as_str().unwrap()).collect::<Vec<_>>(),
        ["spawned", "ready", "all_ready", "scaled", "spawned", "ready"]
    );
    assert!(file.iter().any(|v| is(v, "shutdown_started")));
    assert_eq!(file.last().unwrap()["outcome"]["result"], "stopped", "{file:#?}");
}

/// Kills, at the end of a test, the `sleep` workers of a `run` cluster it saw (by pid).
struct Sleepers(Vec<u32>);

impl Drop for Sleepers {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" && alive(pid) {
                send_signal(pid, Signal::KILL);
            }
        }
    }
}

/// `--event-log` naming a FIFO, with no reader (opening it for writing would block) and with a
/// reader that never reads (writing to it would block the master's loop): `init` refuses it at
/// once, in one sentence that says what to do instead.
#[test]
fn an_event_log_that_is_not_a_regular_file_is_refused_at_init() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("events.fifo");
    rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, rustix::fs::Mode::from(0o600), 0).unwrap();
    for with_reader in [false, true] {
        let _reader = with_reader.then(|| {
            rustix::fs::open(
                &fifo,
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK,
                rustix::fs::Mode::empty(),
            )
            .unwrap()
        });
        let mut cmd = Command::new(TESTBED);
        cmd.args(["--port", "0", "--workers", "1", "--event-log", fifo.to_str().unwrap()])
            .env("XDG_RUNTIME_DIR", dir.path())
            .env("NO_COLOR", "1");
        let out = run_bounded(cmd, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("init did not refuse the FIFO (reader: {with_reader}) within 10 s"));
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        let sentence = format!(
            "log file {}: the event log is a FIFO, not a regular file; it must be a file (to stream the events, use `ecewo-cluster events -f --json`)",
            fifo.display()
        );
        assert!(stderr.contains(&sentence), "reader: {with_reader}; stderr:\n{stderr}");
    }
}

/// A socket that accepts every connection and closes it at once (a master failing in a loop,
/// a stale proxy): `events -f` backs off between attempts instead of spinning, and Ctrl-C still
/// ends it at once, with status 0.
#[test]
fn follow_backs_off_from_a_socket_that_drops_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drops.sock");
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let (accepted, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let server = {
        let (accepted, done) = (accepted.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        drop(s);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        })
    };
    let mut f = Follower::start_in(dir.path(), &["events", "-f", "--socket", path.to_str().unwrap()]);
    assert!(
        wait_until(Duration::from_secs(10), || accepted.load(Ordering::Relaxed) >= 2),
        "the follower connected and tried again: {}",
        f.stderr()
    );
    // A measuring window, not synchronization: how often it comes back in 2 s.
    let before = accepted.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(2));
    let during = accepted.load(Ordering::Relaxed) - before;
    assert!(f.child.try_wait().unwrap().is_none(), "it keeps waiting for a master: {}", f.stderr());
    assert!(during < 50, "{during} connections in 2 s: it does not back off");
    let status = f.interrupt();
    assert!(status.success(), "{status:?}: {}", f.stderr());
    assert!(!f.stderr().contains("panicked"), "{}", f.stderr());
    done.store(true, Ordering::Relaxed);
    server.join().unwrap();
}

/// A master that streams, goes away, and the one answering next refuses to stream (an older
/// version without `events`, or 16 followers already): `events -f` ends with status 1 and
/// that master's message instead of trying again forever.
#[test]
fn follow_ends_with_the_message_of_a_master_that_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refuses.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let refusal = "at most 16 connections follow the events; try again when one ends";
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    let server = std::thread::spawn(move || {
        // The first connection: a stream's header, then the master goes away.
        let (mut first, _) = listener.accept().unwrap();
        let mut request = String::new();
        BufReader::new(first.try_clone().unwrap()).read_line(&mut request).unwrap();
        first
            .write_all(b"{\"v\":1,\"ok\":true,\"history\":{\"master_pid\":4242,\"capacity\":10,\"first_seq\":null,\"last_seq\":0}}\n")
            .unwrap();
        drop(first);
        // Every later one: refused.
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let mut request = String::new();
                    let _ = BufReader::new(s.try_clone().unwrap()).read_line(&mut request);
                    let _ = writeln!(s, "{}", serde_json::json!({"v": 1, "ok": false, "error": refusal}));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    let mut f = Follower::start_in(dir.path(), &["events", "-f", "--socket", path.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = f.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "a refusal did not end the follower: {}", f.stderr());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(1), "{}", f.stderr());
    assert!(f.stderr().contains(refusal), "{}", f.stderr());
    drop(f);
    done.store(true, Ordering::Relaxed);
    server.join().unwrap();
}
