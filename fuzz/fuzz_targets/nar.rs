#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("kiln-fuzz-nar-{}", std::process::id()));
    kiln_format::fuzzing::check_nar(data, &dir);
});
