#![no_main]
//! Open arbitrary bytes as an image, map and read everything, and check it: never panics,
//! never hangs, memory bounded.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qcow2::fuzzing::open_read_check(data);
});
