//! qmprestore: native restore of backup chains (no qemu-img, no other program), built on the
//! `qcow2` crate. Every command checks the whole chain before its first write.

pub mod commands;
pub mod merge;
pub mod options;
pub mod verify_metrics;
