#![no_main]
//! Header parsing on arbitrary bytes: never panics; what parses re-encodes and parses again.
use libfuzzer_sys::fuzz_target;
use qcow2::format::header::Header;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::parse(data) {
        if let Ok(enc) = h.encode() {
            let h2 = Header::parse(&enc).expect("our own encoding must parse");
            assert_eq!(h2.size, h.size);
            assert_eq!(h2.l1_table_offset, h.l1_table_offset);
            assert_eq!(h2.backing_file, h.backing_file);
        }
    }
});
