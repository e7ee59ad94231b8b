//! The channel between the master and one worker: a unix stream socket pair carrying
//! line-delimited JSON messages, typed in both directions. EOF on the worker's end means the
//! master is gone.

use serde::{Deserialize, Serialize};

use crate::stats::{ClusterStats, WorkerStats};

/// The longest line either side accepts (a stats answer for `MAX_WORKERS` workers is about
/// 1 MiB); longer input means a broken peer.
pub(crate) const MAX_LINE: usize = 8 << 20;

/// Messages from a worker to its master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum ToMaster {
    /// The worker accepts connections.
    Ready,
    /// The worker asks for the cluster's statistics; the reply carries the same id.
    Stats { id: u64 },
    /// The worker is alive: its requests served so far and the number in flight now. Sent
    /// from the serving runtime (or a blocking server's loop), so a worker whose server is
    /// stuck stops beating.
    Beat { served: u64, in_flight: u64 },
    /// The worker's request counts, without being a heartbeat (sent when the request limit is
    /// reached: it must not arm the worker timeout of a server that does not beat).
    Served { served: u64, in_flight: u64 },
}

/// Messages from the master to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum ToWorker {
    /// The answer to [`ToMaster::Stats`].
    Stats { id: u64, cluster: ClusterStats, workers: Vec<WorkerStats> },
}

/// Encodes one message as a JSON line.
pub(crate) fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(msg).expect("channel messages always serialize");
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_round_trips_as_one_tagged_line() {
        let beat = ToMaster::Beat { served: u64::MAX, in_flight: 3 };
        let line = encode(&beat);
        assert_eq!(line, format!("{{\"t\":\"beat\",\"served\":{},\"in_flight\":3}}\n", u64::MAX).into_bytes());
        assert_eq!(serde_json::from_slice::<ToMaster>(&line).unwrap(), beat);
        assert_eq!(
            serde_json::from_str::<ToMaster>(r#"{"t":"beat","served":0,"in_flight":0}"#).unwrap(),
            ToMaster::Beat { served: 0, in_flight: 0 }
        );
        assert!(serde_json::from_str::<ToMaster>(r#"{"t":"beat","served":1}"#).is_err(), "both counts are required");
    }
}
