//! The on-disk model of a backup target, shared by `backup` (which writes it) and `restore`
//! (which reads and rewrites it):
//!
//! ```text
//! <target>/                      a backup target (target.rs)
//!   current -> YYYY-MM           with --monthly: the newest month's folder
//!   YYYY-MM/                     with --monthly: one chain root per month
//!     uuid                       the chain's bitmap uuid (uuid.rs)
//!     <disk name>/               a disk directory (disk_dir.rs), unless --no-subdir
//!       .lock, .append.lock      the locks commands hold on the directory (lock.rs)
//!       FULL-<unix time>-<disk name>            backup files (name.rs, file.rs)
//!       INC-<unix time>-<disk name>
//!       COPY-<unix time>-<disk name>
//!       <backup file>.manifest   checksums of a backup file (manifest.rs)
//!       <disk name>.config       the source image's info
//! ```
//!
//! Items are named by their home module (`store::disk_dir::DiskDir`); this file re-exports
//! nothing, so no child depends back on it.

pub mod chain;
pub mod disk_dir;
pub mod file;
pub mod fold;
pub mod level;
pub mod lock;
pub mod manifest;
pub mod name;
pub mod prune;
pub mod prune_plan;
pub mod retention;
pub mod target;
pub mod uuid;
pub mod vm;
