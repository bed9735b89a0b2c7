//! qmpbackup: live backups of QEMU VMs over QMP, and qmprestore: native restore of the
//! backup chains. The qcow2 work is done by the `qcow2` crate.

pub mod backup;
pub mod fsutil;
pub mod manifest;
pub mod qmp;
pub mod report;
pub mod restore;
