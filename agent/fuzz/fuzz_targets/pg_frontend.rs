//! The PostgreSQL gateway's frontend decoding never panics: any bytes a governed client sends,
//! framed and parsed as the gateway does (startup packet, then tagged messages).
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
        let mut reader = FrameReader::new(data, "client", codec::MAX_FRONTEND);
        if let Ok(Some(packet)) = reader.startup().await {
            let _ = codec::parse_startup(&packet);
        }
        while let Ok(Some(frame)) = reader.next().await {
            match frame.tag {
                b'Q' => drop(codec::query_text(&frame.body)),
                b'P' => drop(codec::parse_message(&frame.body)),
                b'B' => {
                    drop(codec::bind_names(&frame.body));
                    drop(codec::bind_result_formats(&frame.body));
                }
                b'E' => drop(codec::execute_portal(&frame.body)),
                b'C' | b'D' => drop(codec::close_target(&frame.body)),
                _ => {}
            }
        }
    });
});
