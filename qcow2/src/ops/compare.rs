//! `compare`: are two disks' guest contents equal? (qemu-img compare's default mode)

use crate::chain::Chain;
use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comparison {
    Identical {
        size_mismatch: bool,
    },
    /// First differing 512-byte sector's offset.
    Differ {
        offset: u64,
        size_mismatch: bool,
    },
}

const STEP: u64 = 4 << 20;

fn all_zero(chain: &Chain, start: u64, len: u64) -> Result<bool> {
    Ok(chain.map(start, len)?.iter().all(|e| e.reads_as_zero()))
}

/// Compares guest contents; where sizes differ, the larger disk's excess must read as zeros.
pub fn compare(a: &Chain, b: &Chain) -> Result<Comparison> {
    let size_a = a.virtual_size();
    let size_b = b.virtual_size();
    let size_mismatch = size_a != size_b;
    let common = size_a.min(size_b);
    let mut buf_a = vec![0u8; STEP as usize];
    let mut buf_b = vec![0u8; STEP as usize];
    let mut off = 0;
    while off < common {
        let n = STEP.min(common - off);
        if all_zero(a, off, n)? && all_zero(b, off, n)? {
            off += n;
            continue;
        }
        let (ba, bb) = (&mut buf_a[..n as usize], &mut buf_b[..n as usize]);
        a.read_at(ba, off)?;
        b.read_at(bb, off)?;
        if ba != bb {
            let i = ba
                .iter()
                .zip(bb.iter())
                .position(|(x, y)| x != y)
                .unwrap_or(0) as u64;
            return Ok(Comparison::Differ {
                offset: (off + i) & !511,
                size_mismatch,
            });
        }
        off += n;
    }
    let longer = if size_a > size_b { a } else { b };
    while off < longer.virtual_size() {
        let n = STEP.min(longer.virtual_size() - off);
        if !all_zero(longer, off, n)? {
            let buf = &mut buf_a[..n as usize];
            longer.read_at(buf, off)?;
            if let Some(i) = buf.iter().position(|&x| x != 0) {
                return Ok(Comparison::Differ {
                    offset: (off + i as u64) & !511,
                    size_mismatch,
                });
            }
        }
        off += n;
    }
    Ok(Comparison::Identical { size_mismatch })
}
