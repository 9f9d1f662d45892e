//! The PostgreSQL gateway's backend decoding never panics: any bytes a target sends, framed and
//! parsed as the gateway does, including masking a DataRow.
#![no_main]

use std::sync::OnceLock;

use bulkhead::proxy::postgres::codec::{self, FrameReader};
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let mut reader = FrameReader::new(data, "target", codec::MAX_BACKEND);
        while let Ok(Some(frame)) = reader.next().await {
            match frame.tag {
                b'E' | b'N' => drop(codec::error_fields(&frame.body)),
                b'C' => drop(codec::command_tag(&frame.body)),
                b'Z' => drop(codec::ready_status(&frame.body)),
                b'T' => drop(codec::row_description(&frame.body)),
                b'H' => drop(codec::copy_out_response(&frame.body)),
                b'D' => {
                    drop(codec::data_row_values(&frame.body));
                    let rebuilt = codec::rewrite_data_row(&frame.body, |v| Some(v.iter().rev().copied().collect()));
                    if let Ok(Some(row)) = rebuilt {
                        // A rebuilt row is itself a well-formed frame of the same field count.
                        let mut again = FrameReader::new(&row[..], "target", codec::MAX_BACKEND);
                        let rebuilt = again.next().await.expect("rebuilt frame reads").expect("one frame");
                        assert_eq!(rebuilt.body[..2], frame.body[..2], "same field count");
                        assert!(codec::rewrite_data_row(&rebuilt.body, |_| None).expect("well formed").is_none());
                    }
                }
                _ => {}
            }
        }
    });
});
