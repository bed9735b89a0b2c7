#![no_main]
//! Random operation sequences on a small image: our own check finds nothing and reads
//! equal the model.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qcow2::fuzzing::write_ops(data);
});
