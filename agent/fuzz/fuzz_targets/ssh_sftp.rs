//! The SSH gateway's sftp framing and parsing never panic: any bytes a client or a target
//! sends on an sftp channel, in chunks, framed and parsed both ways (bounded packets).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead::proxy::ssh::sftp::fuzz(data);
});
