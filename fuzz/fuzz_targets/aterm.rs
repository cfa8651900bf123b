#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kiln_format::fuzzing::check_aterm(data));
