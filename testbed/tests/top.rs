//! Integration tests of `ecewo-cluster top` (issue 15) over real processes, in a real terminal
//! that a private tmux server gives it: the rows show the cluster's real pids; keys restart,
//! scale and the view shows it; a worker killed with SIGKILL is shown respawned; the view
//! re-lays itself out when the terminal shrinks; quitting (and SIGTERM) restores the terminal;
//! and the view follows the cluster through an upgrade of the master and a stop and start under
//! the same name.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;

/// A private tmux server (its socket in its own directory) with one session running `sh`.
/// Dropping it ends what runs in the pane and the server, by pid, also when the test failed.
struct Tmux {
    socket: PathBuf,
    _dir: tempfile::TempDir,
    server: u32,
    shell: u32,
}

const SESSION: &str = "top";

impl Tmux {
    /// A `width` × `height` terminal whose shell has `XDG_RUNTIME_DIR=runtime` (the test's
    /// socket directory).
    fn start(width: u16, height: u16, runtime: &Path) -> Tmux {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tmux.sock");
        let (w, h) = (width.to_string(), height.to_string());
        let env = format!("XDG_RUNTIME_DIR={}", runtime.display());
        let mut cmd = Command::new("tmux");
        cmd.arg("-S").arg(&socket).args(["-f", "/dev/null", "new-session", "-d", "-s", SESSION, "-x", &w, "-y", &h]);
        cmd.args(["-e", &env, "-e", "PS1=$ ", "sh"]).env_remove("TMUX");
        let out = run(cmd);
        assert!(out.status.success(), "tmux new-session: {}", text(&out.stderr));
        let mut tmux = Tmux { socket, _dir: dir, server: 0, shell: 0 };
        tmux.server = tmux.display("#{pid}").parse().expect("the server's pid");
        tmux.shell = tmux.display("#{pane_pid}").parse().expect("the pane's pid");
        tmux
    }

    fn cmd(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("tmux");
        cmd.arg("-S").arg(&self.socket).args(args);
        run(cmd)
    }

    fn display(&self, format: &str) -> String {
        let out = self.cmd(&["display-message", "-p", "-t", SESSION, format]);
        assert!(out.status.success(), "tmux display-message: {}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    }

    /// Types `line` into the shell and presses Enter.
    fn type_line(&self, line: &str) {
        assert!(self.cmd(&["send-keys", "-t", SESSION, "-l", line]).status.success());
        self.keys(&["Enter"]);
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", SESSION];
        args.extend(keys);
        assert!(self.cmd(&args).status.success(), "send-keys {keys:?}");
    }

    /// What the terminal shows now, line by line.
    fn screen(&self) -> String {
        text(&self.cmd(&["capture-pane", "-p", "-t", SESSION]).stdout)
    }

    /// Waits (up to 30 s, looking every 50 ms: each look runs a tmux client) until the screen
    /// satisfies `cond`; panics with `what` and the last screen.
    fn wait_screen(&self, what: &str, mut cond: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let last = self.screen();
            if cond(&last) {
                return last;
            }
            if Instant::now() >= deadline {
                panic!("the view never showed {what} within 30 s; the screen:\n{last}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `ecewo-cluster` processes the shell started (the view).
    fn views(&self) -> Vec<u32> {
        children_of(self.shell).into_iter().filter(|&p| comm(p) == "ecewo-cluster").collect()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let views = self.views();
        let _ = self.cmd(&["kill-server"]);
        for pid in views {
            if comm(pid) == "ecewo-cluster" {
                send_signal(pid, Signal::KILL);
            }
        }
        for (pid, name) in [(self.shell, "sh"), (self.server, "tmux")] {
            if alive(pid) && comm(pid).starts_with(name) {
                send_signal(pid, Signal::KILL);
            }
        }
    }
}

/// Runs a short command (tmux's, the CLI's), bounded in time.
fn run(cmd: Command) -> Output {
    let program = format!("{:?}", cmd.get_program());
    run_bounded(cmd, Duration::from_secs(60)).unwrap_or_else(|| panic!("{program} did not end within 60 s"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_owned()
}

fn cli(tb: &Testbed, args: &[&str]) -> Output {
    let mut cmd = Command::new(cli_binary());
    cmd.args(args).env("XDG_RUNTIME_DIR", &tb.dir);
    run(cmd)
}

fn status_json(tb: &Testbed) -> serde_json::Value {
    let out = cli(tb, &["status", "--json"]);
    assert!(out.status.success(), "status: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The worker rows on `screen`: (slot, pid, status) of each line that starts (after the
/// selection marker) with a slot number, a pid or `-`, and a status.
fn rows(screen: &str) -> Vec<(usize, Option<u32>, String)> {
    screen
        .lines()
        .filter_map(|l| {
            let mut words = l.trim_start_matches('>').split_whitespace();
            let slot = words.next()?.parse().ok()?;
            let pid = match words.next()? {
                "-" => None,
                p => Some(p.parse().ok()?),
            };
            let status = words.next()?;
            status.chars().all(|c| c.is_ascii_lowercase()).then(|| (slot, pid, status.to_owned()))
        })
        .collect()
}

/// Whether `screen` shows exactly `pids` as the active workers.
fn shows_exactly(screen: &str, pids: &[u32]) -> bool {
    let mut active: Vec<u32> = rows(screen).into_iter().filter(|r| r.2 == "active").filter_map(|r| r.1).collect();
    let mut want = pids.to_vec();
    active.sort();
    want.sort();
    active == want
}

/// The command line that runs the view in the pane and says how it ended.
fn view_command(args: &str) -> String {
    format!("'{}' top {args}; echo \"top exited $?\"", cli_binary().display())
}

#[test]
fn top_shows_the_real_workers_and_its_keys_restart_scale_and_quit() {
    let mut tb = Testbed::start(&["--workers", "2", "--respawn", "--startup-delay-ms", "10"]);
    let master = tb.pid();
    let first = tb.workers();
    assert_eq!(first.len(), 2);
    let tmux = Tmux::start(120, 40, &tb.dir);
    tmux.type_line(&view_command(&format!("--pid {master}")));
    let screen = tmux.wait_screen("the two workers", |s| shows_exactly(s, &first));
    assert!(screen.contains(&format!("master pid {master}")), "{screen}");
    assert!(screen.contains("INFLIGHT") && screen.contains("REQ/S"), "every column at 120 columns:\n{screen}");
    assert_eq!(tmux.display("#{alternate_on}"), "1", "the view draws on the alternate screen");

    // r, then y: a rolling restart; the view shows the new workers.
    tmux.keys(&["r"]);
    tmux.wait_screen("the restart's confirmation", |s| s.contains("Restart all 2 workers"));
    tmux.keys(&["y"]);
    let mut replaced = Vec::new();
    tmux.wait_screen("two new workers after the restart", |s| {
        replaced = tb.workers();
        replaced.len() == 2 && replaced.iter().all(|p| !first.contains(p)) && shows_exactly(s, &replaced)
    });
    assert!(
        wait_until(Duration::from_secs(20), || {
            let s = status_json(&tb);
            s["cluster"]["last_restart"]["result"] == "completed" && s["cluster"]["total_restarts"] == 2
        }),
        "the cluster says the restart completed: {}",
        status_json(&tb)
    );
    tmux.wait_screen("the restart among the events", |s| s.contains("rolling restart completed: 2 workers replaced"));

    // +: one worker more, a new row.
    tmux.keys(&["+"]);
    let mut three = Vec::new();
    tmux.wait_screen("a third worker", |s| {
        three = tb.workers();
        three.len() == 3 && shows_exactly(s, &three)
    });
    assert_eq!(status_json(&tb)["cluster"]["total_workers"], 3);

    // kill -9 of slot 1's worker: the view shows the slot respawned with a new pid.
    let slot1 = status_json(&tb)["workers"][1]["pid"].as_u64().unwrap() as u32;
    send_signal(slot1, Signal::KILL);
    let mut respawned = 0;
    let screen = tmux.wait_screen("slot 1 respawned", |s| {
        let json = status_json(&tb);
        respawned = json["workers"][1]["pid"].as_u64().unwrap_or(0) as u32;
        tb.remember_workers();
        json["workers"][1]["status"] == "active"
            && respawned != slot1
            && rows(s).contains(&(1, Some(respawned), "active".into()))
    });
    assert!(rows(&screen).iter().all(|r| r.1 != Some(slot1)), "the killed pid is gone:\n{screen}");
    assert!(
        screen.contains(&format!("pid {slot1}")) && screen.contains("SIGKILL"),
        "the kill among the events:\n{screen}"
    );

    // A narrower, shorter terminal: the view lays itself out again, dropping columns.
    assert!(tmux.cmd(&["resize-window", "-t", SESSION, "-x", "60", "-y", "20"]).status.success());
    let now = tb.workers();
    let screen = tmux.wait_screen("the workers at 60 columns, without the INFLIGHT column", |s| {
        !s.contains("INFLIGHT") && s.contains("PID") && shows_exactly(s, &now)
    });
    assert_eq!(tmux.display("#{window_width}x#{window_height}"), "60x20");
    let lines: Vec<&str> = screen.lines().collect();
    assert!(lines.len() <= 20, "{} lines:\n{screen}", lines.len());
    for line in &lines {
        assert!(line.chars().count() <= 60, "a line wider than the terminal: {line:?}");
    }
    assert!(lines[0].starts_with(&format!("testbed-{}", tb.port)), "the header is the first line:\n{screen}");
    let header = lines.iter().position(|l| l.contains("PID")).expect("the table's header");
    for (i, &pid) in now.iter().enumerate() {
        let at = lines.iter().position(|l| rows(l).iter().any(|r| r.1 == Some(pid))).unwrap();
        assert!(at > header && at <= header + now.len(), "row {i} (pid {pid}) under the header:\n{screen}");
    }

    // q: the view ends with 0 and the terminal is the shell's again.
    tmux.keys(&["q"]);
    let screen = tmux.wait_screen("the shell after quitting", |s| s.contains("top exited 0"));
    assert_eq!(tmux.display("#{alternate_on}"), "0", "the alternate screen was left");
    assert_eq!(tmux.display("#{cursor_flag}"), "1", "the cursor is shown");
    assert!(!screen.contains("PID"), "the normal screen has no table:\n{screen}");
    assert!(wait_until(Duration::from_secs(5), || tmux.views().is_empty()), "the view exited");
}

#[test]
fn top_follows_the_cluster_through_an_upgrade_and_a_restart_under_the_same_name() {
    let mut tb = Testbed::start(&["--workers", "2", "--startup-delay-ms", "10"]);
    let (old, port) = (tb.pid(), tb.port);
    let old_workers = tb.workers();
    let mut masters = NewMasters::default();
    let tmux = Tmux::start(120, 40, &tb.dir);
    tmux.type_line(&view_command(&format!("--name testbed-{port} --timeout 1")));
    tmux.wait_screen("the first master's workers", |s| shows_exactly(s, &old_workers));

    // An upgrade: a new master takes over the same socket; the view follows.
    let out = cli(&tb, &["upgrade", "--wait", "--pid", &old.to_string()]);
    assert!(out.status.success(), "upgrade: {}{}\n{}", text(&out.stdout), text(&out.stderr), tb.stderr());
    let new: u32 = status_json(&tb)["master"]["pid"].as_u64().unwrap() as u32;
    masters.watch(new);
    assert_ne!(new, old);
    let mut new_workers = Vec::new();
    let screen = tmux.wait_screen("the new master and its workers", |s| {
        new_workers = children_of(new);
        s.contains(&format!("master pid {new}")) && new_workers.len() == 2 && shows_exactly(s, &new_workers)
    });
    assert!(screen.contains("generation 1"), "{screen}");
    // The new master's own history, in the events panel.
    assert!(screen.contains("took over from the old master"), "{screen}");

    // Stopped: the view says it is reconnecting, and keeps the last answer on screen.
    let out = cli(&tb, &["stop", "--pid", &new.to_string()]);
    assert!(out.status.success(), "stop: {}", text(&out.stderr));
    assert!(wait_until(Duration::from_secs(30), || !alive(new) && !alive(old)), "both masters exited");
    tmux.wait_screen("reconnecting", |s| s.contains("reconnecting…") && s.contains("(last answer)"));

    // A new cluster of the same name (the same port, the same socket directory): followed.
    let dir = tb.dir.clone();
    let mut opts = args(&["--port", &port.to_string(), "--workers", "2", "--startup-delay-ms", "10"]);
    opts.configure = Some(Box::new(move |cmd: &mut Command| {
        cmd.env("XDG_RUNTIME_DIR", &dir);
    }));
    let mut again = Testbed::start_with(opts);
    let third = again.pid();
    let third_workers = again.workers();
    let screen = tmux.wait_screen("the restarted cluster", |s| {
        s.contains(&format!("master pid {third}")) && !s.contains("reconnecting") && shows_exactly(s, &third_workers)
    });
    // The new master's history, from its beginning: its workers started.
    assert!(third_workers.iter().all(|p| screen.contains(&format!("pid {p}: started"))), "{screen}");

    // SIGTERM: the view restores the terminal too, and ends with 128 + 15.
    let views = tmux.views();
    assert_eq!(views.len(), 1, "{views:?}");
    send_signal(views[0], Signal::TERM);
    tmux.wait_screen("the shell after SIGTERM", |s| s.contains("top exited 143"));
    assert_eq!(tmux.display("#{alternate_on}"), "0", "the alternate screen was left");
    assert_eq!(tmux.display("#{cursor_flag}"), "1", "the cursor is shown");
}

#[test]
fn top_without_a_terminal_says_to_use_status() {
    let tb = Testbed::start(&["--workers", "1"]);
    let out = cli(&tb, &["top", "--pid", &tb.pid().to_string()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("needs a terminal") && err.contains("ecewo-cluster status"), "{err}");
    assert_eq!(err.lines().count(), 1, "one sentence: {err}");
    assert!(out.stdout.is_empty());
}
