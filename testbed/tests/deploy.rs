//! The deployment files under `deploy/`: their static checks (`deploy/check`: the Kubernetes
//! schemas and relations, the Dockerfile, `systemd-analyze verify`), the systemd units run the
//! way systemd runs them (sockets passed by name, the notifications, reload, stop), and the
//! image's entrypoint as PID 1 of its own PID and network namespaces, stopped by its stop signal.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;

/// `deploy/check`'s exit status when a tool it needs is missing (`--install` installs it).
const MISSING: i32 = 2;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

/// Runs `deploy/check <args>` (bounded); `None`, after saying why, when it cannot run here.
fn deploy_check(args: &[&str]) -> Option<std::process::Output> {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("skipped: deploy/check needs python3");
        return None;
    }
    let mut cmd = Command::new(repo().join("deploy/check"));
    cmd.args(args).current_dir(repo());
    let out = run_bounded(cmd, Duration::from_secs(300)).expect("deploy/check finishes within 5 minutes");
    if out.status.code() == Some(MISSING) {
        eprintln!("skipped: {}", String::from_utf8_lossy(&out.stdout).trim());
        eprintln!(
            "(kubernetes-validate or systemd-analyze is missing; .ci/run installs both with `deploy/check --install`)"
        );
        return None;
    }
    Some(out)
}

fn output_of(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Every check of deploy/check passes; `systemd-analyze verify` finds the built `https` example
/// at ExecStart (the program the service unit runs).
#[test]
fn the_deployment_files_pass_deploy_check() {
    let https = example_binary("https");
    let Some(out) = deploy_check(&["--exec", https.to_str().unwrap()]) else { return };
    assert!(out.status.success(), "deploy/check failed ({:?}):\n{}", out.status, output_of(&out));
}

/// Each mistake deploy/check lists (a grace period too short, a probe on the wrong port, a
/// binary the build does not make, KillMode=control-group, ...) made in a copy of deploy/
/// fails with its own message: the checks bite.
#[test]
fn deploy_check_catches_each_mistake_it_lists() {
    let https = example_binary("https");
    let Some(out) = deploy_check(&["--self-test", "--exec", https.to_str().unwrap()]) else { return };
    assert!(out.status.success(), "deploy/check --self-test failed ({:?}):\n{}", out.status, output_of(&out));
}

/// `(section, key, value)` of a systemd unit file (comments dropped; no continuations in ours).
fn unit(path: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        assert!(!line.ends_with('\\'), "{}: continued lines are not read here", path.display());
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((key, value)) = line.split_once('=') {
            out.push((section.clone(), key.trim().to_owned(), value.trim().to_owned()));
        }
    }
    out
}

fn values<'a>(unit: &'a [(String, String, String)], section: &str, key: &str) -> Vec<&'a str> {
    unit.iter().filter(|(s, k, _)| s == section && k == key).map(|(_, _, v)| v.as_str()).collect()
}

fn value<'a>(unit: &'a [(String, String, String)], section: &str, key: &str) -> &'a str {
    values(unit, section, key).last().copied().unwrap_or_else(|| panic!("no {key}= in [{section}]"))
}

/// A systemd time span in whole seconds ("20", "20s", "1min").
fn seconds(span: &str) -> u64 {
    let digits: String = span.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().unwrap_or_else(|_| panic!("time span {span:?}"));
    match &span[digits.len()..] {
        "" | "s" | "sec" => n,
        "min" | "m" => n * 60,
        other => panic!("time span unit {other:?}"),
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1 as `cert.pem` and `key.pem` in `dir`.
fn certificate(dir: &Path) -> Vec<u8> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    ck.cert.der().to_vec()
}

/// The next datagram the master sent to the stand-in for systemd's notification socket.
fn notification(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The units under deploy/systemd, run as systemd would: each socket of the service's
/// `Sockets=` bound by `systemd-socket-activate` (on a free loopback port instead of 443 and 80)
/// and passed under its `FileDescriptorName=`, the service's `ExecStart=` with its credentials
/// (`%d`) and `Environment=`; then what the service's other settings promise: `Type=notify`
/// (READY=1), `ExecReload=` (a rolling restart: RELOADING=1, READY=1), `KillSignal=` (a
/// graceful stop within `TimeoutStopSec=`).
#[test]
fn the_systemd_units_run_as_systemd_runs_them() {
    if Command::new("systemd-socket-activate").arg("--version").output().is_err() {
        eprintln!("skipped: systemd-socket-activate is not installed (Debian package `systemd`; .ci/run installs it)");
        return;
    }
    let dir = repo().join("deploy/systemd");
    let service = unit(&dir.join("ecewo-cluster.service"));
    // The service runs the https example, installed as the unit's comment says.
    let exec: Vec<&str> = value(&service, "Service", "ExecStart").split_whitespace().collect();
    assert_eq!(exec[0], "/usr/local/bin/ecewo-https", "ExecStart runs the https example (or update this test)");
    let tmp = tempfile::tempdir().unwrap();
    let (credentials, runtime) = (tmp.path().join("credentials"), tmp.path().join("run"));
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::create_dir_all(&runtime).unwrap();
    let ca = certificate(&credentials);
    let names: Vec<&str> =
        values(&service, "Service", "LoadCredential").iter().map(|c| c.split(':').next().unwrap()).collect();
    let expand = |arg: &str| {
        if let Some(file) = arg.strip_prefix("%d/") {
            assert!(names.contains(&file), "ExecStart uses the credential {file}, which LoadCredential= does not load");
        }
        arg.replace("%d", credentials.to_str().unwrap()).replace("%t", runtime.to_str().unwrap())
    };

    // Each socket on a free port of its own, under its name, in the order of Sockets=.
    let mut args: Vec<String> = Vec::new();
    let mut sockets = Vec::new();
    for name in values(&service, "Service", "Sockets").iter().flat_map(|v| v.split_whitespace()) {
        let socket = unit(&dir.join(name));
        let fdname = value(&socket, "Socket", "FileDescriptorName").to_owned();
        assert_eq!(values(&socket, "Socket", "ListenStream").len(), 1, "{name}: one ListenStream=");
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        args.extend(["-l".to_owned(), addr.to_string()]);
        sockets.push((fdname, addr));
    }
    assert!(sockets.len() >= 2, "several named sockets");
    let fdnames: Vec<&str> = sockets.iter().map(|(n, _)| n.as_str()).collect();
    args.push(format!("--fdname={}", fdnames.join(":")));
    // systemd-socket-activate passes the program no environment but what it is told to.
    let notify = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    args.extend(["-E".to_owned(), format!("NOTIFY_SOCKET={}", notify.display())]);
    for env in values(&service, "Service", "Environment") {
        args.extend(["-E".to_owned(), expand(env)]);
    }
    args.push(example_binary("https").display().to_string());
    args.extend(exec[1..].iter().map(|a| expand(a)));
    let opts = Options {
        program: Some("systemd-socket-activate".into()),
        args,
        exact_args: true,
        ready_timeout: Duration::from_secs(60),
        ..Options::default()
    };
    let (mut tb, rx) = Testbed::spawn(opts);

    // The first connection starts the service (and waits in the socket meanwhile).
    let (https, http) = {
        let port = |name: &str| sockets.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("a socket {name}")).1;
        (port("https"), port("http"))
    };
    assert!(wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(http).is_ok()), "listening");
    let first = std::thread::spawn(move || http_get(http.port(), "/first"));
    let mut listeners = Vec::new();
    while listeners.len() < sockets.len() {
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no listeners\n{}", tb.stderr()));
        if let Some((name, addr)) = line.strip_prefix("listener ").and_then(|rest| rest.split_once(' ')) {
            listeners.push((name.to_owned(), addr.parse::<std::net::SocketAddr>().unwrap()));
        }
    }
    listeners.sort();
    let mut expected = sockets.clone();
    expected.sort();
    assert_eq!(listeners, expected, "each listener takes the socket of its name");
    let ready = notification(&sock);
    assert!(ready.starts_with("READY=1\n"), "Type=notify: {ready}\n{}", tb.stderr());
    tb.remember_workers();
    let (status, _) = first.join().unwrap().expect("the connection that started it is served");
    assert_eq!(status, 308, "plain HTTP redirects");
    let redirect = {
        let mut s = std::net::TcpStream::connect(http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.to_ascii_lowercase()
    };
    assert!(redirect.contains(&format!("location: https://127.0.0.1:{}/x", https.port())), "{redirect}");
    let hello = https_get(https.port(), &ca, "/").unwrap();
    assert!(hello.starts_with("HTTP/1.1 200") && hello.contains("Hello over TLS"), "{hello}");

    // ExecReload: a rolling restart, which systemd sees begin and end.
    let reload: Vec<&str> = value(&service, "Service", "ExecReload").split_whitespace().collect();
    assert_eq!(reload, ["/bin/kill", "-USR2", "$MAINPID"], "ExecReload (or update this test)");
    tb.signal(Signal::USR2);
    let reloading = notification(&sock);
    assert!(reloading.starts_with("RELOADING=1\n"), "{reloading}");
    let done = notification(&sock);
    assert!(done.starts_with("READY=1\nSTATUS=graceful restart completed"), "{done}\n{}", tb.stderr());
    tb.remember_workers();
    assert!(https_get(https.port(), &ca, "/").unwrap().starts_with("HTTP/1.1 200"));

    // KillSignal, then the master alone drains its workers within TimeoutStopSec.
    assert_eq!(value(&service, "Service", "KillSignal"), "SIGTERM");
    let stop = Duration::from_secs(seconds(value(&service, "Service", "TimeoutStopSec")));
    let t0 = Instant::now();
    tb.signal(Signal::TERM);
    let stopping = notification(&sock);
    assert!(stopping.starts_with("STOPPING=1"), "{stopping}");
    let status = tb.wait_exit(stop).unwrap_or_else(|| panic!("not stopped within TimeoutStopSec ({stop:?})"));
    assert!(status.success(), "{status:?}\n{}", tb.stderr());
    assert!(t0.elapsed() < stop);
}

/// The runtime stage's `(ENTRYPOINT, CMD, STOPSIGNAL)` from deploy/Dockerfile (exec forms).
fn image_command() -> (Vec<String>, Vec<String>, String) {
    let text = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let runtime = text.rsplit("\nFROM ").next().expect("a runtime stage");
    let field = |name: &str| -> Option<String> {
        runtime.lines().rev().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).map(str::to_owned))
    };
    let exec = |name: &str| -> Vec<String> {
        let json = field(name).unwrap_or_else(|| panic!("no {name} in the runtime stage"));
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{name} is not in exec form: {e}"))
    };
    (exec("ENTRYPOINT"), exec("CMD"), field("STOPSIGNAL").unwrap_or_else(|| "SIGTERM".into()))
}

/// The pod's grace period, from deploy/kubernetes/deployment.yaml.
fn grace_period() -> Duration {
    let text = std::fs::read_to_string(repo().join("deploy/kubernetes/deployment.yaml")).unwrap();
    let n = text.lines().find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:")).expect("a grace period");
    Duration::from_secs(n.trim().parse().unwrap())
}

/// Runs `f` on a thread that has joined the network namespace of process `pid`.
fn in_netns<T: Send + 'static>(pid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("its network namespace");
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&ns),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns");
        f()
    })
    .join()
    .unwrap()
}

fn get_in(pid: u32, port: u16, path: &'static str) -> std::io::Result<(u16, String)> {
    in_netns(pid, move || http_get(port, path))
}

/// The value after `flag` in `argv`, as a number.
fn flag_value(argv: &[String], flag: &str) -> Option<u64> {
    argv.iter().position(|a| a == flag).and_then(|i| argv.get(i + 1)).and_then(|v| v.parse().ok())
}

/// The image's ENTRYPOINT and CMD, as a container runtime runs them: PID 1 of a new PID
/// namespace (and a network namespace of its own, so its fixed ports meet nobody's), with no
/// init before it. It serves, starts one worker per CPU, and on the image's STOPSIGNAL (what
/// `docker stop` and the kubelet send) stops gracefully within the pod's grace period; with the
/// admin flags, its probes answer, /readyz fails at once while it keeps serving for the
/// shutdown delay.
#[test]
fn the_image_entrypoint_serves_as_pid_1_and_stops_on_its_stop_signal() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipped: new PID and network namespaces need root");
        return;
    }
    let (entrypoint, cmd, stop_signal) = image_command();
    assert_eq!(entrypoint, ["/usr/local/bin/hello"], "the image runs the hello example (or update this test)");
    let hello = example_binary("hello");
    let help = Command::new(&hello).arg("--help").output().expect("hello --help");
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let mut argv = cmd.clone();
    let admin = ["--admin", "--shutdown-delay-ms"].iter().all(|f| help.contains(f));
    if !admin {
        // Until the hello example has its admin listener and shutdown delay.
        eprintln!("note: this hello has no --admin / --shutdown-delay-ms: running the image's CMD without them");
        for flag in ["--admin", "--shutdown-delay-ms"] {
            if let Some(i) = argv.iter().position(|a| a == flag) {
                argv.drain(i..i + 2);
            }
        }
    }
    let port = flag_value(&argv, "--port").unwrap_or(3000) as u16;
    let admin_port = cmd
        .iter()
        .position(|a| a == "--admin")
        .and_then(|i| cmd.get(i + 1))
        .and_then(|a| a.rsplit(':').next()?.parse::<u16>().ok());
    let delay = Duration::from_millis(if admin { flag_value(&argv, "--shutdown-delay-ms").unwrap_or(0) } else { 0 });

    let mut args: Vec<String> = ["--pid", "--fork", "--kill-child", "--mount-proc", "--net", "sh", "-c"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    // The shell brings the namespace's loopback up and replaces itself with the master: PID 1.
    args.push("ip link set lo up && exec \"$0\" \"$@\"".to_owned());
    args.push(hello.display().to_string());
    args.extend(argv);
    let opts = Options { program: Some("unshare".into()), args, exact_args: true, ..Options::default() };
    let (mut tb, _rx) = Testbed::spawn(opts);
    let mut master = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            master = children_of(tb.pid()).first().copied().unwrap_or(0);
            master != 0 && std::fs::read_link(format!("/proc/{master}/exe")).is_ok_and(|e| e == hello)
        }),
        "the master runs\n{}",
        tb.stderr()
    );
    let status = std::fs::read_to_string(format!("/proc/{master}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(nspid.split_whitespace().last() == Some("1"), "the master is PID 1 in its namespace: {nspid}");

    assert!(
        wait_until(Duration::from_secs(30), || get_in(master, port, "/")
            .is_ok_and(|(s, b)| s == 200 && b.starts_with("Hello from worker"))),
        "it serves on port {port}\n{}",
        tb.stderr()
    );
    // `--workers 0`: one worker per CPU (a pod's CPU limit sets the count the same way).
    assert!(
        wait_until(Duration::from_secs(10), || children_of(master).len() == ecewo_cluster::cpus()),
        "{} workers for {} CPUs",
        children_of(master).len(),
        ecewo_cluster::cpus()
    );
    if admin {
        let admin_port = admin_port.expect("--admin HOST:PORT");
        for probe in ["/startupz", "/readyz", "/livez"] {
            assert!(
                wait_until(Duration::from_secs(10), || get_in(master, admin_port, probe).is_ok_and(|(s, _)| s == 200)),
                "{probe} answers 200 on the admin port\n{}",
                tb.stderr()
            );
        }
        let (status, metrics) = get_in(master, admin_port, "/metrics").unwrap();
        assert_eq!(status, 200, "{metrics}");
    }

    // The stop signal, as the runtime sends it to PID 1 from outside the namespace.
    let signal = match stop_signal.as_str() {
        "SIGTERM" | "TERM" | "15" => Signal::TERM,
        other => panic!("STOPSIGNAL {other} (or update this test)"),
    };
    let t0 = Instant::now();
    send_signal(master, signal);
    if admin && !delay.is_zero() {
        let admin_port = admin_port.unwrap();
        assert!(
            wait_until(Duration::from_secs(1), || get_in(master, admin_port, "/readyz")
                .map_or(true, |(s, _)| s != 200)),
            "/readyz fails at once after SIGTERM"
        );
        // Still serving within the delay: connections the endpoint removal has not reached yet.
        while t0.elapsed() + Duration::from_millis(500) < delay {
            let (status, body) = get_in(master, port, "/").expect("served during the shutdown delay");
            assert_eq!(status, 200, "{body}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let grace = grace_period();
    let status = tb.wait_exit(grace).unwrap_or_else(|| panic!("not stopped within the grace period ({grace:?})"));
    assert!(status.success(), "{status:?}\n{}", tb.stderr());
    assert!(t0.elapsed() >= delay, "it served the whole shutdown delay ({:?} of {delay:?})", t0.elapsed());
}
