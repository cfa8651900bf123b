#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_protocol::fuzzing::check_requests(data);
    kiln_protocol::fuzzing::check_connection(data);
});
