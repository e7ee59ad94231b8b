//! What passes between processes, typed in both directions and shared by every side:
//!
//! - [`handoff`]: how a master hands a worker its identity (environment variables) and its
//!   descriptors (fixed numbers);
//! - [`channel`]: the messages on a worker's channel;
//! - [`line`]: the newline-delimited framing the master uses for channels and control clients;
//! - [`control`]: the control protocol between the `ecewo-cluster` CLI (or any tool) and a
//!   master, requests and replies, plus the client;
//! - [`metrics`]: the Prometheus text of the cluster's figures.
//!
//! Nothing here knows about the supervisor's decisions or the master's loop.

pub(crate) mod channel;
pub mod control;
pub(crate) mod handoff;
pub(crate) mod line;
pub mod metrics;
