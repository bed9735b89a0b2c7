//! The operations qemu-img offers, as library functions over chains and images.

pub mod commit;
pub mod compare;
pub mod convert;
pub mod copy;
pub mod info;
pub mod map;
pub mod rebase;
pub mod throttle;
