//! The three commands' command lines, in the library so that the binaries parse them and
//! `examples/gen-docs.rs` turns the same definitions into man pages and completions.

pub mod qcow2;
pub mod qmpbackup;
pub mod qmprestore;
