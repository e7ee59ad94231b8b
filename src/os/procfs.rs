//! Readings from `/proc`: a process's memory (RSS or PSS) and CPU time, this process's thread
//! count.
//!
//! Every reading is a plain file read: none blocks, none panics, and a process that is gone (or
//! a file that is unreadable) gives `None`. The parsing is done by pure functions of the file's
//! text, so that the tests can feed them fixtures.

use std::time::Duration;

use crate::stats::{ClusterStats, WorkerStats};

/// Reads what `/proc` says of `pid`: resident memory in bytes and CPU time (user + system).
pub(crate) fn proc_usage(pid: u32) -> Option<(u64, Duration)> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let resident = statm_resident_pages(&statm)?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces), from field 3 on.
    let rest: Vec<&str> = stat_fields_after_comm(&stat)?.split_whitespace().collect();
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    let page = rustix::param::page_size() as u64;
    Some((resident * page, Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / hz)))
}

/// How many threads this process has (the `Threads:` line of `/proc/self/status`), if `/proc`
/// says.
pub(crate) fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok())
}

/// Fills in the resource figures of running workers, and the cluster's totals.
pub(crate) fn add_usage(cluster: &mut ClusterStats, workers: &mut [WorkerStats]) {
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
#[allow(dead_code)] // used by the master's liveness checks (issue 11)
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
#[allow(dead_code)] // used by the master's liveness checks (issue 11)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_of_this_process() {
        let (rss, cpu) = proc_usage(std::process::id()).unwrap();
        assert!(rss > 100_000, "{rss}");
        assert!(cpu < Duration::from_secs(3600));
        assert!(proc_usage(u32::MAX).is_none());
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
}
