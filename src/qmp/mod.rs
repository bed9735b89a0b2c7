//! QMP and guest-agent clients. Knows nothing of qcow2 or of backups: wire protocol, typed
//! replies for the commands used, events.

pub mod agent;
pub mod client;
pub mod types;
pub mod wire;
