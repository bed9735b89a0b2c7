//! qmpbackup: live backups of QEMU VMs over QMP, qmprestore: native restore of the backup
//! chains, and the `qcow2` command. The qcow2 work is done by the `qcow2` crate.
//!
//! `store` is the on-disk model of a backup target that both `backup` (which writes it) and
//! `restore` (which reads and rewrites it) use; neither of those two imports the other.
//! `serve` serves backup points over NBD with the restore side's checks.

pub mod backup;
pub mod cli;
pub mod fsutil;
pub mod humanize;
pub mod image_text;
pub mod metrics;
pub mod progress;
pub mod qmp;
pub mod report;
pub mod restore;
pub mod serve;
pub mod store;
