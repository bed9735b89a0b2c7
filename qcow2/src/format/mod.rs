//! On-disk structures and codecs. Pure functions over byte slices; no I/O.

pub mod bitmap;
pub mod entry;
pub mod geometry;
pub mod header;
pub mod refcount;
pub mod snapshot;
