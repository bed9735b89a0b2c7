//! Refcount block entry encoding: widths 1-64 bits; below 8 bits entries are packed
//! LSB-first within each byte.

use byteorder::{BigEndian as BE, ByteOrder};

/// Refcount of entry `index` in a refcount block of width `1 << order` bits.
pub fn get(block: &[u8], order: u32, index: u64) -> u64 {
    let bits = 1u64 << order;
    match bits {
        8 => block[index as usize] as u64,
        16 => BE::read_u16(&block[index as usize * 2..]) as u64,
        32 => BE::read_u32(&block[index as usize * 4..]) as u64,
        64 => BE::read_u64(&block[index as usize * 8..]),
        _ => {
            let bit = index * bits;
            let byte = block[(bit / 8) as usize];
            ((byte >> (bit % 8)) as u64) & ((1 << bits) - 1)
        }
    }
}

/// Sets entry `index`; `value` must fit in the width.
pub fn set(block: &mut [u8], order: u32, index: u64, value: u64) {
    let bits = 1u64 << order;
    match bits {
        8 => block[index as usize] = value as u8,
        16 => BE::write_u16(&mut block[index as usize * 2..], value as u16),
        32 => BE::write_u32(&mut block[index as usize * 4..], value as u32),
        64 => BE::write_u64(&mut block[index as usize * 8..], value),
        _ => {
            let bit = index * bits;
            let mask = ((1u64 << bits) - 1) as u8;
            let shift = (bit % 8) as u8;
            let b = &mut block[(bit / 8) as usize];
            *b = (*b & !(mask << shift)) | (((value as u8) & mask) << shift);
        }
    }
}

pub fn max_value(order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits == 64 {
        u64::MAX
    } else {
        (1 << bits) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_byte_widths_are_lsb_first() {
        // 2-bit `55 5a` = clusters 0-3 ->1, 4 ->2, 5 ->2, 6 ->1, 7 ->1
        let b = [0x55u8, 0x5a];
        let v: Vec<u64> = (0..8).map(|i| get(&b, 1, i)).collect();
        assert_eq!(v, [1, 1, 1, 1, 2, 2, 1, 1]);
        let b = [0x11u8, 0x11, 0x22, 0x11];
        assert_eq!(get(&b, 2, 4), 2);
        assert_eq!(get(&b, 2, 3), 1);
        assert_eq!(get(&[0x7f], 0, 6), 1);
        assert_eq!(get(&[0x7f], 0, 7), 0);
    }

    #[test]
    fn set_get_all_widths() {
        for order in 0..=6 {
            let mut block = vec![0u8; 512];
            let entries = 512 * 8 / (1 << order);
            for i in 0..entries {
                set(&mut block, order, i, (i * 7) & max_value(order));
            }
            for i in 0..entries {
                assert_eq!(get(&block, order, i), (i * 7) & max_value(order));
            }
        }
    }
}
