//! Integration tests of the control socket and the `ecewo-cluster` CLI (issue 5).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use rustix::process::Signal;
use serde_json::Value;

/// Runs the CLI against this test's socket directory.
fn cli(tb: &Testbed, args: &[&str]) -> Output {
    Command::new(cli_binary()).args(args).env("XDG_RUNTIME_DIR", &tb.dir).output().expect("run the CLI")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn socket_of(tb: &Testbed) -> PathBuf {
    tb.dir.join("ecewo-cluster").join(format!("testbed-{}.sock", tb.port))
}

fn status_json(tb: &Testbed) -> Value {
    let out = cli(tb, &["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One raw request on a fresh connection.
fn raw_request(path: &Path, line: &str) -> Value {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

#[test]
fn status_lists_the_workers_with_their_real_pids() {
    let mut tb = Testbed::start(&["--workers", "3", "--startup-delay-ms", "10"]);
    let pids: BTreeSet<u32> = tb.workers().into_iter().collect();
    let out = cli(&tb, &["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.contains(&format!("master pid {}", tb.pid())), "{table}");
    assert!(table.contains("workers 3 active of 3"), "{table}");
    assert_eq!(table.lines().filter(|l| l.contains(" active ") && !l.starts_with("workers")).count(), 3, "{table}");
    for pid in &pids {
        assert!(table.contains(&format!(" {pid} ")), "{pid} in {table}");
    }
    for column in ["PID", "STATUS", "UPTIME", "RESTARTS", "CRASHES", "MEMORY", "CPU"] {
        assert!(table.contains(column), "{table}");
    }
    let json = status_json(&tb);
    let (_, body) = tb.get("/stats").unwrap();
    let from_worker: Value = serde_json::from_str(&body).unwrap();
    for i in 0..3 {
        for key in ["worker_id", "pid", "status", "crash_count", "restarts", "start_time"] {
            assert_eq!(json["workers"][i][key], from_worker["workers"][i][key], "{key}");
        }
        assert!(json["workers"][i]["rss_bytes"].as_u64().unwrap() > 0);
        assert!(json["workers"][i]["cpu_time"].as_f64().is_some());
    }
    let json_pids: BTreeSet<u32> = (0..3).map(|i| json["workers"][i]["pid"].as_u64().unwrap() as u32).collect();
    assert_eq!(json_pids, pids);
    assert_eq!(json["cluster"]["active_workers"], 3);
    assert!(json["cluster"]["total_rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(json["master"]["pid"], tb.pid());
    // The other ways to find it.
    let by_pid = cli(&tb, &["--pid", &tb.pid().to_string(), "status", "--json"]);
    assert!(by_pid.status.success(), "{}", stderr(&by_pid));
    let by_socket = cli(&tb, &["--socket", socket_of(&tb).to_str().unwrap(), "status"]);
    assert!(by_socket.status.success());
    let list = stdout(&cli(&tb, &["list"]));
    assert!(list.contains(&format!("testbed-{}", tb.port)) && list.contains(&tb.pid().to_string()), "{list}");
}

#[test]
fn restart_wait_reports_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("broken");
    let mut tb = Testbed::start(&["--workers", "2", "--fail-if-file", flag.to_str().unwrap()]);
    let old: BTreeSet<u32> = tb.workers().into_iter().collect();
    let out = cli(&tb, &["restart", "--wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("restart completed: 2 workers replaced"), "{}", stdout(&out));
    assert!(wait_until(Duration::from_secs(5), || tb.workers().len() == 2));
    let replaced: BTreeSet<u32> = tb.workers().into_iter().collect();
    assert!(old.is_disjoint(&replaced));

    write_file(&flag, "");
    let out = cli(&tb, &["restart", "--wait"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("failed at worker 0") && err.contains("exited before it was ready"), "{err}");
    // The workers of the first restart still serve.
    assert_eq!(tb.serving_pids(100), replaced);
}

#[test]
fn scale_up_and_down_without_losing_a_request() {
    let mut tb = Testbed::start(&["--workers", "2", "--startup-delay-ms", "10"]);
    let load = Load::start(tb.port, 2, 2, false);
    // Enough requests on each side of every change for a loss to show.
    let more_requests = |n: usize| {
        let target = load.count() + n;
        assert!(wait_until(Duration::from_secs(20), || load.count() >= target), "the load stalled");
    };
    more_requests(200);
    let out = cli(&tb, &["scale", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(wait_until(Duration::from_secs(10), || status_json(&tb)["cluster"]["active_workers"] == 4));
    assert_eq!(tb.workers().len(), 4);
    assert_eq!(listeners_held(tb.pid(), tb.port), 4);
    // The four workers serve.
    assert_eq!(tb.serving_pids(200).len(), 4);
    more_requests(300);
    let out = cli(&tb, &["scale", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(wait_until(Duration::from_secs(10), || tb.workers().len() == 1));
    more_requests(300);
    let result = load.stop();
    assert_eq!(result.failed, 0, "{:?}", &result.errors[..result.errors.len().min(10)]);
    assert!(result.ok > 500, "{}", result.ok);
    let s = status_json(&tb);
    assert_eq!(s["cluster"]["total_workers"], 1);
    assert_eq!(s["cluster"]["active_workers"], 1);
    // No socket of a removed slot remains open in the master.
    assert_eq!(listeners_held(tb.pid(), tb.port), 1);
    // SIGTTIN / SIGTTOU: one more, one fewer.
    tb.signal(Signal::TTIN);
    assert!(wait_until(Duration::from_secs(10), || status_json(&tb)["cluster"]["active_workers"] == 2));
    tb.signal(Signal::TTOU);
    assert!(wait_until(Duration::from_secs(10), || {
        let s = status_json(&tb);
        s["cluster"]["total_workers"] == 1 && s["cluster"]["active_workers"] == 1
    }));
    let out = cli(&tb, &["scale", "0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot scale to 0 workers"), "{}", stderr(&out));
}

#[test]
fn garbage_on_the_socket_disturbs_nothing() {
    let mut tb = Testbed::start(&["--workers", "2"]);
    let path = socket_of(&tb);
    let workers = tb.workers();
    let baseline = fds_of(tb.pid()).len();
    // Random bytes, then close.
    let mut seed = 0x1234_5678_9abc_def0u64;
    for _ in 0..20 {
        let mut s = UnixStream::connect(&path).unwrap();
        let bytes: Vec<u8> = (0..512)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = s.write_all(&bytes);
    }
    // A 1 MiB line: an error answer, then the master closes the connection.
    let mut big = UnixStream::connect(&path).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = big.write_all(&vec![b'x'; 1 << 20]);
    let mut answer = Vec::new();
    let _ = big.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("\"ok\":false") && text.contains("longer than"), "{text}");
    // Half a JSON object, then EOF.
    let mut half = UnixStream::connect(&path).unwrap();
    half.write_all(br#"{"v":1,"cmd":"sta"#).unwrap();
    drop(half);
    // A client that disconnects before its reply.
    let mut rude = UnixStream::connect(&path).unwrap();
    rude.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n").unwrap();
    drop(rude);
    // Malformed and unknown requests get error answers.
    assert_eq!(raw_request(&path, "{not json")["ok"], false);
    let unknown = raw_request(&path, r#"{"v":1,"cmd":"reboot"}"#);
    assert!(unknown["error"].as_str().unwrap().contains("invalid request"), "{unknown}");
    // 200 connections opened and left idle.
    let idle: Vec<UnixStream> = (0..200).map(|_| UnixStream::connect(&path).unwrap()).collect();
    let ok = raw_request(&path, r#"{"v":1,"cmd":"status"}"#);
    assert_eq!(ok["ok"], true, "{ok}");
    assert_eq!(ok["cluster"]["active_workers"], 2);
    assert!(fds_of(tb.pid()).len() <= baseline + 70, "the master bounds its control connections");
    drop(idle);
    assert!(
        wait_until(Duration::from_secs(5), || fds_of(tb.pid()).len() <= baseline),
        "fds back to the baseline {baseline}: {}",
        fds_of(tb.pid()).len()
    );
    assert_eq!(tb.workers(), workers, "no worker was disturbed");
    assert_eq!(raw_request(&path, r#"{"v":1,"cmd":"status"}"#)["ok"], true);
}

#[test]
fn another_user_is_refused() {
    let tb = Testbed::start(&["--workers", "1"]);
    let path = socket_of(&tb);
    // The CLI must be runnable by the other user: copy it to a world-readable place.
    let bin_dir = tempfile::Builder::new().prefix("ecewo-cli").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = bin_dir.path().join("ecewo-cluster");
    std::fs::copy(cli_binary(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |path: &Path| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .args(["--socket", path.to_str().unwrap(), "status"])
            .output()
            .expect("setpriv (util-linux) runs the CLI as nobody")
    };
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipped: switching to another uid needs root");
        return;
    }
    // As created: the directory (0700) and the socket (0600) keep other users out.
    let out = as_nobody(&path);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("permission denied"), "{}", stderr(&out));
    // Even with the file permissions opened, the master checks the peer's uid.
    for dir in [tb.dir.as_path(), path.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&path);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        tb.wait_log(Duration::from_secs(5), |l| l.contains("refused a connection from uid 65534")),
        "{}",
        tb.stderr()
    );
    // The owner still gets in.
    assert_eq!(raw_request(&path, r#"{"v":1,"cmd":"status"}"#)["ok"], true);
}

#[test]
fn a_second_cluster_with_the_same_name_fails_clearly() {
    let first = Testbed::start(&["--workers", "1"]);
    let sock = socket_of(&first);
    let (mut second, _rx) = Testbed::spawn(args(&["--workers", "1", "--control-socket", sock.to_str().unwrap()]));
    let st = second.wait_exit(Duration::from_secs(10)).expect("the second master gives up");
    assert!(!st.success());
    let log = second.stderr();
    assert!(log.contains("another cluster is already running with the control socket"), "{log}");
    assert!(!log.contains("on_start"), "no worker of the second cluster started: {log}");
    let (status, _) = first.get("/").unwrap();
    assert_eq!(status, 200, "the first keeps serving");
    assert_eq!(raw_request(&sock, r#"{"v":1,"cmd":"status"}"#)["ok"], true);
}

#[test]
fn stale_sockets_are_replaced_and_stop_works() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    // A socket file nobody listens on, as a killed master leaves.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let mut tb = Testbed::start(&["--workers", "1", "--control-socket", sock.to_str().unwrap()]);
    assert!(tb.stderr().contains("replacing the stale control socket"));
    let workers = tb.workers();
    let out = Command::new(cli_binary()).args(["--socket", sock.to_str().unwrap(), "stop"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let st = tb.wait_exit(Duration::from_secs(10)).expect("stopped");
    assert!(st.success());
    assert!(workers.iter().all(|&w| !alive(w)));
    assert!(!sock.exists(), "the master removes its socket");
    let out = Command::new(cli_binary()).args(["--socket", sock.to_str().unwrap(), "status"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no cluster is running at"), "{}", stderr(&out));
}

#[test]
fn signal_through_the_cli() {
    let tb = Testbed::start(&["--workers", "2"]);
    let out = cli(&tb, &["signal", "USR1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = wait_all_got_usr1(&tb, 2, Duration::from_secs(5));
    assert_eq!(seen, BTreeSet::from([0, 1]), "both workers got exactly one SIGUSR1");
    let out = cli(&tb, &["signal", "NOPE"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown signal"), "{}", stderr(&out));
}

#[test]
fn an_unusable_default_socket_location_does_not_stop_the_cluster() {
    let mut opts = args(&["--workers", "1"]);
    opts.configure = Some(Box::new(|cmd| {
        cmd.env("XDG_RUNTIME_DIR", "/proc/no-such-dir");
    }));
    let tb = Testbed::start_with(opts);
    assert_eq!(tb.get("/").unwrap().0, 200);
    assert!(tb.stderr().contains("running without a control socket"), "{}", tb.stderr());
}

#[test]
fn prometheus_metrics_describe_the_whole_cluster_from_any_worker() {
    let tb = Testbed::start(&["--workers", "2", "--respawn"]);
    let (status, text) = tb.get("/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    for line in [
        "ecewo_cluster_workers_configured 2",
        "ecewo_cluster_workers{state=\"active\"} 2",
        "ecewo_cluster_worker_up{worker=\"0\"} 1",
        "ecewo_cluster_worker_up{worker=\"1\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    assert!(text.contains("ecewo_cluster_worker_resident_memory_bytes{worker=\"1\"}"));
    // The CLI prints the same metrics.
    let out = cli(&tb, &["metrics"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = format!("ecewo_cluster_workers_configured{{cluster=\"testbed-{}\"}} 2", tb.port);
    assert!(stdout(&out).lines().any(|l| l == line), "{}", stdout(&out));
}

/// `ecewo-cluster metrics | head -0`: a reader that went away is not a panic.
#[test]
fn output_to_a_closed_pipe_is_not_a_panic() {
    let tb = Testbed::start(&["--workers", "1"]);
    let mut child = Command::new(cli_binary())
        .arg("metrics")
        .env("XDG_RUNTIME_DIR", &tb.dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(status.success(), "{status:?}: {err}");
}

#[test]
fn a_bad_option_is_a_usage_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for option in [
        &["--timeout", "0"][..],
        &["--timeout=-1"],
        &["--timeout", "nope"],
        &["--timeout", "86401"],
        &["--timeout", "1e-10"],
    ] {
        let value = option.join(" ");
        let mut cmd = Command::new(cli_binary());
        cmd.args(option).arg("status").env("XDG_RUNTIME_DIR", dir.path());
        let out = run_bounded(cmd, Duration::from_secs(10)).expect("the CLI gives up at once");
        // clap's usage error.
        assert_eq!(out.status.code(), Some(2), "{value}: {:?}", out.status);
        let err = stderr(&out);
        let first = err.lines().next().unwrap_or_default();
        assert!(first.starts_with("error: ") && first.contains("--timeout"), "{value}: {err}");
        assert!(first.contains("is not a number of seconds from 0.001 to 86400"), "{value}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(stdout(&out).is_empty());
    }
}

/// `status` and the metrics list the listeners (name, kind, address) and each TCP listener's
/// accept-queue length, read on the master's own sockets.
#[test]
fn status_and_metrics_list_the_listeners_and_their_queues() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let unix = format!("sock=unix:{}", sock.display());
    let mut tb = Testbed::start(&["--workers", "1", "--listen", "web=127.0.0.1:0", "--listen", &unix]);
    let worker = tb.workers()[0];
    // The worker stopped: connections wait in the accept queue of the master's socket.
    send_signal(worker, Signal::STOP);
    let waiting: Vec<std::net::TcpStream> =
        (0..3).map(|_| std::net::TcpStream::connect(("127.0.0.1", tb.port)).unwrap()).collect();
    let mut json = Value::Null;
    let queued = wait_until(Duration::from_secs(10), || {
        json = status_json(&tb);
        json["cluster"]["listeners"][0]["queued"] == 3
    });
    send_signal(worker, Signal::CONT);
    assert!(queued, "{json}");
    let listeners = &json["cluster"]["listeners"];
    assert_eq!(listeners[0]["name"], "web");
    assert_eq!(listeners[0]["kind"], "tcp");
    assert_eq!(listeners[0]["address"], format!("127.0.0.1:{}", tb.port));
    assert_eq!(listeners[0]["balance"], "reuseport");
    assert_eq!(listeners[0]["sockets"], 1);
    assert_eq!(listeners[1]["name"], "sock");
    assert_eq!(listeners[1]["kind"], "unix");
    assert_eq!(listeners[1]["address"], sock.display().to_string());
    assert_eq!(listeners[1]["queued"], Value::Null);
    drop(waiting);
    let table = stdout(&cli(&tb, &["status"]));
    assert!(table.contains("LISTENER") && table.contains("QUEUED"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("sock ") && l.contains("unix") && l.contains(&sock.display().to_string())),
        "{table}"
    );
    let (_, metrics) = tb.get("/metrics").unwrap();
    let web = format!("listener=\"web\",kind=\"tcp\",address=\"127.0.0.1:{}\"", tb.port);
    assert!(metrics.contains(&format!("ecewo_cluster_listener_sockets{{{web}}} 1")), "{metrics}");
    assert!(metrics.contains(&format!("ecewo_cluster_listener_queued{{{web}}} ")), "{metrics}");
}
