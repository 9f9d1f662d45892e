//! The kernel fast path for the loopback hop (`capture.fast_path`).
//!
//! A redirected connection has two sockets on this host: the governed process's, and the one
//! the gateway accepted. `sock_ops` puts the governed one in `FAST_PATH` when it is
//! established; [`FastPath::add`] puts the accepted one there before the gateway writes a byte.
//! The `sk_msg` program attached to the map then moves each send of either end straight into
//! the other end's receive queue (`bpf_msg_redirect_hash`, `BPF_F_INGRESS`), skipping the
//! loopback TCP stack. The gateway still reads every byte: it is the peer. Addresses,
//! `getpeername()` and the gateway's decisions are unchanged.
//!
//! Order is kept per direction: a socket whose first send found no peer in the map (the
//! governed client that spoke before the gateway accepted) keeps sending through TCP for the
//! whole connection, since a redirected send would be read before older bytes still in the
//! peer's TCP receive queue. Leaving the fast path (the peer is gone) is always safe.

use std::{os::fd::AsRawFd, path::Path, sync::Mutex};

use aya::maps::{HashMap, MapData, PerCpuArray, SockHash};
use bulkhead_common::{
    maps, FlowKey, FAST_PATH_STATS_LEN, FAST_PATH_STAT_CLIENTS, FAST_PATH_STAT_CLIENT_FAILED,
    FAST_PATH_STAT_PASSED, FAST_PATH_STAT_PASSED_BYTES, FAST_PATH_STAT_REDIRECTED,
    FAST_PATH_STAT_REDIRECTED_BYTES, FAST_PATH_UNDECIDED,
};
use serde::{Deserialize, Serialize};

use super::EbpfError;
use crate::net::to_kernel_bytes;

/// The daemon's handle on `FAST_PATH` and `FAST_PATH_STATE`.
pub struct FastPath {
    sockets: Mutex<SockHash<MapData, FlowKey>>,
    state: Mutex<HashMap<MapData, FlowKey, u32>>,
}

/// Why an accepted socket stays on the ordinary path.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("socket address: {0}")]
    Address(std::io::Error),
    #[error("{map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
}

impl FastPath {
    pub(super) fn new(
        sockets: SockHash<MapData, FlowKey>,
        state: HashMap<MapData, FlowKey, u32>,
    ) -> Self {
        Self {
            sockets: Mutex::new(sockets),
            state: Mutex::new(state),
        }
    }

    /// Puts an accepted socket in the fast path. Call before the gateway writes to it; on an
    /// error the connection simply stays on TCP (the socket is not in the map).
    pub fn add(&self, accepted: &impl AsRawFd, key: FlowKey) -> Result<(), FastPathError> {
        // The state first: the program sends through TCP for a socket without one.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, FAST_PATH_UNDECIDED, 0)
            .map_err(|source| FastPathError::Map {
                map: maps::FAST_PATH_STATE,
                source,
            })?;
        // The kernel refuses a socket that is no longer established (the client already
        // closed): it stays on TCP.
        self.sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, accepted.as_raw_fd(), 0)
            .map_err(|source| FastPathError::Map {
                map: maps::FAST_PATH,
                source,
            })
    }
}

/// The key of an accepted TCP socket: its own 4-tuple.
pub fn flow_key(stream: &tokio::net::TcpStream) -> Result<FlowKey, FastPathError> {
    let local = stream.local_addr().map_err(FastPathError::Address)?;
    let remote = stream.peer_addr().map_err(FastPathError::Address)?;
    Ok(FlowKey {
        local_addr: to_kernel_bytes(local.ip()),
        remote_addr: to_kernel_bytes(remote.ip()),
        local_port: u32::from(local.port()),
        remote_port: u32::from(remote.port()),
    })
}

/// What the fast path did since its maps were created (summed over CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FastPathCounters {
    /// Sends moved straight to the peer socket, and their bytes.
    pub redirected: u64,
    pub redirected_bytes: u64,
    /// Sends of sockets in the map that went through TCP (no peer, or not from the start).
    pub passed: u64,
    pub passed_bytes: u64,
    /// Governed sockets put in the map, and those that could not be.
    pub governed_sockets: u64,
    pub governed_failed: u64,
}

/// Reads the counters from an open `FAST_PATH_STATS`.
pub(super) fn read_counters(
    stats: &PerCpuArray<MapData, u64>,
) -> Result<FastPathCounters, aya::maps::MapError> {
    let mut sums = [0u64; FAST_PATH_STATS_LEN as usize];
    for (i, sum) in (0u32..).zip(sums.iter_mut()) {
        *sum = stats.get(&i, 0)?.iter().copied().fold(0, u64::wrapping_add);
    }
    let at = |i: u32| sums[i as usize];
    Ok(FastPathCounters {
        redirected: at(FAST_PATH_STAT_REDIRECTED),
        redirected_bytes: at(FAST_PATH_STAT_REDIRECTED_BYTES),
        passed: at(FAST_PATH_STAT_PASSED),
        passed_bytes: at(FAST_PATH_STAT_PASSED_BYTES),
        governed_sockets: at(FAST_PATH_STAT_CLIENTS),
        governed_failed: at(FAST_PATH_STAT_CLIENT_FAILED),
    })
}

/// The counters of the pinned `FAST_PATH_STATS` (a fail-closed daemon's); `None` when nothing
/// is pinned.
pub fn pinned_counters(pin_dir: &Path) -> Option<Result<FastPathCounters, EbpfError>> {
    let path = pin_dir.join("maps").join(maps::FAST_PATH_STATS);
    if !path.exists() {
        return None;
    }
    let read = || -> Result<FastPathCounters, EbpfError> {
        let err = |source| EbpfError::Map {
            name: maps::FAST_PATH_STATS,
            source,
        };
        let data = MapData::from_pin(&path).map_err(err)?;
        let stats: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(err)?;
        read_counters(&stats).map_err(err)
    };
    Some(read())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accepted end's key is the connecting end's, mirrored: what the `sk_msg` program
    /// looks up for the peer of a sending socket.
    #[tokio::test]
    async fn the_accepted_key_mirrors_the_connecting_one() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = tokio::net::TcpListener::bind(addr).await else {
                continue; // no IPv6 loopback here
            };
            let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            let (c, a) = (flow_key(&client).unwrap(), flow_key(&accepted).unwrap());
            assert_eq!(c.mirrored(), a);
            assert_eq!(
                a.local_port,
                u32::from(listener.local_addr().unwrap().port())
            );
            assert_ne!(c, a);
        }
    }
}
