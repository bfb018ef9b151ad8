//! Any bytes, as a rules file: `RuleSet::from_yaml` answers `Ok` or `Err` and never panics
//! (STYLE 28). Non-UTF-8 input is skipped: the tiers read rules files as text, so it never
//! reaches the parser.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = shared::rules::RuleSet::from_yaml("fuzz.yaml", s);
    }
});
