//! CancelRequest: the client holds a key the gateway issued, never the target's own; the
//! gateway maps it back and sends the target's key upstream.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use super::upstream;
use crate::{
    net::OrigDstAddr,
    proxy::session::Conn,
    record::{now_micros, EventKind, Outcome, RecordedVerdict},
};

/// A cancel key: process id and secret.
pub type CancelKey = (i32, i32);

/// Cancel keys the gateway handed to clients, mapped to the target's own.
#[derive(Default)]
pub struct CancelKeys {
    map: Mutex<HashMap<CancelKey, (OrigDstAddr, CancelKey)>>,
}

impl CancelKeys {
    /// A fresh key of the gateway's own for the target's `key` at `upstream`.
    pub fn issue(&self, upstream: OrigDstAddr, key: CancelKey) -> CancelKey {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let ours = (random_i32(), random_i32());
            if ours.0 > 0 && !map.contains_key(&ours) {
                map.insert(ours, (upstream, key));
                return ours;
            }
        }
    }

    fn lookup(&self, ours: CancelKey) -> Option<(OrigDstAddr, CancelKey)> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&ours)
            .copied()
    }

    /// The session that was issued `ours` has ended.
    pub fn forget(&self, ours: CancelKey) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ours);
    }
}

fn random_i32() -> i32 {
    // A failing system RNG leaves a predictable key; cancel keys are not a security boundary
    // (the target's own key stays with the gateway), so fall back rather than refuse service.
    getrandom::u32().map_or_else(
        |_| i32::try_from(now_micros() & 0x7fff_ffff).unwrap_or(1),
        |v| (v >> 1).cast_signed(),
    )
}

/// Maps a client's CancelRequest to the target's own key and forwards it.
pub async fn cancel(conn: &Conn<'_>, cancels: &CancelKeys, key: CancelKey) -> Outcome {
    let Some((addr, (pid, secret))) = cancels.lookup(key) else {
        // Unknown keys are ignored, as PostgreSQL does: no oracle for guessing keys.
        return Outcome::Refused {
            reason: "cancel request with an unknown key".into(),
        };
    };
    conn.record(EventKind::request(
        "cancel request",
        Some("cancel".into()),
        RecordedVerdict::Allow,
        Vec::new(),
    ));
    match upstream::cancel(addr, pid, secret).await {
        Ok(()) => Outcome::Closed,
        Err(e) => Outcome::UpstreamFailed {
            error: e.to_string(),
        },
    }
}
