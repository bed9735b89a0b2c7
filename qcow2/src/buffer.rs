//! Page-aligned byte buffers: what direct I/O (`O_DIRECT`) needs of the memory it writes
//! from. The copy engine's buffers are these, so a writer can hand them to the kernel
//! without a bounce copy.

use std::ops::{Deref, DerefMut};

/// Alignment of every [`AlignedBuf`], and the unit direct writes are cut to: 4096 covers
/// devices with 512-byte and with 4096-byte logical blocks, and filesystems' blocks.
pub const DIRECT_ALIGN: usize = 4096;

/// A zero-filled buffer of `len` bytes whose first byte sits on a [`DIRECT_ALIGN`]
/// boundary. It over-allocates a `Vec` by one alignment and starts inside it; a `Vec`'s
/// heap block never moves while the buffer is moved around, so the alignment holds.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { raw, start, len }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Whether `buf` written at `offset` meets direct I/O's alignment (memory, offset, length).
pub fn is_direct_aligned(buf: &[u8], offset: u64) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
        && offset.is_multiple_of(DIRECT_ALIGN as u64)
        && buf.len().is_multiple_of(DIRECT_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_stay_aligned_when_moved() {
        for len in [0, 1, 4095, 4096, 5000, 4 << 20] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            assert!((b.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
            b.fill(7);
            let moved = [b];
            assert!((moved[0].as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
            assert!(moved[0].iter().all(|&x| x == 7));
        }
    }

    #[test]
    fn alignment_needs_memory_offset_and_length() {
        let b = AlignedBuf::new(3 * DIRECT_ALIGN);
        assert!(is_direct_aligned(&b[..DIRECT_ALIGN], 0));
        assert!(is_direct_aligned(&b[DIRECT_ALIGN..], 8192));
        assert!(!is_direct_aligned(&b[1..DIRECT_ALIGN + 1], 0));
        assert!(!is_direct_aligned(&b[..DIRECT_ALIGN], 512));
        assert!(!is_direct_aligned(&b[..512], 0));
    }
}
