//! qmpbackup: live backups of QEMU VMs over QMP, qmprestore: native restore of the backup
//! chains, and the `qcow2` command. The qcow2 work is done by the `qcow2` crate.

pub mod backup;
pub mod fsutil;
pub mod humanize;
pub mod image_text;
pub mod manifest;
pub mod qmp;
pub mod report;
pub mod restore;
