//! Feeds arbitrary text to `skiff apply`'s YAML parser: it must answer with resources or an
//! error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = router::resource::parse(text);
    }
});
