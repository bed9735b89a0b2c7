//! The operations qemu-img offers, as library functions over chains and images.

pub mod commit;
pub mod compare;
pub mod convert;
pub mod info;
pub mod map;
pub mod parallel_copy;
mod pipeline;
pub mod rebase;
pub mod snapshot;
pub mod throttle;
