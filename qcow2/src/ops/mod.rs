//! The operations qemu-img offers, as library functions over chains and images.

pub mod compare;
pub mod convert;
pub mod info;
pub mod map;
