//! A native qcow2 library: read and write qcow2 images and backing chains with the semantics
//! of QEMU's qcow2 driver and qemu-img, with no QEMU installed.
//!
//! Layers: [`format`] (pure codecs) → [`storage`] (bytes) → [`image`] (one image, reaching
//! what lies below it through [`image::Backing`]) → [`chain`] (a backing chain as one disk)
//! → [`ops`] (info, map, compare, convert, commit, rebase; copies go through [`ops::copy`]).
//! The re-exports below are for users of the crate; inside it, items are named by their
//! home module.

pub mod alloc;
pub mod buffer;
pub mod cache;
pub mod chain;
pub mod check;
pub mod compress;
pub mod create;
pub mod device;
pub mod error;
pub mod format;
pub mod fuzzing;
pub mod image;
pub mod lock;
pub mod mapping;
pub mod ops;
pub mod repair;
pub mod storage;
#[cfg(test)]
mod testutil;

pub use chain::{Chain, Format, Layer, OpenOptions};
pub use error::{Error, Result};
pub use format::geometry::Geometry;
pub use image::write::{HostRun, OpenRwOptions, WriteMapping};
pub use image::{Backing, Qcow2};
pub use mapping::{Extent, ExtentKind};
