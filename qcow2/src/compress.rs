//! Compressed cluster codecs: raw deflate (QEMU's "zlib") and zstd.

use crate::format::header::CompressionType;
use std::io;

/// Decompresses one cluster into `out` (exactly one cluster long). `input` may carry trailing
/// bytes of neighbouring clusters: decoding stops once `out` is full.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> io::Result<()> {
    match kind {
        CompressionType::Zlib => inflate_raw(input, out),
        CompressionType::Zstd => zstd_decode(input, out),
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn inflate_raw(input: &[u8], out: &mut [u8]) -> io::Result<()> {
    use flate2::{Decompress, FlushDecompress, Status};
    // A 15-bit window is a superset of QEMU's 12-bit one.
    let mut d = Decompress::new(false);
    loop {
        let before_in = d.total_in();
        let before_out = d.total_out();
        let status = d
            .decompress(
                &input[d.total_in() as usize..],
                &mut out[d.total_out() as usize..],
                FlushDecompress::Finish,
            )
            .map_err(|e| bad(&format!("corrupt deflate data: {e}")))?;
        if d.total_out() as usize == out.len() {
            return Ok(());
        }
        match status {
            Status::StreamEnd => {
                return Err(bad("compressed cluster decodes to less than a cluster"))
            }
            _ if d.total_in() == before_in && d.total_out() == before_out => {
                return Err(bad("compressed cluster is truncated"))
            }
            _ => {}
        }
    }
}

fn zstd_decode(input: &[u8], out: &mut [u8]) -> io::Result<()> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new()?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let before_in = inb.pos();
        let before_out = outb.pos();
        let hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| bad(&format!("corrupt zstd data: {e}")))?;
        if outb.pos() == outb.capacity() {
            return Ok(());
        }
        if hint == 0 {
            // Frame finished: QEMU accepts further frames.
            dec.reinit()?;
            if inb.pos() >= input.len() {
                return Err(bad("compressed cluster decodes to less than a cluster"));
            }
        } else if inb.pos() == before_in && outb.pos() == before_out {
            return Err(bad("compressed cluster is truncated"));
        }
    }
}

/// Compresses one cluster the way QEMU does. Returns None when the result would not be
/// smaller than a cluster (QEMU then writes the cluster uncompressed).
pub fn compress(kind: CompressionType, input: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let limit = input.len() - 1;
    let out = match kind {
        CompressionType::Zlib => {
            use flate2::{Compress, Compression, FlushCompress, Status};
            let mut c = Compress::new_with_window_bits(Compression::new(6), false, 12);
            let mut out = vec![0u8; limit];
            match c.compress(input, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => {
                    out.truncate(c.total_out() as usize);
                    out
                }
                Ok(_) => return Ok(None),
                Err(e) => return Err(bad(&format!("deflate failed: {e}"))),
            }
        }
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(input, 3)?;
            if out.len() > limit {
                return Ok(None);
            }
            out
        }
    };
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_codecs_with_trailing_garbage() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 100) as u8;
        }
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = compress(kind, &data).unwrap().unwrap();
            c.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
            let mut out = vec![0u8; 65536];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn incompressible_data_is_refused() {
        let mut x = 0x1234_5678u32;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert!(compress(CompressionType::Zlib, &data).unwrap().is_none());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zlib, &[0xff; 100], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 100], &mut out).is_err());
        assert!(decompress(CompressionType::Zlib, &[], &mut out).is_err());
    }
}
