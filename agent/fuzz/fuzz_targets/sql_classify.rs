//! The SQL classifier never panics, whatever the message; and a message it calls read-only has
//! no write class hiding in it.
#![no_main]

use bulkhead::policy::{classify, SqlClass};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let c = classify(text, None);
    if c.classes.contains(&SqlClass::Unknown) {
        assert!(
            !c.unknown_reasons.is_empty() || !c.unknown_functions.is_empty(),
            "unknown without a reason"
        );
    }
    for (_, inner) in &c.prepared {
        assert!(
            inner.classes.iter().all(|k| c.classes.contains(k)),
            "PREPARE counts what it holds"
        );
    }
});
