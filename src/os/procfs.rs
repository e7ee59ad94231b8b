//! Readings from `/proc` and the cgroup file system: a process's memory and CPU time, this
//! process's thread count, how much memory this process's cgroup may still take, and where a
//! (presumably hung) process is.
//!
//! Every reading is a plain file read: none blocks, none panics, and a process that is gone (or
//! a file that is unreadable) gives `None` ([`diagnose`] says so in its line). The parsing is done by pure functions of the file's
//! text, so that the tests can feed them fixtures.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::stats::{ClusterStats, WorkerStats};

/// Reads what `/proc` says of `pid`: resident memory in bytes and CPU time (user + system).
/// One file (`/proc/PID/stat`, which has both), read into a buffer on the stack: a `status`
/// or `metrics` answer reads it once per worker.
pub(crate) fn proc_usage(pid: u32) -> Option<(u64, Duration)> {
    use std::io::Read;
    // The file is one line of about 300 bytes; the command name in it is at most 64.
    let mut buf = [0u8; 1024];
    let mut file = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    let stat = std::str::from_utf8(&buf[..len]).ok()?;
    let (resident, ticks) = stat_usage(stat)?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    let page = rustix::param::page_size() as u64;
    Some((resident.saturating_mul(page), Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / hz)))
}

/// The resident pages (field 24, `rss`: what `statm` gives as its second field) and the CPU
/// ticks (fields 14 and 15, `utime` + `stime`) in the text of `/proc/PID/stat`.
fn stat_usage(stat: &str) -> Option<(u64, u64)> {
    // Fields after the command name (which may contain spaces), from field 3 on.
    let mut rest = stat_fields_after_comm(stat)?.split_whitespace().skip(11);
    let (utime, stime): (u64, u64) = (rest.next()?.parse().ok()?, rest.next()?.parse().ok()?);
    // Field 24 is 9 fields after field 15.
    let rss: i64 = rest.nth(8)?.parse().ok()?;
    Some((u64::try_from(rss).unwrap_or(0), utime + stime))
}

/// When process `pid` started (field 22 of `/proc/PID/stat`: clock ticks since boot), if it
/// runs: with the pid, it names one process, never one that got the pid again later. A process
/// that has exited and is not reaped yet (a zombie) has none: it is gone.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields = stat_fields_after_comm(&stat)?;
    if matches!(stat_state(&stat), Some('Z' | 'X' | 'x')) {
        return None;
    }
    fields.split_whitespace().nth(19)?.parse().ok()
}

/// How many threads this process has (the `Threads:` line of `/proc/self/status`), if `/proc`
/// says.
pub(crate) fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok())
}

/// Fills in the resource figures of running workers, and the cluster's totals.
pub(crate) fn add_usage(cluster: &mut ClusterStats, workers: &mut [WorkerStats]) {
    (cluster.memory_limit_bytes, cluster.memory_current_bytes) = cgroup_memory();
    cluster.total_rss_bytes = 0;
    cluster.total_cpu_time = Duration::ZERO;
    for w in workers {
        if let Some((rss, cpu)) = w.pid.and_then(proc_usage) {
            w.rss_bytes = Some(rss);
            w.cpu_time = Some(cpu);
            cluster.total_rss_bytes += rss;
            cluster.total_cpu_time += cpu;
        }
    }
}

/// The text of `/proc/PID/stat` after the command name: from field 3 (the state) on. The
/// command name (field 2, in parentheses) may itself contain spaces and parentheses, so the
/// split is at the last `)`.
fn stat_fields_after_comm(stat: &str) -> Option<&str> {
    Some(stat.rsplit_once(')')?.1)
}

// ---------------------------------------------------------------------------------------------
// Memory

/// Which measure of a process's memory [`memory`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MemoryKind {
    /// Resident set size: every page the process has in memory, shared ones counted in full
    /// (`/proc/PID/statm`, cheap to read).
    Rss,
    /// Proportional set size: each shared page divided by the number of processes sharing it
    /// (`/proc/PID/smaps_rollup`). Workers share the program's file pages and their copy-on-write
    /// pages from the master, so their PSS adds up where their RSS would count them N times.
    /// Costlier to read than RSS: the kernel walks the process's page tables.
    Pss,
}

/// The memory of process `pid` in bytes, measured as `kind` says; `None` when the process is
/// gone or the file is unreadable (or not as expected).
pub(crate) fn memory(pid: u32, kind: MemoryKind) -> Option<u64> {
    match kind {
        MemoryKind::Rss => {
            let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
            statm_resident_pages(&statm)?.checked_mul(rustix::param::page_size() as u64)
        }
        MemoryKind::Pss => {
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
            smaps_rollup_pss(&rollup)
        }
    }
}

/// The resident pages in the text of `/proc/PID/statm` (its second field).
fn statm_resident_pages(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// The `Pss:` line of `/proc/PID/smaps_rollup`, in bytes (the file gives kB). Only the line
/// named exactly `Pss` counts, not `Pss_Anon`, `Pss_Dirty` and the like.
fn smaps_rollup_pss(rollup: &str) -> Option<u64> {
    let line = rollup.lines().find_map(|l| l.strip_prefix("Pss:"))?;
    let kib: u64 = line.split_whitespace().next()?.parse().ok()?;
    kib.checked_mul(1024)
}

// ---------------------------------------------------------------------------------------------
// The cgroup's memory limit

/// Where the cgroup v2 hierarchy is mounted.
const CGROUP2_ROOT: &str = "/sys/fs/cgroup";
/// Where the cgroup v1 `memory` controller is mounted.
const CGROUP1_MEMORY_ROOT: &str = "/sys/fs/cgroup/memory";
/// A cgroup v1 limit this high means none: "unlimited" is written as the largest page-aligned
/// signed 64-bit value (`9223372036854771712`).
const CGROUP1_NO_LIMIT: u64 = 1 << 60;

/// How many bytes this process's cgroup may still grow before it reaches its memory limit: the
/// smallest `limit − usage` of its cgroup and of every parent cgroup (a parent's limit bounds its
/// whole subtree), saturating at 0. `None` when no limit applies or none can be read.
///
/// cgroup v2: the `0::/path` line of `/proc/self/cgroup`, then `memory.max` (`max`: no limit)
/// minus `memory.current` under `/sys/fs/cgroup/path` and each of its parents. cgroup v1 (or a
/// hybrid system, whose `memory` controller is v1): the line naming the `memory` controller, then
/// `memory.limit_in_bytes` (≥ 2^60: no limit) minus `memory.usage_in_bytes` under
/// `/sys/fs/cgroup/memory/path` and its parents. Walking up to the mount point's root also finds
/// a container's own cgroup when it is mounted there while `/proc/self/cgroup` names a host path.
pub(crate) fn cgroup_memory_headroom() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    headroom_from(&cgroup, |path| std::fs::read_to_string(path).ok())
}

/// The memory limit that applies to this process's cgroup (the tightest of it and its parents)
/// and that cgroup's usage, in bytes: `(limit, usage)`, each `None` when unknown (no limit, or
/// no readable cgroup memory files). cgroup v2 first, then v1, as
/// [`cgroup_memory_headroom`] reads them.
pub(crate) fn cgroup_memory() -> (Option<u64>, Option<u64>) {
    let Ok(cgroup) = std::fs::read_to_string("/proc/self/cgroup") else { return (None, None) };
    memory_from(&cgroup, |path| std::fs::read_to_string(path).ok())
}

/// [`cgroup_memory`] with its file reads done by `read`.
fn memory_from(cgroup: &str, read: impl Fn(&Path) -> Option<String>) -> (Option<u64>, Option<u64>) {
    let levels =
        |root: &str, path: Option<&str>, limit_file: &str, usage_file: &str, parse: fn(&str) -> Option<Limit>| {
            let dirs = path.map(|p| cgroup_dirs(root, p)).unwrap_or_default();
            let usage = dirs.first().and_then(|d| read(&d.join(usage_file))).and_then(|u| u.trim().parse::<u64>().ok());
            let limit = dirs
                .iter()
                .filter_map(|d| match parse(&read(&d.join(limit_file))?)? {
                    Limit::Bytes(n) => Some(n),
                    Limit::None => None,
                })
                .min();
            (limit, usage)
        };
    let v2 = levels(CGROUP2_ROOT, cgroup_v2_path(cgroup), "memory.max", "memory.current", parse_v2_limit);
    if v2 != (None, None) {
        return v2;
    }
    levels(
        CGROUP1_MEMORY_ROOT,
        cgroup_v1_memory_path(cgroup),
        "memory.limit_in_bytes",
        "memory.usage_in_bytes",
        parse_v1_limit,
    )
}

/// [`cgroup_memory_headroom`] with its file reads done by `read` (a fake file system in tests):
/// `cgroup` is the text of `/proc/self/cgroup`.
fn headroom_from(cgroup: &str, read: impl Fn(&Path) -> Option<String>) -> Option<u64> {
    let v2 = cgroup_v2_path(cgroup)
        .into_iter()
        .flat_map(|path| cgroup_dirs(CGROUP2_ROOT, path))
        .filter_map(|dir| room_in(&dir, &read, "memory.max", "memory.current", "inactive_file", parse_v2_limit));
    let v1 = cgroup_v1_memory_path(cgroup)
        .into_iter()
        .flat_map(|path| cgroup_dirs(CGROUP1_MEMORY_ROOT, path))
        .filter_map(|dir| {
            room_in(
                &dir,
                &read,
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
                parse_v1_limit,
            )
        });
    v2.chain(v1).min()
}

/// The headroom in one cgroup directory `dir`: its limit file (parsed by `parse`) minus its
/// usage file, less the page cache the kernel can reclaim at once (the `inactive` line of
/// `memory.stat`: usage in a container routinely sits at the limit, most of it cache);
/// `None` when it has no limit or either file is unreadable.
fn room_in(
    dir: &Path,
    read: impl Fn(&Path) -> Option<String>,
    limit_file: &str,
    usage_file: &str,
    inactive: &str,
    parse: fn(&str) -> Option<Limit>,
) -> Option<u64> {
    let limit = parse(&read(&dir.join(limit_file))?)?;
    let usage: u64 = read(&dir.join(usage_file))?.trim().parse().ok()?;
    let reclaimable = read(&dir.join("memory.stat")).and_then(|stat| stat_value(&stat, inactive)).unwrap_or(0);
    room_under(limit, usage.saturating_sub(reclaimable))
}

/// The value of the `name value` line of a cgroup `memory.stat`.
fn stat_value(stat: &str, name: &str) -> Option<u64> {
    stat.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A cgroup memory limit as read from its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    /// No limit.
    None,
    /// At most this many bytes.
    Bytes(u64),
}

/// What remains under `limit` with `usage` bytes in use (`None`: no limit), saturating at 0.
fn room_under(limit: Limit, usage: u64) -> Option<u64> {
    match limit {
        Limit::None => None,
        Limit::Bytes(max) => Some(max.saturating_sub(usage)),
    }
}

/// The path of this process's cgroup v2 (the `0::/path` line of `/proc/self/cgroup`).
fn cgroup_v2_path(cgroup: &str) -> Option<&str> {
    cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The path of this process's cgroup v1 `memory` controller (the `N:controllers:/path` line of
/// `/proc/self/cgroup` whose comma-separated controllers include `memory`).
fn cgroup_v1_memory_path(cgroup: &str) -> Option<&str> {
    cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == "memory").then_some(path)
    })
}

/// The directories of the cgroup `path` and of each of its parents up to the hierarchy's root,
/// under the mount point `root`, the cgroup's own first. `..` and `.` components are ignored
/// (they cannot come from the kernel, and must not lead out of `root`).
fn cgroup_dirs(root: &str, path: &str) -> Vec<PathBuf> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != "." && *p != "..").collect();
    (0..=parts.len()).rev().map(|n| parts[..n].iter().fold(PathBuf::from(root), |dir, p| dir.join(p))).collect()
}

/// `memory.max` of cgroup v2: a number of bytes, or `max`.
fn parse_v2_limit(text: &str) -> Option<Limit> {
    match text.trim() {
        "max" => Some(Limit::None),
        n => n.parse().ok().map(Limit::Bytes),
    }
}

/// `memory.limit_in_bytes` of cgroup v1: a number of bytes, where 2^60 or more means none.
fn parse_v1_limit(text: &str) -> Option<Limit> {
    let n: u64 = text.trim().parse().ok()?;
    Some(if n >= CGROUP1_NO_LIMIT { Limit::None } else { Limit::Bytes(n) })
}

// ---------------------------------------------------------------------------------------------
// Where a process is

/// At most this many threads are described by [`diagnose`].
const DIAGNOSE_THREADS: usize = 64;

/// One line for the log saying where process `pid` is, for a process that seems hung: its
/// state, the kernel function it sleeps in (`wchan`), the system call it is in, and for each of
/// its first 64 threads its id, name, state and `wchan`. For example:
///
/// ```text
/// pid 1234: state S (sleeping) wchan do_epoll_wait syscall 232; 2 threads: 1234 testbed S do_epoll_wait, 1235 ecewo-channel S unix_stream_read_generic
/// ```
///
/// `syscall running` means the process is on a CPU (or runnable), `syscall -1` that it is
/// blocked in the kernel outside any system call; the file is readable only with ptrace access
/// to the process, else the line says `syscall unreadable`. Missing parts say `?`; a process that
/// is gone says so. Plain reads of `/proc` only: it never blocks and never panics.
pub(crate) fn diagnose(pid: u32) -> String {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let read = |path: &Path| std::fs::read(path).ok().map(|b| String::from_utf8_lossy(&b).into_owned());
    let Some(stat) = read(&proc_dir.join("stat")) else {
        return format!("pid {pid}: gone (no /proc/{pid}/stat)");
    };
    let tids: Option<Vec<u32>> = std::fs::read_dir(proc_dir.join("task")).ok().map(|dir| {
        let mut tids: Vec<u32> = dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
        // The main thread (tid = pid) first, then the others by tid: thread ids wrap around
        // at pid_max like pids, so a later thread may have a smaller tid than the main one.
        tids.sort_unstable_by_key(|&t| (t != pid, t));
        tids
    });
    let total = tids.as_ref().map(Vec::len);
    let threads = tids
        .unwrap_or_default()
        .into_iter()
        .take(DIAGNOSE_THREADS)
        .map(|tid| {
            let task = proc_dir.join("task").join(tid.to_string());
            ThreadView {
                tid,
                comm: read(&task.join("comm")),
                state: read(&task.join("stat")).as_deref().and_then(stat_state),
                wchan: read(&task.join("wchan")),
            }
        })
        .collect();
    let view = ProcessView {
        pid,
        state: stat_state(&stat),
        wchan: read(&proc_dir.join("wchan")),
        syscall: read(&proc_dir.join("syscall")),
        threads,
        total_threads: total,
    };
    render_diagnosis(&view)
}

/// What [`diagnose`] read of a process: raw file texts, `None` where a file was unreadable.
struct ProcessView {
    pid: u32,
    state: Option<char>,
    wchan: Option<String>,
    syscall: Option<String>,
    /// The first threads (at most [`DIAGNOSE_THREADS`]).
    threads: Vec<ThreadView>,
    /// How many threads `/proc/PID/task` listed (`None`: unreadable).
    total_threads: Option<usize>,
}

/// What [`diagnose`] read of one thread.
struct ThreadView {
    tid: u32,
    comm: Option<String>,
    state: Option<char>,
    wchan: Option<String>,
}

/// The state letter of a `/proc/PID/stat` text (field 3, right after the command name).
fn stat_state(stat: &str) -> Option<char> {
    stat_fields_after_comm(stat)?.split_whitespace().next()?.chars().next()
}

/// What a state letter of `/proc/PID/stat` means.
fn state_name(state: char) -> &'static str {
    match state {
        'R' => "running",
        'S' => "sleeping",
        'D' => "uninterruptible",
        'T' => "stopped",
        't' => "traced",
        'Z' => "zombie",
        'X' => "dead",
        'I' => "idle",
        'P' => "parked",
        'W' => "waking",
        'K' => "wakekill",
        _ => "unknown",
    }
}

/// A `wchan` text as one word: `-` for `0` or empty (running, or hidden), `?` when unreadable.
fn wchan_word(wchan: Option<&str>) -> String {
    match wchan.map(str::trim) {
        None => "?".into(),
        Some("" | "0") => "-".into(),
        Some(w) => clean(w),
    }
}

/// The system call of a `/proc/PID/syscall` text: its number (first field), `running`, or
/// `-1` (blocked outside a system call); `unreadable` when the file could not be read.
fn syscall_word(syscall: Option<&str>) -> String {
    match syscall.and_then(|s| s.split_whitespace().next()) {
        None => "unreadable".into(),
        Some(first) => clean(first),
    }
}

/// `text` made safe for one log line: control characters (a thread can name itself with a
/// newline) become `?`, and a very long text is cut.
fn clean(text: &str) -> String {
    text.chars().take(64).map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// The line of [`diagnose`].
fn render_diagnosis(p: &ProcessView) -> String {
    use std::fmt::Write;
    let mut out = format!("pid {}: state ", p.pid);
    match p.state {
        Some(s) => {
            let _ = write!(out, "{} ({})", clean(&s.to_string()), state_name(s));
        }
        None => out.push('?'),
    }
    let _ = write!(out, " wchan {} syscall {}; ", wchan_word(p.wchan.as_deref()), syscall_word(p.syscall.as_deref()));
    let Some(total) = p.total_threads else {
        out.push_str("threads unreadable");
        return out;
    };
    let _ = write!(out, "{total} thread{}", if total == 1 { "" } else { "s" });
    for (i, t) in p.threads.iter().enumerate() {
        out.push_str(if i == 0 { ": " } else { ", " });
        let comm = t.comm.as_deref().map(|c| clean(c.trim_end_matches('\n'))).unwrap_or_else(|| "?".into());
        let state = t.state.map(|s| clean(&s.to_string())).unwrap_or_else(|| "?".into());
        let _ = write!(out, "{} {} {} {}", t.tid, comm, state, wchan_word(t.wchan.as_deref()));
    }
    let more = total.saturating_sub(p.threads.len());
    if more > 0 {
        let _ = write!(out, " (and {more} more)");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn the_cgroups_limit_is_the_tightest_of_its_parents_and_its_usage_its_own() {
        let files = [
            ("/sys/fs/cgroup/a/b/memory.max", "max\n"),
            ("/sys/fs/cgroup/a/b/memory.current", "700\n"),
            ("/sys/fs/cgroup/a/memory.max", "1000\n"),
            ("/sys/fs/cgroup/a/memory.current", "900\n"),
        ];
        let read = |p: &Path| files.iter().find(|(f, _)| Path::new(f) == p).map(|(_, t)| t.to_string());
        assert_eq!(memory_from("0::/a/b\n", read), (Some(1000), Some(700)));
        assert_eq!(memory_from("0::/x\n", |_: &Path| None), (None, None));
        let (_, usage) = cgroup_memory();
        let _ = usage; // this machine may or may not have readable cgroup files; it must not panic
    }

    #[test]
    fn reclaimable_cache_is_not_counted_as_used() {
        let stat = "anon 100\nfile 900\ninactive_file 600\nactive_file 300\n";
        assert_eq!(stat_value(stat, "inactive_file"), Some(600));
        assert_eq!(stat_value(stat, "file"), Some(900), "the whole name only");
        let files = [
            ("/sys/fs/cgroup/app/memory.max", "1000\n"),
            ("/sys/fs/cgroup/app/memory.current", "1000\n"),
            ("/sys/fs/cgroup/app/memory.stat", stat),
        ];
        let read = |p: &Path| files.iter().find(|(f, _)| Path::new(f) == p).map(|(_, t)| t.to_string());
        assert_eq!(headroom_from("0::/app\n", read), Some(600), "at the limit, but 600 bytes of it is cache");
    }

    #[test]
    fn usage_comes_from_one_stat_line() {
        // A real line (kernel 6.x), its command name with a space and a parenthesis.
        let stat = "4242 (my (srv) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 4 0 \
                    123456 987654321 2048 18446744073709551615 1 1 0 0 0 0 0 4096 17663 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(stat_usage(stat), Some((2048, 325)), "rss pages, utime + stime");
        assert_eq!(stat_usage("4242 (x) S 1 2"), None, "too short");
        assert_eq!(stat_usage("no parenthesis"), None);
    }

    #[test]
    fn usage_of_this_process() {
        let (rss, cpu) = proc_usage(std::process::id()).unwrap();
        assert!(rss > 100_000, "{rss}");
        // The same figure as statm's (both are the kernel's resident counters), give or take
        // what changed between the two reads.
        let statm = memory(std::process::id(), MemoryKind::Rss).unwrap();
        assert!(rss.abs_diff(statm) < statm / 4 + (1 << 20), "stat {rss}, statm {statm}");
        assert!(cpu < Duration::from_secs(3600));
        assert!(proc_usage(u32::MAX).is_none());
    }

    #[test]
    fn start_time_names_one_process() {
        let me = start_time(std::process::id()).unwrap();
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let theirs = start_time(child.id()).unwrap();
        assert!(theirs >= me, "a child starts after its parent: {theirs} < {me}");
        let _ = child.kill();
        // Killed, not reaped yet: a zombie, gone.
        let pid = child.id();
        let gone = (0..500).any(|_| {
            let zombie =
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| stat_state(&s) == Some('Z'));
            if !zombie {
                std::thread::sleep(Duration::from_millis(10));
            }
            zombie
        });
        assert!(gone, "the killed child became a zombie");
        assert_eq!(start_time(pid), None, "a zombie has no start time");
        let _ = child.wait();
        assert_eq!(start_time(std::process::id()), Some(me), "stable");
        assert!(start_time(u32::MAX).is_none());
    }

    #[test]
    fn thread_count_of_this_process() {
        let before = thread_count().unwrap();
        assert!(before >= 1);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || rx.recv());
        // Other tests' threads come and go, but this one is there until we let it go.
        assert!(thread_count().unwrap() >= 2);
        drop(tx);
        let _ = t.join();
    }

    // --- memory ---

    #[test]
    fn memory_of_this_process() {
        let me = std::process::id();
        let rss = memory(me, MemoryKind::Rss).unwrap();
        let pss = memory(me, MemoryKind::Pss).unwrap();
        assert!(rss > 100_000, "{rss}");
        assert!(rss.is_multiple_of(rustix::param::page_size() as u64), "{rss}");
        assert!(pss > 0 && pss.is_multiple_of(1024), "{pss}");
        // Read a moment apart, and other tests allocate meanwhile: PSS ≤ RSS only roughly.
        assert!(pss <= rss * 2, "pss {pss} rss {rss}");
        assert_eq!(memory(u32::MAX, MemoryKind::Rss), None);
        assert_eq!(memory(u32::MAX, MemoryKind::Pss), None);
    }

    #[test]
    fn statm_fixtures() {
        assert_eq!(statm_resident_pages("5473 1283 1024 97 0 388 0\n"), Some(1283));
        assert_eq!(statm_resident_pages("5473"), None);
        assert_eq!(statm_resident_pages(""), None);
        assert_eq!(statm_resident_pages("5473 x 1024"), None);
    }

    #[test]
    fn smaps_rollup_fixtures() {
        let rollup = "\
56036ec23000-7ffd7ffb5000 ---p 00000000 00:00 0                          [rollup]
Rss:                3880 kB
Pss_Anon:            572 kB
Pss:                1244 kB
Pss_Dirty:           572 kB
Shared_Clean:       2696 kB
";
        // `Pss_Anon` comes first here and must not be taken for `Pss`.
        assert_eq!(smaps_rollup_pss(rollup), Some(1244 * 1024));
        assert_eq!(smaps_rollup_pss("Rss:  3880 kB\n"), None);
        assert_eq!(smaps_rollup_pss("Pss: lots kB\n"), None);
        assert_eq!(smaps_rollup_pss(""), None);
    }

    // --- the cgroup's memory limit ---

    /// A fake file system of `(path, text)` pairs for `headroom_from`.
    fn fake(files: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let files: HashMap<PathBuf, String> = files.iter().map(|(p, t)| (PathBuf::from(p), t.to_string())).collect();
        move |path| files.get(path).cloned()
    }

    const V2: &str = "0::/user.slice/app.service\n";
    const HYBRID: &str = "\
9:name=systemd:/
4:memory:/process_api/a282208365bd27cb6b277dbb216e16fe
3:cpuset:/
0::/
";

    #[test]
    fn cgroup_paths_from_proc_self_cgroup() {
        assert_eq!(cgroup_v2_path(V2), Some("/user.slice/app.service"));
        assert_eq!(cgroup_v1_memory_path(V2), None);
        assert_eq!(cgroup_v2_path(HYBRID), Some("/"));
        assert_eq!(cgroup_v1_memory_path(HYBRID), Some("/process_api/a282208365bd27cb6b277dbb216e16fe"));
        // Controllers mounted together, and a name= hierarchy that merely contains the word.
        assert_eq!(cgroup_v1_memory_path("7:cpu,memory:/docker/abc\n"), Some("/docker/abc"));
        assert_eq!(cgroup_v1_memory_path("1:name=memoryish:/x\n2:memsw:/y\n"), None);
        assert_eq!(cgroup_v2_path(""), None);
    }

    #[test]
    fn cgroup_dirs_walk_up_to_the_root() {
        let dirs = |path| cgroup_dirs("/sys/fs/cgroup", path);
        assert_eq!(
            dirs("/a/b"),
            [PathBuf::from("/sys/fs/cgroup/a/b"), PathBuf::from("/sys/fs/cgroup/a"), PathBuf::from("/sys/fs/cgroup")]
        );
        assert_eq!(dirs("/"), [PathBuf::from("/sys/fs/cgroup")]);
        assert_eq!(dirs("/a/../.."), [PathBuf::from("/sys/fs/cgroup/a"), PathBuf::from("/sys/fs/cgroup")]);
    }

    #[test]
    fn limit_files() {
        assert_eq!(parse_v2_limit("max\n"), Some(Limit::None));
        assert_eq!(parse_v2_limit("536870912\n"), Some(Limit::Bytes(536_870_912)));
        assert_eq!(parse_v2_limit("lots"), None);
        assert_eq!(parse_v1_limit("9223372036854771712\n"), Some(Limit::None));
        assert_eq!(parse_v1_limit(&(1u64 << 60).to_string()), Some(Limit::None));
        assert_eq!(parse_v1_limit(&((1u64 << 60) - 1).to_string()), Some(Limit::Bytes((1 << 60) - 1)));
        assert_eq!(parse_v1_limit(""), None);
    }

    #[test]
    fn v2_headroom_is_the_smallest_along_the_parents() {
        let d = "/sys/fs/cgroup/user.slice/app.service";
        let p = "/sys/fs/cgroup/user.slice";
        // The cgroup itself has no limit; its parent's applies. The root has no memory.max.
        let fs = [
            (format!("{d}/memory.max"), "max\n"),
            (format!("{d}/memory.current"), "100\n"),
            (format!("{p}/memory.max"), "1000\n"),
            (format!("{p}/memory.current"), "400\n"),
        ];
        let fs: Vec<(&str, &str)> = fs.iter().map(|(a, b)| (a.as_str(), *b)).collect();
        assert_eq!(headroom_from(V2, fake(&fs)), Some(600));
        // Its own, tighter limit wins.
        let mut tight = fs.clone();
        tight[0].1 = "500\n";
        tight[1].1 = "450\n";
        assert_eq!(headroom_from(V2, fake(&tight)), Some(50));
        // Over the limit (possible for a moment, and after lowering memory.max): 0.
        tight[1].1 = "700\n";
        assert_eq!(headroom_from(V2, fake(&tight)), Some(0));
        // A level whose usage is unreadable is skipped.
        let no_current: Vec<(&str, &str)> =
            tight.iter().copied().filter(|(path, _)| !path.ends_with("app.service/memory.current")).collect();
        assert_eq!(headroom_from(V2, fake(&no_current)), Some(600));
        // No limit anywhere.
        let unlimited = [(fs[0].0, "max\n"), (fs[1].0, "100\n"), (fs[2].0, "max\n"), (fs[3].0, "400\n")];
        assert_eq!(headroom_from(V2, fake(&unlimited)), None);
        assert_eq!(headroom_from(V2, fake(&[])), None);
        assert_eq!(headroom_from("", fake(&fs)), None);
    }

    #[test]
    fn v1_headroom_on_a_hybrid_system() {
        let d = "/sys/fs/cgroup/memory/process_api/a282208365bd27cb6b277dbb216e16fe";
        let fs = [
            (format!("{d}/memory.limit_in_bytes"), "1073741824\n"),
            (format!("{d}/memory.usage_in_bytes"), "4759552\n"),
            ("/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes".into(), "9223372036854771712\n"),
            ("/sys/fs/cgroup/memory/process_api/memory.usage_in_bytes".into(), "5000000\n"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes".into(), "9223372036854771712\n"),
            ("/sys/fs/cgroup/memory/memory.usage_in_bytes".into(), "1843294208\n"),
        ];
        let fs: Vec<(&str, &str)> = fs.iter().map(|(a, b)| (a.as_str(), *b)).collect();
        assert_eq!(headroom_from(HYBRID, fake(&fs)), Some(1_073_741_824 - 4_759_552));
        // "Unlimited" everywhere, as on this machine.
        let mut unlimited = fs.clone();
        unlimited[0].1 = "9223372036854771712\n";
        assert_eq!(headroom_from(HYBRID, fake(&unlimited)), None);
        // A container whose own cgroup is mounted at the root while /proc names a host path:
        // walking up reaches the mount point's files.
        let container = [
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "268435456\n"),
            ("/sys/fs/cgroup/memory/memory.usage_in_bytes", "68435456\n"),
        ];
        assert_eq!(headroom_from("4:memory:/docker/0123abcd\n", fake(&container)), Some(200_000_000));
    }

    #[test]
    fn headroom_of_this_process_does_not_fail() {
        // Whether a limit applies depends on the machine; the reading must merely work.
        if let Some(room) = cgroup_memory_headroom() {
            assert!(room < u64::MAX);
        }
    }

    // --- where a process is ---

    #[test]
    fn diagnose_this_process() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let probe = std::thread::Builder::new().name("procfs-probe".into()).spawn(move || rx.recv()).unwrap();
        let me = std::process::id();
        // The thread is `S` once it waits in recv; until then it may show `R`.
        let mut line = diagnose(me);
        for _ in 0..200 {
            if line.contains(" procfs-probe S ") {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            line = diagnose(me);
        }
        drop(tx);
        let _ = probe.join();
        // The process's own state and system call are its main thread's: the test harness's
        // main thread waits (`S`) while this test runs on another, unless it runs this test.
        let head = format!("pid {me}: state ");
        assert!(
            line.starts_with(&format!("{head}S (sleeping) wchan "))
                || line.starts_with(&format!("{head}R (running) wchan ")),
            "{line}"
        );
        let syscall = line.split(" syscall ").nth(1).unwrap().split(';').next().unwrap();
        assert!(syscall == "running" || syscall.parse::<i64>().is_ok(), "{line}");
        assert!(line.contains(" procfs-probe S "), "{line}");
        assert!(line.contains(&format!(": {me} ")), "the main thread comes first: {line}");
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn diagnose_a_sleeping_child() {
        let Ok(mut child) = std::process::Command::new("sleep").arg("30").spawn() else {
            return; // no `sleep` on this machine
        };
        let pid = child.id();
        let mut line = diagnose(pid);
        for _ in 0..400 {
            if line.contains(" sleep S ") {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            line = diagnose(pid);
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(line.starts_with(&format!("pid {pid}: state S (sleeping) wchan ")), "{line}");
        assert!(line.contains(&format!("; 1 thread: {pid} sleep S ")), "{line}");
        // A parent may read its child's system call: a number (clock_nanosleep's, whatever the
        // architecture numbers it), or `running` if it was caught on the way.
        let syscall = line.split(" syscall ").nth(1).unwrap().split(';').next().unwrap();
        assert!(syscall == "running" || syscall.parse::<i64>().is_ok(), "{line}");
        assert!(diagnose(pid).contains("gone"), "{}", diagnose(pid));
    }

    #[test]
    fn diagnose_a_process_that_is_gone() {
        assert_eq!(diagnose(u32::MAX), format!("pid {}: gone (no /proc/{}/stat)", u32::MAX, u32::MAX));
    }

    #[test]
    fn stat_state_fixtures() {
        assert_eq!(stat_state("1234 (testbed) S 1 1234 1234 0 -1 4194560"), Some('S'));
        // A command name with spaces and parentheses.
        assert_eq!(stat_state("77 (a) b (c)) D 1 2 3"), Some('D'));
        assert_eq!(stat_state("77 (cut"), None);
        assert_eq!(stat_state("77 (x)"), None);
    }

    #[test]
    fn render_fixtures() {
        let thread = |tid, comm: &str, state, wchan: &str| ThreadView {
            tid,
            comm: Some(format!("{comm}\n")),
            state: Some(state),
            wchan: Some(wchan.into()),
        };
        let view = ProcessView {
            pid: 1234,
            state: Some('S'),
            wchan: Some("futex_wait_queue".into()),
            syscall: Some("202 0x7f1 0x80 0x0 0x0 0x0 0x0 0x7ffd 0x7f2\n".into()),
            threads: vec![
                thread(1234, "testbed", 'S', "do_epoll_wait"),
                thread(1235, "ecewo-channel", 'R', "0"),
                ThreadView { tid: 1236, comm: Some("evil\nname\n".into()), state: None, wchan: None },
            ],
            total_threads: Some(3),
        };
        assert_eq!(
            render_diagnosis(&view),
            "pid 1234: state S (sleeping) wchan futex_wait_queue syscall 202; 3 threads: \
             1234 testbed S do_epoll_wait, 1235 ecewo-channel R -, 1236 evil?name ? ?"
        );

        let unreadable = ProcessView {
            pid: 9,
            state: Some('D'),
            wchan: Some("0".into()),
            syscall: None,
            threads: Vec::new(),
            total_threads: None,
        };
        assert_eq!(
            render_diagnosis(&unreadable),
            "pid 9: state D (uninterruptible) wchan - syscall unreadable; threads unreadable"
        );

        let running =
            ProcessView { syscall: Some("running\n".into()), state: None, total_threads: Some(0), ..unreadable };
        assert_eq!(render_diagnosis(&running), "pid 9: state ? wchan - syscall running; 0 threads");

        // Many threads: the first 64 are named, the rest counted.
        let many = ProcessView {
            pid: 1,
            state: Some('S'),
            wchan: Some("ep_poll".into()),
            syscall: Some("-1 0x0".into()),
            threads: (1..=DIAGNOSE_THREADS as u32).map(|t| thread(t, "w", 'S', "futex_wait_queue")).collect(),
            total_threads: Some(1000),
        };
        let line = render_diagnosis(&many);
        assert!(line.starts_with("pid 1: state S (sleeping) wchan ep_poll syscall -1; 1000 threads: 1 w S "), "{line}");
        assert_eq!(line.matches(" w S futex_wait_queue").count(), DIAGNOSE_THREADS);
        assert!(line.ends_with("64 w S futex_wait_queue (and 936 more)"), "{line}");
    }
}
