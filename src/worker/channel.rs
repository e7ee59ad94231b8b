//! The worker's channel thread: dispatches the master's replies and notices the master's death.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Inner;
use crate::proto::channel::{MAX_LINE, ToWorker};

/// Decodes one message from the master. A panic while decoding (a value out of range for the
/// platform's types) is a malformed message like any other: this thread must survive it, since
/// it is the one that notices the master's death.
fn decode(line: &[u8]) -> Result<ToWorker, String> {
    match std::panic::catch_unwind(|| serde_json::from_slice::<ToWorker>(line)) {
        Ok(decoded) => decoded.map_err(|e| e.to_string()),
        Err(_) => Err("a value is out of range".to_owned()),
    }
}

/// The channel thread: dispatches the master's replies and notices EOF. When the master is gone
/// nobody will kill a wedged drain any more, so after the shutdown timeout it ends the process.
pub(super) fn channel_reader(inner: Arc<Inner>, stream: UnixStream) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader).take(MAX_LINE as u64).read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            // Longer than any message we expect: skip the rest of it, a bounded piece at a time,
            // and keep listening.
            tracing::warn!("skipping a message from the master longer than {MAX_LINE} bytes");
            loop {
                line.clear();
                match (&mut reader).take(MAX_LINE as u64).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line.last() == Some(&b'\n') => break,
                    Ok(_) => {}
                }
            }
            if line.last() != Some(&b'\n') {
                break;
            }
            continue;
        }
        match decode(&line) {
            Ok(msg) => {
                let id = match &msg {
                    ToWorker::Stats { id, .. } => *id,
                };
                if let Some(tx) = inner.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                    let _ = tx.try_send(msg);
                }
            }
            Err(e) => tracing::warn!("ignoring a malformed message from the master: {e}"),
        }
    }
    tracing::warn!(worker = inner.env.id, "the master is gone; draining and exiting");
    inner.channel_broken.store(true, Ordering::SeqCst);
    *inner.gone.lock().unwrap_or_else(|e| e.into_inner()) = true;
    inner.gone_cv.notify_all();
    #[cfg(feature = "tokio")]
    inner.gone_tx.send_replace(true);
    inner.pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
    std::thread::sleep(inner.env.shutdown_timeout);
    tracing::error!(
        worker = inner.env.id,
        "still running {:?} after the master went away; exiting",
        inner.env.shutdown_timeout
    );
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_from_the_master_never_panic() {
        let ok = br#"{"t":"stats","id":7,"cluster":{"total_workers":1,"active_workers":1,"crashed_workers":0,"disabled_workers":0,"shutdown_requested":false,"restart_requested":false,"total_restarts":0,"last_restart":null},"workers":[]}"#;
        assert!(matches!(decode(ok), Ok(ToWorker::Stats { id: 7, .. })));
        // A start time 10^19 s after the epoch: past what `SystemTime` holds, read as unknown.
        let far = br#"{"t":"stats","id":8,"cluster":{"total_workers":1,"active_workers":1,"crashed_workers":0,"disabled_workers":0,"shutdown_requested":false,"restart_requested":false,"total_restarts":0,"last_restart":null},"workers":[{"worker_id":0,"pid":1,"port":1,"status":"active","start_time":1e19,"uptime":0.0,"exit_status":null,"crash_count":0,"respawn_disabled":false}]}"#;
        match decode(far) {
            Ok(ToWorker::Stats { id: 8, workers, .. }) => assert_eq!(workers[0].start_time, None),
            other => panic!("{other:?}"),
        }
        assert!(decode(b"{not json").is_err());
    }
}
