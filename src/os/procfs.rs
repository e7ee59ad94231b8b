//! Readings from `/proc`: a process's memory and CPU time, this process's thread count.

use std::time::Duration;

use crate::stats::{ClusterStats, WorkerStats};

/// Reads what `/proc` says of `pid`: resident memory in bytes and CPU time (user + system).
pub(crate) fn proc_usage(pid: u32) -> Option<(u64, Duration)> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces), from field 3 on.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
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
}

// TEMPORARY until the os branch lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MemoryKind {
    Rss,
    Pss,
}
pub(crate) fn memory(pid: u32, _kind: MemoryKind) -> Option<u64> {
    proc_usage(pid).map(|u| u.0)
}
pub(crate) fn cgroup_memory_headroom() -> Option<u64> {
    None
}
pub(crate) fn diagnose(_pid: u32) -> String {
    String::new()
}
