//! The worker's channel thread: dispatches the master's replies and notices the master's death.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use super::Inner;
use crate::proto::channel::{MAX_LINE, ToWorker};

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
            // Longer than any message we expect: skip the rest of it, keep listening.
            tracing::warn!("skipping a message from the master longer than {MAX_LINE} bytes");
            let mut rest = Vec::new();
            if !matches!(reader.read_until(b'\n', &mut rest), Ok(n) if n > 0) {
                break;
            }
            continue;
        }
        match serde_json::from_slice::<ToWorker>(&line) {
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
