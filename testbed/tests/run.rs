//! `ecewo-cluster run [OPTIONS] -- CMD`: the CLI as the master of workers that run a given
//! command, over real processes: the Python and Node examples (listeners from fd 3, READY=1,
//! STATUS=, WATCHDOG=1), supervision (respawn, rolling restart that deploys, scaling, probes,
//! metrics, hung workers), bad commands, readiness deadlines and delays, forged and oversized
//! notifications, compatibility variables.
//!
//! Every process a test starts carries a variable of its own (`ECEWO_RUN_TEST`, inherited by
//! the workers and their children): `Run`'s drop kills each process that has it, by pid, and
//! the tests check with it that nothing is left behind.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_owned()
}

fn python_example() -> String {
    root().join("examples/python/server.py").display().to_string()
}

fn node_example() -> String {
    root().join("examples/node/server.js").display().to_string()
}

/// A variable no other process has: this test's processes carry it.
fn new_marker() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

const MARK: &str = "ECEWO_RUN_TEST";

/// The live processes whose environment holds `MARK=marker`.
fn marked(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if env_of(pid).get(MARK).is_some_and(|v| v == marker) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// A process's environment, from /proc (empty if it is gone).
fn env_of(pid: u32) -> BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// `KEY=VALUE` lines (the examples' `/env`).
fn parse_env(body: &str) -> BTreeMap<String, String> {
    body.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// The `ecewo-cluster run` arguments: `run OPTIONS -- CMD`.
fn run_args(options: &[&str], cmd: &[&str]) -> Vec<String> {
    let mut args = vec!["run".to_owned()];
    args.extend(options.iter().map(|s| s.to_string()));
    args.push("--".to_owned());
    args.extend(cmd.iter().map(|s| s.to_string()));
    args
}

/// A cluster that `ecewo-cluster run` started. Dropping it stops the master, then kills every
/// process of the test (by pid), then the master.
struct Run {
    tb: Testbed,
    marker: String,
}

impl Run {
    fn options(options: &[&str], cmd: &[&str], marker: &str) -> Options {
        let marker = marker.to_owned();
        Options {
            program: Some(cli_binary()),
            exact_args: true,
            args: run_args(options, cmd),
            configure: Some(Box::new(move |c: &mut Command| {
                c.env(MARK, marker).current_dir(root());
            })),
            ready_timeout: Duration::from_secs(30),
        }
    }

    /// Starts the cluster and waits for its ready line.
    fn start(options: &[&str], cmd: &[&str]) -> Run {
        let marker = new_marker();
        let tb = Testbed::start_with(Run::options(options, cmd, &marker));
        let mut run = Run { tb, marker };
        run.tb.remember_workers();
        run
    }

    /// Starts the cluster without waiting; the receiver gets its stdout lines.
    fn spawn(options: &[&str], cmd: &[&str]) -> (Run, mpsc::Receiver<String>) {
        let marker = new_marker();
        let (tb, rx) = Testbed::spawn(Run::options(options, cmd, &marker));
        (Run { tb, marker }, rx)
    }

    /// The master's children now.
    fn workers(&mut self) -> Vec<u32> {
        self.tb.workers()
    }

    /// Runs `ecewo-cluster ARGS` against this cluster (its control socket is under the test's
    /// directory), bounded.
    fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(cli_binary());
        cmd.args(args).env("XDG_RUNTIME_DIR", &self.tb.dir);
        run_bounded(cmd, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("ecewo-cluster {args:?} did not end in 60 s"))
    }

    /// `ecewo-cluster status --json`.
    fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// `/env` of `n` distinct workers (by pid), asked until every one answered (bounded).
    fn envs(&self, n: usize) -> BTreeMap<u32, BTreeMap<String, String>> {
        let mut seen = BTreeMap::new();
        let ok = wait_until(Duration::from_secs(15), || {
            if let Ok((200, body)) = self.tb.get("/env") {
                let env = parse_env(&body);
                if let Some(pid) = env.get("pid").and_then(|p| p.parse().ok()) {
                    seen.insert(pid, env);
                }
            }
            seen.len() >= n
        });
        assert!(ok, "only {} of {n} workers answered /env: {seen:?}\n{}", seen.len(), self.tb.stderr());
        seen
    }

    /// `GET /` answers until `n` distinct pids answered (bounded): pid → body.
    fn hellos(&self, n: usize) -> BTreeMap<u32, String> {
        let mut seen = BTreeMap::new();
        let ok = wait_until(Duration::from_secs(15), || {
            if let Ok((200, body)) = self.tb.get("/")
                && let Some(pid) = pid_of(&body)
            {
                seen.insert(pid, body);
            }
            seen.len() >= n
        });
        assert!(ok, "only {} of {n} workers answered: {seen:?}\n{}", seen.len(), self.tb.stderr());
        seen
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let master = self.tb.pid();
        let running = self.tb.child.try_wait().ok().flatten().is_none();
        if running {
            // Stopped, it starts nothing new while its workers are killed.
            send_signal(master, Signal::STOP);
        }
        self.tb.remember_workers();
        for pid in marked(&self.marker) {
            if pid != master {
                send_signal(pid, Signal::KILL);
            }
        }
        // The Testbed's drop kills and reaps the master.
    }
}

/// The workers of `status --json`: worker_id → the worker's object.
fn workers_of(status: &serde_json::Value) -> BTreeMap<u64, serde_json::Value> {
    status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| (w["worker_id"].as_u64().expect("worker_id"), w.clone()))
        .collect()
}

/// Waits until `status --json` satisfies `cond` (bounded); the last answer.
fn wait_status(run: &Run, what: &str, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(20), || {
        last = run.status();
        cond(&last)
    });
    assert!(ok, "{what}: not within 20 s; last status {last:#}\n{}", run.tb.stderr());
    last
}

fn all_active(status: &serde_json::Value, n: usize) -> bool {
    let w = workers_of(status);
    w.len() == n && w.values().all(|w| w["status"] == "active")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn the_python_example_serves_from_every_worker_with_its_own_listeners_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let tag = dir.path().join("tag");
    write_file(&tag, "v1\n");
    let mut run = Run::start(
        &["--listen", "127.0.0.1:0", "--workers", "2"],
        &["python3", &python_example(), "--tag-file", tag.to_str().unwrap()],
    );
    let port = run.tb.port;
    assert_ne!(port, 0);
    assert_eq!(run.tb.ready_line, format!("ready: 2 workers on port {port}"));
    assert_eq!(run.tb.listeners, vec![("default".to_owned(), format!("127.0.0.1:{port}"))]);
    let workers: BTreeSet<u32> = run.workers().into_iter().collect();
    assert_eq!(workers.len(), 2, "{workers:?}");

    // Each worker received the listener as systemd passes it, with its own pid, its slot, a
    // notify socket and the watchdog (the default worker timeout, 30 s).
    let envs = run.envs(2);
    assert_eq!(envs.keys().copied().collect::<BTreeSet<_>>(), workers, "the master's children answer");
    let mut ids = BTreeSet::new();
    for (pid, env) in &envs {
        assert_eq!(env.get("LISTEN_PID"), Some(&pid.to_string()), "{env:?}");
        assert_eq!(env.get("LISTEN_FDS").map(String::as_str), Some("1"), "{env:?}");
        assert_eq!(env.get("LISTEN_FDNAMES").map(String::as_str), Some("default"), "{env:?}");
        assert!(env.get("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()), "{env:?}");
        assert_eq!(env.get("WATCHDOG_USEC").map(String::as_str), Some("30000000"), "{env:?}");
        ids.insert(env.get("ECEWO_CLUSTER_WORKER_ID").cloned().expect("a worker id"));
        assert!(env_of(*pid).contains_key(MARK), "workers inherit the master's environment");
    }
    assert_eq!(ids, BTreeSet::from(["0".to_owned(), "1".to_owned()]));
    for (pid, body) in run.hellos(2) {
        let id = &envs[&pid]["ECEWO_CLUSTER_WORKER_ID"];
        assert_eq!(body, format!("Hello from worker {id}! pid={pid} tag=v1"));
    }

    // status: both workers, with what they said in STATUS=.
    let out = run.cli(&["status"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    for pid in &workers {
        assert!(stdout.contains(&pid.to_string()), "{stdout}");
    }
    assert!(stdout.contains("worker 0 serving, tag v1") && stdout.contains("worker 1 serving, tag v1"), "{stdout}");
    let status = run.status();
    assert!(all_active(&status, 2), "{status:#}");
    for w in workers_of(&status).values() {
        let id = w["worker_id"].as_u64().unwrap();
        assert_eq!(w["notify_status"], format!("worker {id} serving, tag v1"), "{w:#}");
        assert!(workers.contains(&(w["pid"].as_u64().unwrap() as u32)), "{w:#}");
    }

    let out = run.cli(&["probe", "ready"]);
    assert!(out.status.success(), "probe ready: {:?}", text(&out));
    let out = run.cli(&["metrics"]);
    let (metrics, _) = text(&out);
    assert!(out.status.success());
    for id in ["0", "1"] {
        let up = metrics
            .lines()
            .find(|l| l.starts_with("ecewo_cluster_worker_up{") && l.contains(&format!("worker=\"{id}\"")));
        assert!(up.is_some_and(|l| l.ends_with("} 1")), "worker {id} up: {metrics}");
    }

    // SIGTERM: the workers drain and exit, the master exits 0, nothing is left.
    run.tb.signal(Signal::TERM);
    let st = run.tb.wait_exit(Duration::from_secs(20)).expect("the master exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "{}", run.tb.stderr());
    assert!(wait_until(Duration::from_secs(5), || marked(&run.marker).is_empty()), "left: {:?}", marked(&run.marker));
}

#[test]
fn a_killed_worker_is_respawned_and_counted_as_a_crash() {
    let mut run = Run::start(&["--listen", "127.0.0.1:0", "--workers", "2"], &["python3", &python_example()]);
    let before = run.workers();
    assert_eq!(before.len(), 2);
    let victim = before[0];
    let slot: u64 = env_of(victim)["ECEWO_CLUSTER_WORKER_ID"].parse().unwrap();
    send_signal(victim, Signal::KILL);
    let status = wait_status(&run, "the killed worker's slot serves again", |s| {
        all_active(s, 2) && workers_of(s)[&slot]["pid"].as_u64() != Some(victim as u64)
    });
    let w = &workers_of(&status)[&slot];
    assert_eq!(w["crash_count"], 1, "{w:#}");
    let respawned = w["pid"].as_u64().unwrap() as u32;
    assert!(run.workers().contains(&respawned));
    assert!(run.hellos(2).contains_key(&respawned), "the respawned worker serves");
    let logged = format!("worker {slot} (pid {victim}) crashed");
    assert!(run.tb.wait_log(Duration::from_secs(5), |l| l.contains(&logged)), "{}", run.tb.stderr());
}

#[test]
fn restart_and_sigusr2_run_the_command_anew_and_scale_adds_workers() {
    let dir = tempfile::tempdir().unwrap();
    let tag = dir.path().join("tag");
    write_file(&tag, "v1\n");
    let mut run = Run::start(
        &["--listen", "127.0.0.1:0", "--workers", "2"],
        &["python3", &python_example(), "--tag-file", tag.to_str().unwrap()],
    );
    let old: BTreeSet<u32> = run.workers().into_iter().collect();
    assert!(run.hellos(2).values().all(|b| b.ends_with("tag=v1")));

    // A deploy: the file changes, the rollout runs the command anew for every slot.
    write_file(&tag, "v2\n");
    let out = run.cli(&["restart", "--wait"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "restart --wait: {stdout}{stderr}\n{}", run.tb.stderr());
    assert!(stdout.contains("restart completed"), "{stdout}");
    let new: BTreeSet<u32> = run.workers().into_iter().filter(|p| !old.contains(p)).collect();
    assert_eq!(new.len(), 2, "two new workers: old {old:?}, now {:?}", run.workers());
    assert!(
        wait_until(Duration::from_secs(20), || old.iter().all(|&p| !alive(p))),
        "the old workers drained and exited"
    );
    let hellos = run.hellos(2);
    assert_eq!(hellos.keys().copied().collect::<BTreeSet<_>>(), new);
    assert!(hellos.values().all(|b| b.ends_with("tag=v2")), "{hellos:?}");
    let status = run.status();
    assert!(all_active(&status, 2), "{status:#}");
    assert!(workers_of(&status).values().all(|w| w["notify_status"].as_str().is_some_and(|s| s.ends_with("tag v2"))));

    // Scaling up runs one more.
    let out = run.cli(&["scale", "3"]);
    assert!(out.status.success(), "scale: {:?}", text(&out));
    wait_status(&run, "three active workers", |s| all_active(s, 3));
    let envs = run.envs(3);
    let ids: BTreeSet<&str> = envs.values().map(|e| e["ECEWO_CLUSTER_WORKER_ID"].as_str()).collect();
    assert_eq!(ids, BTreeSet::from(["0", "1", "2"]));
    assert!(envs.iter().all(|(pid, e)| e["LISTEN_PID"] == pid.to_string()));
    assert_eq!(run.workers().len(), 3);

    // SIGUSR2 to the master is the same rolling restart.
    let before: BTreeSet<u32> = envs.keys().copied().collect();
    write_file(&tag, "v3\n");
    run.tb.signal(Signal::USR2);
    let status = wait_status(&run, "three new active workers after SIGUSR2", |s| {
        all_active(s, 3) && workers_of(s).values().all(|w| !before.contains(&(w["pid"].as_u64().unwrap_or(0) as u32)))
    });
    assert!(workers_of(&status).values().all(|w| w["notify_status"].as_str().is_some_and(|s| s.ends_with("tag v3"))));
}

#[test]
fn max_surge_reaches_the_rollout_and_zero_is_refused() {
    let marker = new_marker();
    let mut command = Command::new(cli_binary());
    let dir = tempfile::tempdir().unwrap();
    command
        .args(run_args(
            &["--listen", "127.0.0.1:0", "--workers", "2", "--max-surge", "0"],
            &["python3", &python_example()],
        ))
        .env(MARK, &marker)
        .env("XDG_RUNTIME_DIR", dir.path())
        .current_dir(root());
    let out = run_bounded(command, Duration::from_secs(20)).expect("refused at once");
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("max_surge") && stderr.contains("at least 1"), "{stderr}");
    assert!(marked(&marker).is_empty(), "left running: {:?}", marked(&marker));

    let run =
        Run::start(&["--listen", "127.0.0.1:0", "--workers", "2", "--max-surge", "2"], &["python3", &python_example()]);
    let out = run.cli(&["restart", "--wait"]);
    assert!(out.status.success(), "restart --wait: {:?}\n{}", text(&out), run.tb.stderr());
    assert!(
        run.tb.stderr().contains("graceful restart: replacing 2 workers, up to 2 at a time"),
        "{}",
        run.tb.stderr()
    );
}

#[test]
fn a_command_that_cannot_run_fails_at_start_with_a_clear_message_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("plain.txt");
    write_file(&not_executable, "#!/bin/sh\necho hello\n");
    let missing = dir.path().join("nope");
    let cases: [(&str, String); 4] = [
        ("a missing file", missing.display().to_string()),
        ("a file without the execute bit", not_executable.display().to_string()),
        ("a directory", dir.path().display().to_string()),
        ("a bare name not in PATH", "ecewo-no-such-program".to_owned()),
    ];
    for (what, cmd) in cases {
        let marker = new_marker();
        let mut command = Command::new(cli_binary());
        command
            .args(run_args(&["--listen", "127.0.0.1:0", "--workers", "2"], &[&cmd, "--flag"]))
            .env(MARK, &marker)
            .env("XDG_RUNTIME_DIR", dir.path())
            .env("RUST_LOG", "info");
        let started = Instant::now();
        let out =
            run_bounded(command, Duration::from_secs(20)).unwrap_or_else(|| panic!("{what}: still running after 20 s"));
        let took = started.elapsed();
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {stdout}{stderr}");
        assert!(took < Duration::from_secs(5), "{what}: took {took:?}");
        assert!(stderr.contains(&format!("ecewo-cluster: cannot run {cmd}")), "{what}: {stderr}");
        assert!(!stdout.contains("ready:"), "{what}: {stdout}");
        assert!(marked(&marker).is_empty(), "{what}: left running: {:?}", marked(&marker));
    }
}

#[test]
fn a_worker_that_never_sends_ready_is_a_boot_failure_and_crash_protection_stops_it() {
    let (mut run, rx) = Run::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--ready-timeout-ms",
            "500",
            "--respawn-max-crashes",
            "2",
            "--respawn-window-sec",
            "60",
        ],
        &["python3", "-c", "import time; time.sleep(60)"],
    );
    // The only slot is disabled: no worker can run any more, and the master says so and exits 1.
    let st = run.tb.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| panic!("still running\n{}", run.tb.stderr()));
    let log = run.tb.stderr();
    assert_eq!(st.code(), Some(1), "{log}");
    assert_eq!(log.matches("not ready within 500ms: killing it").count(), 2, "{log}");
    assert!(log.contains("Worker 0 crashing too fast (2 times in"), "{log}");
    assert!(log.contains("disabling respawn"), "{log}");
    assert!(log.lines().any(|l| l.starts_with("ecewo-cluster: ")), "one sentence for the failure: {log}");
    let lines: Vec<String> = rx.try_iter().collect();
    assert!(lines.iter().any(|l| l.starts_with("listener default 127.0.0.1:")), "{lines:?}");
    assert!(!lines.iter().any(|l| l.starts_with("ready:")), "{lines:?}");
    assert!(marked(&run.marker).is_empty(), "left running: {:?}", marked(&run.marker));
}

#[test]
fn ready_delay_serves_programs_that_cannot_notify() {
    let started = Instant::now();
    let run = Run::start(
        &["--listen", "127.0.0.1:0", "--workers", "1", "--ready", "delay=300"],
        &["python3", "-c", "import time; time.sleep(60)"],
    );
    assert!(started.elapsed() >= Duration::from_millis(300), "ready after {:?}", started.elapsed());
    assert_eq!(run.tb.ready_line, format!("ready: 1 workers on port {}", run.tb.port));
    assert!(all_active(&run.status(), 1));
    let out = run.cli(&["probe", "ready"]);
    assert!(out.status.success(), "{:?}", text(&out));
}

/// A worker that notifies when the test says so: it waits for files in DIR.
const NOTIFIER: &str = r#"
import os, socket, sys, time
d = sys.argv[1]
address = os.environ["NOTIFY_SOCKET"]
address = "\0" + address[1:] if address.startswith("@") else address
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
def wait_for(name):
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(d, name)):
        if time.monotonic() > deadline:
            sys.exit(3)
        time.sleep(0.01)
wait_for("go")
big = b"READY=1\nSTATUS=big\n"
s.sendto(big + b"x" * (65536 - len(big)), address)
s.sendto(b"STATUS=after", address)
wait_for("ready")
s.sendto(b"READY=1\nSTATUS=ready", address)
wait_for("final")
s.sendto(b"STATUS=final", address)
time.sleep(60)
"#;

/// Sends `data` to the notify socket `address` (a path, or `@name`: abstract) from this process.
fn send_notify(address: &str, data: &[u8]) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let sock = UnixDatagram::unbound().unwrap();
    let sent = match address.strip_prefix('@') {
        Some(name) => sock.send_to_addr(data, &SocketAddr::from_abstract_name(name).unwrap()),
        None => sock.send_to(data, address),
    };
    sent.unwrap_or_else(|e| panic!("send {} bytes to {address}: {e}", data.len()));
}

#[test]
fn forged_and_oversized_notifications_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("notifier.py");
    write_file(&script, NOTIFIER);
    let (mut run, rx) = Run::spawn(
        &["--listen", "127.0.0.1:0", "--workers", "1", "--worker-timeout-ms", "1000"],
        &["python3", script.to_str().unwrap(), dir.path().to_str().unwrap()],
    );
    // The worker's notify socket, as it received it.
    let mut worker = 0;
    let mut address = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            worker = run.workers().first().copied().unwrap_or(0);
            let env = env_of(worker);
            address = env.get("NOTIFY_SOCKET").cloned().unwrap_or_default();
            env.contains_key("ECEWO_CLUSTER_WORKER_ID") && !address.is_empty()
        }),
        "no worker with a NOTIFY_SOCKET\n{}",
        run.tb.stderr()
    );
    // From this process, which is not the worker nor its child: ignored.
    send_notify(&address, b"READY=1\nSTATUS=forged\nWATCHDOG=1");
    let forged_big = [b"READY=1\nSTATUS=forged-big\n".as_slice(), &[b'x'; 65536]].concat();
    send_notify(&address, &forged_big);
    // From the worker itself, one oversized datagram (ignored whole), then STATUS=after: once the
    // master shows `after`, it has read everything sent before.
    write_file(&dir.path().join("go"), "");
    let status = wait_status(&run, "the worker's STATUS=after", |s| workers_of(s)[&0]["notify_status"] == "after");
    let w = &workers_of(&status)[&0];
    assert_eq!(w["status"], "starting", "forged or oversized READY=1 made it ready: {w:#}");
    assert!(w["heartbeat_age"].is_null(), "a forged WATCHDOG=1 counted: {w:#}");
    assert!(!rx.try_iter().any(|l| l.starts_with("ready:")));

    // Its own READY=1 does.
    write_file(&dir.path().join("ready"), "");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.starts_with("ready:") => break line,
            Ok(_) => continue,
            Err(_) => panic!("not ready after the worker's READY=1\n{}", run.tb.stderr()),
        }
    };
    run.tb.set_ready(ready);
    assert_eq!(run.tb.ready_line, format!("ready: 1 workers on port {}", run.tb.port));

    // Ready, forged STOPPING=1 / STATUS= change nothing either; the cluster goes on.
    send_notify(&address, b"STOPPING=1\nSTATUS=forged-later");
    write_file(&dir.path().join("final"), "");
    let status = wait_status(&run, "the worker's STATUS=final", |s| workers_of(s)[&0]["notify_status"] == "final");
    let w = &workers_of(&status)[&0];
    assert_eq!(w["status"], "active", "{w:#}");
    assert_eq!(w["pid"], worker, "{w:#}");
    let out = run.cli(&["probe", "ready"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(run.tb.child.try_wait().unwrap().is_none(), "the master runs");
}

#[test]
fn compatibility_variables_several_listeners_admin_and_name() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("web.sock");
    let mut run = Run::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--listen",
            &format!("web=unix:{}", sock.display()),
            "--workers",
            "1",
            "--compat",
            "einhorn",
            "--compat",
            "server-starter",
            "--worker-timeout-ms",
            "0",
            "--admin",
            "127.0.0.1:0",
            "--name",
            "web",
        ],
        &["python3", &python_example()],
    );
    let port = run.tb.port;
    // The admin listener is the master's, the name the control socket's.
    let admin: std::net::SocketAddr = run.tb.admin.as_deref().expect("an admin line").parse().unwrap();
    assert_eq!(http_get(admin.port(), "/readyz").unwrap().0, 200);
    assert!(run.tb.dir.join(format!("ecewo-cluster/web-{port}.sock")).exists());
    let out = run.cli(&["--name", &format!("web-{port}"), "probe", "ready"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        run.tb.listeners,
        vec![("default".to_owned(), format!("127.0.0.1:{port}")), ("web".to_owned(), sock.display().to_string())]
    );
    let envs = run.envs(1);
    let (pid, env) = envs.iter().next().unwrap();
    assert_eq!(run.workers(), vec![*pid]);
    assert_eq!(env.get("LISTEN_FDS").map(String::as_str), Some("2"), "{env:?}");
    assert_eq!(env.get("LISTEN_FDNAMES").map(String::as_str), Some("default:web"), "{env:?}");
    assert_eq!(env.get("EINHORN_FD_COUNT").map(String::as_str), Some("2"), "{env:?}");
    assert_eq!(env.get("EINHORN_FD_0").map(String::as_str), Some("3"), "{env:?}");
    assert_eq!(env.get("EINHORN_FD_1").map(String::as_str), Some("4"), "{env:?}");
    let starter = env.get("SERVER_STARTER_PORT").unwrap_or_else(|| panic!("SERVER_STARTER_PORT: {env:?}"));
    assert!(starter.contains(&format!("{port}=3")) && starter.contains("=4"), "{starter}");
    assert!(!env.contains_key("WATCHDOG_USEC"), "no worker timeout, no watchdog: {env:?}");
}

#[test]
fn a_worker_that_stops_beating_is_hung_and_replaced() {
    let mut run = Run::start(
        &["--listen", "127.0.0.1:0", "--workers", "1", "--worker-timeout-ms", "1000", "--hung-grace-ms", "200"],
        &["python3", &python_example()],
    );
    let worker = run.workers()[0];
    assert_eq!(env_of(worker).get("WATCHDOG_USEC").map(String::as_str), Some("1000000"));
    // Its WATCHDOG=1 are the heartbeats.
    wait_status(&run, "a heartbeat", |s| workers_of(s)[&0]["heartbeat_age"].as_f64().is_some_and(|a| a < 1.0));
    send_signal(worker, Signal::STOP);
    let status = wait_status(&run, "a replacement of the hung worker", |s| {
        all_active(s, 1) && workers_of(s)[&0]["pid"].as_u64() != Some(worker as u64)
    });
    let logged = format!("worker 0 (pid {worker}) is hung");
    assert!(run.tb.wait_log(Duration::from_secs(5), |l| l.contains(&logged)), "{}", run.tb.stderr());
    assert!(wait_until(Duration::from_secs(10), || !alive(worker)), "the hung worker was killed");
    let new = workers_of(&status)[&0]["pid"].as_u64().unwrap() as u32;
    assert!(run.hellos(1).contains_key(&new));
}

#[test]
fn the_node_example_serves_and_notifies_through_systemd_notify() {
    let has = |program: &str| Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success());
    if !has("node") {
        eprintln!("skipped: node is not installed (apt-get install nodejs)");
        return;
    }
    // Without systemd-notify the example cannot send READY=1: it runs with a ready delay then.
    let notify = has("systemd-notify");
    let mut options = vec!["--listen", "127.0.0.1:0", "--workers", "2"];
    if !notify {
        eprintln!("systemd-notify is missing: the node example runs with --ready delay=500");
        options.extend(["--ready", "delay=500"]);
    }
    let mut run = Run::start(&options, &["node", &node_example()]);
    assert_eq!(run.tb.ready_line, format!("ready: 2 workers on port {}", run.tb.port));
    let workers: BTreeSet<u32> = run.workers().into_iter().collect();
    let envs = run.envs(2);
    assert_eq!(envs.keys().copied().collect::<BTreeSet<_>>(), workers);
    for (pid, env) in &envs {
        assert_eq!(env.get("LISTEN_PID"), Some(&pid.to_string()), "{env:?}");
        assert_eq!(env.get("LISTEN_FDS").map(String::as_str), Some("1"), "{env:?}");
    }
    for (pid, body) in run.hellos(2) {
        let id = &envs[&pid]["ECEWO_CLUSTER_WORKER_ID"];
        assert_eq!(body, format!("Hello from worker {id}! pid={pid} tag=none"));
    }
    if notify {
        let status = run.status();
        for w in workers_of(&status).values() {
            let id = w["worker_id"].as_u64().unwrap();
            assert_eq!(w["notify_status"], format!("worker {id} serving, tag none"), "{w:#}");
        }
    }
    run.tb.signal(Signal::TERM);
    let st = run.tb.wait_exit(Duration::from_secs(20)).expect("the master exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "{}", run.tb.stderr());
    assert!(wait_until(Duration::from_secs(5), || marked(&run.marker).is_empty()), "left: {:?}", marked(&run.marker));
}

#[test]
fn upgrade_replaces_the_run_master_in_place_under_load() {
    // The master runs from a copy of the CLI, so that a new file can be put at its path.
    let dir = tempfile::tempdir().unwrap();
    let cli = dir.path().join("ecewo-cluster");
    std::fs::copy(cli_binary(), &cli).unwrap();
    let marker = new_marker();
    let mut opts =
        Run::options(&["--listen", "127.0.0.1:0", "--workers", "2"], &["python3", &python_example()], &marker);
    opts.program = Some(cli.clone());
    let tb = Testbed::start_with(opts);
    let mut run = Run { tb, marker };
    let old_master = run.tb.pid();
    let old_workers: BTreeSet<u32> = run.workers().into_iter().collect();
    // Fresh connections only: the example answers HTTP/1.0, one request per connection.
    let load = Load::start(run.tb.port, 2, 0, false);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 100));
    // A new build at the path: a new file (a new inode).
    let staged = dir.path().join("staged");
    std::fs::copy(cli_binary(), &staged).unwrap();
    std::fs::rename(&staged, &cli).unwrap();
    let out = run.cli(&["upgrade", "--wait"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}\n{}", run.tb.stderr());
    assert!(stdout.contains("took over"), "{stdout}");
    assert!(run.tb.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()), "the old master exits 0");
    let status = wait_status(&run, "the new master serves", |s| s["master"]["pid"] != old_master && all_active(s, 2));
    assert_eq!(status["cluster"]["generation"], 1);
    let new_master = status["master"]["pid"].as_u64().unwrap() as u32;
    assert_eq!(std::fs::read_link(format!("/proc/{new_master}/exe")).unwrap(), cli);
    let new_workers: BTreeSet<u32> =
        workers_of(&status).values().filter_map(|w| w["pid"].as_u64()).map(|p| p as u32).collect();
    assert!(new_workers.is_disjoint(&old_workers), "{new_workers:?} {old_workers:?}");
    let start = load.count();
    assert!(wait_until(Duration::from_secs(10), || load.count() >= start + 200));
    let result = load.stop();
    assert_eq!(result.failed, 0, "{:?}", &result.errors[..result.errors.len().min(10)]);
    let out = run.cli(&["stop"]);
    assert!(out.status.success());
    assert!(wait_until(Duration::from_secs(20), || marked(&run.marker).is_empty()), "nothing is left");
}
