//! Prometheus metrics of the whole cluster, in the text exposition format.
//!
//! The master holds the figures; a worker asks for them over its channel
//! (`serve::metrics`, with the `tokio` feature), so a `/metrics` route in the application returns the cluster's
//! aggregate whichever worker the scrape reaches (a metric scraped from one random worker would
//! describe only that worker). `ecewo-cluster metrics` prints the same text, for textfile
//! collectors.

use std::fmt::Write;

use crate::stats::{ClusterStats, RestartOutcome, WorkerStats, WorkerStatus};

/// Renders the cluster's statistics as Prometheus text (version 0.0.4).
pub fn render(cluster: &ClusterStats, workers: &[WorkerStats]) -> String {
    render_labeled(cluster, workers, &[])
}

/// Like [`render`], with constant labels added to every sample (for example
/// `[("cluster", "api-8080")]`, so that the files of several clusters can share a textfile
/// collector).
pub fn render_labeled(cluster: &ClusterStats, workers: &[WorkerStats], labels: &[(&str, &str)]) -> String {
    let constant: String = labels.iter().map(|(k, v)| format!("{k}=\"{}\",", escape(v))).collect();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (own, value) in samples {
            let all = format!("{constant}{own}");
            let all = all.trim_end_matches(',');
            if all.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{all}}} {value}");
            }
        }
    };
    let g = |v: usize| vec![(String::new(), v as f64)];
    metric("ecewo_cluster_workers_configured", "gauge", "Worker slots configured.", &g(cluster.total_workers));
    let states = [
        WorkerStatus::Starting,
        WorkerStatus::Active,
        WorkerStatus::Stopping,
        WorkerStatus::Crashed,
        WorkerStatus::Respawning,
        WorkerStatus::Disabled,
        WorkerStatus::Stopped,
    ];
    let by_state: Vec<(String, f64)> = states
        .iter()
        .map(|st| (format!("state=\"{st}\""), workers.iter().filter(|w| w.status == *st).count() as f64))
        .collect();
    metric("ecewo_cluster_workers", "gauge", "Worker slots by status.", &by_state);
    let listener = |l: &crate::stats::ListenerStats| {
        format!("listener=\"{}\",kind=\"{}\",address=\"{}\"", escape(&l.name), escape(&l.kind), escape(&l.address))
    };
    let sockets: Vec<(String, f64)> = cluster.listeners.iter().map(|l| (listener(l), l.sockets as f64)).collect();
    metric("ecewo_cluster_listener_sockets", "gauge", "Listening sockets the master holds, by listener.", &sockets);
    let queued: Vec<(String, f64)> =
        cluster.listeners.iter().filter_map(|l| l.queued.map(|q| (listener(l), q as f64))).collect();
    metric(
        "ecewo_cluster_listener_queued",
        "gauge",
        "Connections waiting in a listener's accept queues (TCP listeners).",
        &queued,
    );
    metric(
        "ecewo_cluster_restarts_total",
        "counter",
        "Workers started again (respawns and graceful replacements).",
        &[(String::new(), cluster.total_restarts as f64)],
    );
    metric(
        "ecewo_cluster_restart_in_progress",
        "gauge",
        "1 while a graceful restart runs.",
        &g(usize::from(cluster.restart_requested)),
    );
    if let Some(last) = &cluster.last_restart {
        let ok = usize::from(matches!(last, RestartOutcome::Completed { .. }));
        metric("ecewo_cluster_last_restart_success", "gauge", "1 if the last graceful restart completed.", &g(ok));
    }
    metric(
        "ecewo_cluster_master_generation",
        "gauge",
        "The master's generation: 0 for the first, one more with each upgrade in place.",
        &[(String::new(), cluster.generation as f64)],
    );
    metric(
        "ecewo_cluster_upgrade_in_progress",
        "gauge",
        "1 while an upgrade of the master in place runs.",
        &g(usize::from(cluster.upgrade_requested)),
    );
    if let Some(last) = &cluster.last_upgrade {
        let ok = usize::from(last.is_completed());
        metric("ecewo_cluster_last_upgrade_success", "gauge", "1 if the last upgrade of the master completed.", &g(ok));
    }
    metric(
        "ecewo_cluster_log_lines_dropped_total",
        "counter",
        "Lines of the workers' captured output dropped because the output did not keep up.",
        &[(String::new(), cluster.log_lines_dropped as f64)],
    );
    metric(
        "ecewo_cluster_shutdown_requested",
        "gauge",
        "1 once a shutdown was asked for.",
        &g(usize::from(cluster.shutdown_requested)),
    );
    let per_worker = |f: &dyn Fn(&WorkerStats) -> Option<f64>| -> Vec<(String, f64)> {
        workers.iter().filter_map(|w| f(w).map(|v| (format!("worker=\"{}\"", w.worker_id), v))).collect()
    };
    metric(
        "ecewo_cluster_worker_up",
        "gauge",
        "1 if the worker slot is active.",
        &per_worker(&|w| Some(f64::from(u8::from(w.status == WorkerStatus::Active)))),
    );
    metric(
        "ecewo_cluster_worker_crashes_total",
        "counter",
        "Crashes of the worker slot.",
        &per_worker(&|w| Some(f64::from(w.crash_count))),
    );
    metric(
        "ecewo_cluster_worker_restarts_total",
        "counter",
        "Workers started again in the slot.",
        &per_worker(&|w| Some(w.restarts as f64)),
    );
    metric(
        "ecewo_cluster_worker_uptime_seconds",
        "gauge",
        "How long the slot's worker has been running.",
        &per_worker(&|w| w.pid.map(|_| w.uptime.as_secs_f64())),
    );
    metric(
        "ecewo_cluster_worker_resident_memory_bytes",
        "gauge",
        "Resident memory of the slot's worker.",
        &per_worker(&|w| w.rss_bytes.map(|b| b as f64)),
    );
    metric(
        "ecewo_cluster_worker_cpu_seconds_total",
        "counter",
        "CPU time (user and system) of the slot's current worker.",
        &per_worker(&|w| w.cpu_time.map(|t| t.as_secs_f64())),
    );
    metric(
        "ecewo_cluster_worker_heartbeat_age_seconds",
        "gauge",
        "Time since the slot's worker last beat (workers that beat).",
        &per_worker(&|w| w.heartbeat_age.map(|t| t.as_secs_f64())),
    );
    metric(
        "ecewo_cluster_worker_requests_total",
        "counter",
        "Requests the slot's current worker served, as its last heartbeat said.",
        &per_worker(&|w| w.requests.map(|n| n as f64)),
    );
    metric(
        "ecewo_cluster_worker_requests_in_flight",
        "gauge",
        "Requests in flight in the slot's worker, as its last heartbeat said.",
        &per_worker(&|w| w.in_flight.map(|n| n as f64)),
    );
    let opt = |v: Option<u64>| v.map(|n| vec![(String::new(), n as f64)]).unwrap_or_default();
    metric(
        "ecewo_cluster_cgroup_memory_limit_bytes",
        "gauge",
        "The memory limit of the cluster's cgroup (absent without one).",
        &opt(cluster.memory_limit_bytes),
    );
    metric(
        "ecewo_cluster_cgroup_memory_bytes",
        "gauge",
        "The memory the cluster's cgroup uses (page cache included).",
        &opt(cluster.memory_current_bytes),
    );
    let exits: Vec<(String, f64)> =
        cluster.exits.iter().map(|(reason, n)| (format!("reason=\"{reason}\""), n as f64)).collect();
    metric("ecewo_cluster_worker_exits_total", "counter", "Worker processes that ended, by reason.", &exits);
    out
}

/// A label value with `\\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn listeners_are_listed_with_their_queues() {
        let cluster = ClusterStats {
            listeners: vec![
                crate::stats::ListenerStats {
                    name: "web".into(),
                    address: "127.0.0.1:80".into(),
                    kind: "tcp".into(),
                    balance: "reuseport".into(),
                    sockets: 2,
                    queued: Some(5),
                },
                crate::stats::ListenerStats {
                    name: "sock".into(),
                    address: "/run/s.sock".into(),
                    kind: "unix".into(),
                    balance: "shared".into(),
                    sockets: 1,
                    queued: None,
                },
            ],
            ..Default::default()
        };
        let text = render(&cluster, &[]);
        assert!(
            text.contains("ecewo_cluster_listener_sockets{listener=\"web\",kind=\"tcp\",address=\"127.0.0.1:80\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("ecewo_cluster_listener_queued{listener=\"web\",kind=\"tcp\",address=\"127.0.0.1:80\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("ecewo_cluster_listener_sockets{listener=\"sock\",kind=\"unix\",address=\"/run/s.sock\"} 1")
        );
        assert!(!text.contains("ecewo_cluster_listener_queued{listener=\"sock\""), "no queue for unix: {text}");
    }

    #[test]
    fn renders_the_text_format() {
        let mut cluster = ClusterStats { total_workers: 2, active_workers: 1, total_restarts: 3, ..Default::default() };
        cluster.exits.add(crate::stats::ExitReason::Hung);
        cluster.memory_limit_bytes = Some(1 << 30);
        cluster.memory_current_bytes = Some(123);
        cluster.generation = 2;
        cluster.last_upgrade = Some(crate::stats::UpgradeOutcome::Failed { reason: "x".into() });
        let w = |id, status, pid| WorkerStats {
            worker_id: id,
            pid,
            port: 80,
            status,
            start_time: None,
            uptime: Duration::from_millis(1500),
            exit_status: None,
            crash_count: 2,
            respawn_disabled: false,
            restarts: 1,
            rss_bytes: pid.map(|_| 4096),
            cpu_time: pid.map(|_| Duration::from_millis(250)),
            heartbeat_age: pid.map(|_| Duration::from_millis(500)),
            requests: pid.map(|_| 42),
            in_flight: pid.map(|_| 3),
            last_exit_reason: None,
            notify_status: None,
        };
        let text = render(&cluster, &[w(0, WorkerStatus::Active, Some(10)), w(1, WorkerStatus::Respawning, None)]);
        for line in [
            "# TYPE ecewo_cluster_workers gauge",
            "ecewo_cluster_workers_configured 2",
            "ecewo_cluster_workers{state=\"active\"} 1",
            "ecewo_cluster_workers{state=\"respawning\"} 1",
            "ecewo_cluster_restarts_total 3",
            "ecewo_cluster_worker_up{worker=\"0\"} 1",
            "ecewo_cluster_worker_up{worker=\"1\"} 0",
            "ecewo_cluster_worker_crashes_total{worker=\"1\"} 2",
            "ecewo_cluster_worker_uptime_seconds{worker=\"0\"} 1.5",
            "ecewo_cluster_worker_resident_memory_bytes{worker=\"0\"} 4096",
            "ecewo_cluster_worker_cpu_seconds_total{worker=\"0\"} 0.25",
            "ecewo_cluster_worker_heartbeat_age_seconds{worker=\"0\"} 0.5",
            "ecewo_cluster_worker_requests_total{worker=\"0\"} 42",
            "ecewo_cluster_worker_requests_in_flight{worker=\"0\"} 3",
            "ecewo_cluster_worker_exits_total{reason=\"hung\"} 1",
            "ecewo_cluster_worker_exits_total{reason=\"recycled_memory\"} 0",
            "ecewo_cluster_cgroup_memory_limit_bytes 1073741824",
            "ecewo_cluster_cgroup_memory_bytes 123",
            "ecewo_cluster_master_generation 2",
            "ecewo_cluster_upgrade_in_progress 0",
            "ecewo_cluster_last_upgrade_success 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("worker_uptime_seconds{worker=\"1\"}"), "no figure for a slot without a process");
        assert!(!text.contains("last_restart_success"), "absent before any restart");
        let labeled = render_labeled(&cluster, &[], &[("cluster", "api-\"8080\"")]);
        assert!(
            labeled.lines().any(|l| l == "ecewo_cluster_workers_configured{cluster=\"api-\\\"8080\\\"\"} 2"),
            "{labeled}"
        );
        assert!(
            labeled.lines().any(|l| l == "ecewo_cluster_workers{cluster=\"api-\\\"8080\\\"\",state=\"active\"} 0"),
            "{labeled}"
        );
        // Every sample line is `name{labels} value` with a number.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let value = l.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{l}");
        }
    }
}
