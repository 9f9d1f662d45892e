//! Loading, attaching and pinning the eBPF programs, and reading the original destination.
//!
//! Fail closed (the default): maps and links are pinned under the pin directory, so the
//! programs stay attached when the daemon dies and governed connects keep going to the
//! loopback listener, where nothing listens: they are refused, never sent direct. A restarted
//! daemon reuses the pinned maps, attaches its own programs, then unpins the old links.
//!
//! Fail open: nothing is pinned; the links live only as long as the daemon's file descriptors,
//! so the kernel detaches the programs when the daemon exits, even on `kill -9`.

mod elem;
pub mod fast_path;
pub mod rules;
pub mod udp_policy;
pub mod unix;

use std::{
    collections::HashMap as StdHashMap,
    fs, io,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, RingBuf, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, LsmCgroup,
        SkMsg, SockOps,
    },
    Btf, Ebpf, EbpfLoader, Pod,
};
use bulkhead_common::{maps, programs, CaptureConfig, ConnectRecord, SockKey};
use tracing::{info, warn};

use self::rules::CaptureRules;
use crate::net::{to_kernel_bytes, ClientAddr};

/// The eBPF object built by `build.rs`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead-ebpf.o"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("this binary was built with BULKHEAD_SKIP_EBPF=1 and has no eBPF programs; rebuild it without")]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF link of {name}: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is not on a bpf file system (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> EbpfError + '_ {
    move |source| EbpfError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a redirected connection was going and who made it, looked up by the client address
/// the daemon accepted. A trait so the proxy runs in tests without a kernel.
pub trait OrigDst: Send + Sync + 'static {
    /// Takes (and forgets) the record for `client`.
    fn take(&self, client: ClientAddr) -> Option<ConnectRecord>;

    /// Puts the accepted end of a redirected connection in the kernel fast path
    /// ([`fast_path`]), when it is on. Called before the gateway writes to `accepted`; the
    /// connection stays on TCP when this does nothing or fails. `true` when it is in: its
    /// bytes may then arrive outside the TCP receive queue, which only `read(2)` sees.
    fn fast_path(&self, accepted: &tokio::net::TcpStream) -> bool {
        let _ = accepted;
        false
    }
}

/// The kernel's records, from the pinned or owned `CONNECTIONS` map.
pub struct BpfOrigDst {
    /// `CONNECTIONS`, its key and value sizes checked against `SockKey` and `ConnectRecord`.
    map: MapData,
    /// `capture.fast_path` on and its program attached.
    pub fast_path: Option<fast_path::FastPath>,
}

impl OrigDst for BpfOrigDst {
    fn fast_path(&self, accepted: &tokio::net::TcpStream) -> bool {
        let Some(fp) = &self.fast_path else {
            return false;
        };
        let added = fast_path::flow_key(accepted).and_then(|key| fp.add(accepted, key));
        if let Err(e) = &added {
            tracing::debug!(error = %e, "connection stays off the fast path");
        }
        added.is_ok()
    }

    fn take(&self, client: ClientAddr) -> Option<ConnectRecord> {
        let key = SockKey {
            addr: to_kernel_bytes(client.0.ip()),
            port: u32::from(client.0.port()),
        };
        match elem::take(&self.map, &key) {
            Ok(rec) => rec,
            Err(e) => {
                warn!(error = %e, "cannot read the kernel's record of a connection");
                None
            }
        }
    }
}

/// Records set by tests.
#[derive(Default)]
pub struct MockOrigDst {
    records: Mutex<StdHashMap<ClientAddr, ConnectRecord>>,
}

impl MockOrigDst {
    pub fn insert(&self, client: ClientAddr, rec: ConnectRecord) {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(client, rec);
    }
}

impl OrigDst for MockOrigDst {
    fn take(&self, client: ClientAddr) -> Option<ConnectRecord> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&client)
    }
}

/// Which program filters the sockets governed processes open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketFilter {
    /// `lsm_cgroup/socket_create`: every address family.
    Lsm,
    /// `cgroup/sock_create`: inet and inet6 sockets only (no BPF LSM program could be loaded).
    InetOnly,
}

impl SocketFilter {
    pub fn describe(self) -> &'static str {
        match self {
            SocketFilter::Lsm => "every address family (BPF LSM)",
            SocketFilter::InetOnly => {
                "inet and inet6 only: no BPF LSM program could be loaded (the kernel needs \
                 lsm=...,bpf, and some virtual machines refuse it even then), so packet, vsock \
                 and other families are not filtered"
            }
        }
    }
}

/// How the programs are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    FailClosed,
    FailOpen,
}

enum Held {
    Pinned(#[expect(dead_code, reason = "held for its file descriptor")] PinnedLink),
    Owned(
        #[expect(
            dead_code,
            reason = "held for its file descriptor; dropping it detaches"
        )]
        FdLink,
    ),
}

/// The loaded and attached programs. Dropping it closes the daemon's descriptors: in fail-open
/// mode that detaches the programs; in fail-closed mode the pins keep them attached.
pub struct Redirector {
    ebpf: Ebpf,
    _links: Vec<Held>,
    pub mode: Mode,
    pub cgroup: PathBuf,
    pub adopted: usize,
    pub socket_filter: SocketFilter,
    /// Why unix sockets are not governed, when they are not (`cgroup/connect_unix` needs
    /// Linux 6.7).
    pub unix_filter: Result<(), String>,
    /// Fail open: the unix programs' links, held (dropping them detaches).
    _unix_links: Vec<std::os::fd::OwnedFd>,
    /// `capture.fast_path`: `Ok(true)` when its program is attached, or why it is not.
    pub fast_path: Result<bool, String>,
    fast_path_sockets: Option<SockHash<MapData, bulkhead_common::FlowKey>>,
}

impl Redirector {
    /// Loads the programs, fills the maps from `rules`, and attaches to `cgroup`.
    pub fn attach(
        cgroup: &Path,
        rules: &CaptureRules,
        pin_dir: &Path,
        mode: Mode,
        kernel_log_level: u8,
    ) -> Result<Self, EbpfError> {
        if EBPF_OBJECT.is_empty() {
            return Err(EbpfError::NoObject);
        }
        let map_dir = pin_dir.join("maps");
        let link_dir = pin_dir.join("links");
        if mode == Mode::FailClosed {
            ensure_pin_dir(pin_dir)?;
            fs::create_dir_all(&map_dir).map_err(io_err(&map_dir))?;
            fs::create_dir_all(&link_dir).map_err(io_err(&link_dir))?;
        }
        let old_links = pinned_links(pin_dir);

        let mut loader = EbpfLoader::new();
        if mode == Mode::FailClosed {
            for name in maps::ALL {
                loader.map_pin_path(name, map_dir.join(name));
            }
        }
        loader.override_global("AYA_LOG_LEVEL", &kernel_log_level, false);
        let mut ebpf = loader.load(EBPF_OBJECT)?;

        // Before the rules turn `FLAG_FAST_PATH` on: a socket takes the map's programs when
        // it goes in.
        let (fast_path, fast_path_sockets) = if rules.config.has(bulkhead_common::FLAG_FAST_PATH) {
            match attach_fast_path(&mut ebpf) {
                Ok(sockets) => (Ok(true), Some(sockets)),
                Err(e) => {
                    warn!(error = %e, "kernel fast path unavailable; connections use TCP");
                    (Err(e.to_string()), None)
                }
            }
        } else {
            (Ok(false), None)
        };
        let degraded;
        let rules = if fast_path.is_err() {
            degraded = rules.without_fast_path();
            &degraded
        } else {
            rules
        };
        fill_maps(&mut ebpf, rules)?;

        let cgroup_dir = fs::File::open(cgroup).map_err(io_err(cgroup))?;
        let generation = crate::record::now_micros();
        let mut attached = Vec::with_capacity(programs::ALL.len());
        // `Single` means no attach flags. Attached through `bpf_link_create` (kernel 5.7+, which
        // this daemon requires for pinning) cgroup links take no flags and always coexist with
        // other links on the cgroup, including a previous daemon's.
        for name in programs::ALL {
            let program_err = |source| EbpfError::Program { name, source };
            let prog = ebpf.program_mut(name).ok_or(EbpfError::Missing(name))?;
            let link: FdLink = if name == programs::SOCK_OPS {
                let p: &mut SockOps = prog.try_into().map_err(program_err)?;
                p.load().map_err(program_err)?;
                let id = p
                    .attach(&cgroup_dir, CgroupAttachMode::Single)
                    .map_err(program_err)?;
                p.take_link(id)
                    .map_err(program_err)?
                    .try_into()
                    .map_err(|source| EbpfError::Link { name, source })?
            } else {
                let p: &mut CgroupSockAddr = prog.try_into().map_err(program_err)?;
                p.load().map_err(program_err)?;
                let id = p
                    .attach(&cgroup_dir, CgroupAttachMode::Single)
                    .map_err(program_err)?;
                p.take_link(id)
                    .map_err(program_err)?
                    .try_into()
                    .map_err(|source| EbpfError::Link { name, source })?
            };
            attached.push((name, link));
        }
        let (socket_filter, name, link) = attach_socket_filter(&mut ebpf, &cgroup_dir)?;
        attached.push((name, link));
        attached.push((
            programs::UDP_EGRESS,
            attach_udp_egress(&mut ebpf, &cgroup_dir)?,
        ));
        let unix_links = unix::attach(&ebpf, &cgroup_dir);
        // Pinned only once all are attached: a daemon that fails half-way must not leave
        // a partial redirect behind.
        let mut links = Vec::with_capacity(attached.len());
        for (name, link) in attached {
            links.push(match mode {
                Mode::FailClosed => {
                    // bpffs refuses names with dots.
                    let path = link_dir.join(format!("{name}-{generation}"));
                    Held::Pinned(
                        link.pin(&path)
                            .map_err(|source| EbpfError::Pin { path, source })?,
                    )
                }
                Mode::FailOpen => Held::Owned(link),
            });
        }

        let mut unix_held = Vec::new();
        let unix_filter = match unix_links {
            Ok(unix_links) => {
                for (name, link) in unix_links {
                    if mode == Mode::FailClosed {
                        let path = link_dir.join(format!("{name}-{generation}"));
                        unix::pin(&link, &path).map_err(|e| EbpfError::Io {
                            path: path.clone(),
                            source: e,
                        })?;
                    }
                    unix_held.push(link);
                }
                Ok(())
            }
            Err(why) => {
                warn!(reason = %why, "unix sockets are not governed (cgroup/connect_unix unavailable)");
                Err(why)
            }
        };

        // Our programs are attached: the ones a previous daemon left can go. Until now both ran,
        // over the same maps, so there was no moment without a redirect.
        let adopted = old_links.len();
        for old in &old_links {
            if let Err(e) = fs::remove_file(old) {
                warn!(path = %old.display(), error = %e, "cannot unpin a previous daemon's link");
            }
        }
        if mode == Mode::FailOpen {
            // An explicit choice to fail open also drops what a fail-closed run left pinned.
            for name in maps::ALL {
                let _ = fs::remove_file(map_dir.join(name));
            }
        }
        if adopted > 0 {
            info!(
                replaced = adopted,
                "adopted pinned state of a previous daemon"
            );
        }
        Ok(Self {
            ebpf,
            _links: links,
            mode,
            cgroup: cgroup.to_path_buf(),
            adopted,
            socket_filter,
            unix_filter,
            _unix_links: unix_held,
            fast_path,
            fast_path_sockets,
        })
    }

    /// The fast path's handle for the gateway, when it is on.
    pub fn take_fast_path(&mut self) -> Result<Option<fast_path::FastPath>, EbpfError> {
        let Some(sockets) = self.fast_path_sockets.take() else {
            return Ok(None);
        };
        let state = take_hash_map(&mut self.ebpf, maps::FAST_PATH_STATE)?;
        Ok(Some(fast_path::FastPath::new(sockets, state)))
    }

    /// The ring buffer of attempts the kernel refused, for the daemon to record.
    pub fn refusals(&mut self) -> Result<RingBuf<MapData>, EbpfError> {
        let map = self
            .ebpf
            .take_map(maps::REFUSALS)
            .ok_or(EbpfError::Missing(maps::REFUSALS))?;
        RingBuf::try_from(map).map_err(|source| EbpfError::Map {
            name: maps::REFUSALS,
            source,
        })
    }

    /// The original-destination source over this redirector's `CONNECTIONS` map.
    pub fn orig_dst(&mut self) -> Result<BpfOrigDst, EbpfError> {
        let map = self
            .ebpf
            .take_map(maps::CONNECTIONS)
            .ok_or(EbpfError::Missing(maps::CONNECTIONS))?;
        let checked: Result<HashMap<&MapData, SockKey, ConnectRecord>, _> = (&map).try_into();
        if let Err(source) = checked {
            return Err(EbpfError::Map {
                name: maps::CONNECTIONS,
                source,
            });
        }
        let (Map::HashMap(map) | Map::LruHashMap(map)) = map else {
            unreachable!("a map that converts to a HashMap is a hash map");
        };
        Ok(BpfOrigDst {
            map,
            fast_path: None,
        })
    }

    /// Sets `UDP_ALLOW` to `rules`' entries plus `extra` direct destinations (the policy's),
    /// adding before removing, so no destination allowed before and after is refused in
    /// between, and without touching the other maps.
    pub fn sync_udp_allow(
        &mut self,
        rules: &CaptureRules,
        extra: &[rules::UdpEntry],
    ) -> Result<(), EbpfError> {
        let name = maps::UDP_ALLOW;
        let mut trie: LpmTrie<&mut MapData, [u8; bulkhead_common::UDP_KEY_BYTES], u8> =
            LpmTrie::try_from(map_mut(&mut self.ebpf, name)?).map_err(map_err(name))?;
        let wanted: Vec<(rules::UdpEntry, u8)> = extra
            .iter()
            .map(|e| (*e, bulkhead_common::UDP_DIRECT))
            .chain(rules.udp_entries())
            .collect();
        for ((key, prefix), value) in &wanted {
            trie.insert(&Key::new(*prefix, *key), *value, 0)
                .map_err(map_err(name))?;
        }
        let old: Vec<Key<_>> = trie
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(name))?;
        for k in &old {
            if !wanted
                .iter()
                .any(|((key, prefix), _)| *prefix == k.prefix_len() && *key == k.data())
            {
                trie.remove(k).map_err(map_err(name))?;
            }
        }
        Ok(())
    }

    /// The datagram counters and their owners, for the daemon to record.
    pub fn udp_flows(&mut self) -> Result<crate::udp_flows::FlowMaps, EbpfError> {
        Ok(crate::udp_flows::FlowMaps {
            owners: take_hash_map(&mut self.ebpf, maps::UDP_OWNER)?,
            flows: take_hash_map(&mut self.ebpf, maps::UDP_FLOWS)?,
        })
    }

    /// The DNS forwarder's view of the kernel's records of queries (`DNS_BY_COOKIE`).
    pub fn dns_origin(&mut self) -> Result<crate::dns::BpfDnsOrigin, EbpfError> {
        let map = self
            .ebpf
            .take_map(maps::DNS_BY_COOKIE)
            .ok_or(EbpfError::Missing(maps::DNS_BY_COOKIE))?;
        let map = HashMap::try_from(map).map_err(|source| EbpfError::Map {
            name: maps::DNS_BY_COOKIE,
            source,
        })?;
        Ok(crate::dns::BpfDnsOrigin {
            map: Mutex::new(map),
        })
    }

    /// The kernel log reader (aya-log), to be polled by the daemon.
    pub fn logger(
        &mut self,
    ) -> Result<aya_log::EbpfLogger<&'static dyn log_facade::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
    }

    /// Rewrites the capture rules in place (configuration reload).
    pub fn update_rules(&mut self, rules: &CaptureRules) -> Result<(), EbpfError> {
        if self.fast_path != Ok(true) {
            return fill_maps(&mut self.ebpf, &rules.without_fast_path());
        }
        fill_maps(&mut self.ebpf, rules)
    }
}

use log as log_facade;

/// Attaches the socket filter: the BPF LSM program where the kernel runs BPF LSM programs,
/// else the inet-only `cgroup/sock_create` one.
fn attach_socket_filter(
    ebpf: &mut Ebpf,
    cgroup_dir: &fs::File,
) -> Result<(SocketFilter, &'static str, FdLink), EbpfError> {
    let lsm = (|| -> Result<FdLink, String> {
        let btf = Btf::from_sys_fs().map_err(|e| e.to_string())?;
        let prog = ebpf
            .program_mut(programs::SOCKET_CREATE)
            .ok_or("missing from the object")?;
        let p: &mut LsmCgroup = prog
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        p.load("socket_create", &btf).map_err(|e| e.to_string())?;
        let id = p.attach(cgroup_dir).map_err(|e| e.to_string())?;
        Ok(p.take_link(id).map_err(|e| e.to_string())?.into())
    })();
    match lsm {
        Ok(link) => Ok((SocketFilter::Lsm, programs::SOCKET_CREATE, link)),
        Err(why) => {
            warn!(
                reason = %why,
                "BPF LSM socket filter unavailable; filtering inet sockets only (packet, vsock \
                 and other families are not filtered)"
            );
            let name = programs::SOCK_CREATE;
            let program_err = |source| EbpfError::Program { name, source };
            let prog = ebpf.program_mut(name).ok_or(EbpfError::Missing(name))?;
            let p: &mut CgroupSock = prog.try_into().map_err(program_err)?;
            p.load().map_err(program_err)?;
            let id = p
                .attach(cgroup_dir, CgroupAttachMode::Single)
                .map_err(program_err)?;
            let link = p
                .take_link(id)
                .map_err(program_err)?
                .try_into()
                .map_err(|source| EbpfError::Link { name, source })?;
            Ok((SocketFilter::InetOnly, name, link))
        }
    }
}

fn take_hash_map<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, EbpfError> {
    let map = ebpf.take_map(name).ok_or(EbpfError::Missing(name))?;
    HashMap::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// Loads the fast path's `sk_msg` program and attaches it to `FAST_PATH` (the map holds it,
/// not a cgroup). Returns the map, for the daemon to put accepted sockets in.
fn attach_fast_path(
    ebpf: &mut Ebpf,
) -> Result<SockHash<MapData, bulkhead_common::FlowKey>, EbpfError> {
    let name = programs::FAST_PATH_MSG;
    let program_err = |source| EbpfError::Program { name, source };
    let map = ebpf
        .take_map(maps::FAST_PATH)
        .ok_or(EbpfError::Missing(maps::FAST_PATH))?;
    let sockets: SockHash<MapData, bulkhead_common::FlowKey> =
        SockHash::try_from(map).map_err(map_err(maps::FAST_PATH))?;
    let prog = ebpf.program_mut(name).ok_or(EbpfError::Missing(name))?;
    let p: &mut SkMsg = prog.try_into().map_err(program_err)?;
    p.load().map_err(program_err)?;
    p.attach(sockets.fd()).map_err(program_err)?;
    Ok(sockets)
}

/// Attaches the datagram counter (`cgroup_skb/egress`).
fn attach_udp_egress(ebpf: &mut Ebpf, cgroup_dir: &fs::File) -> Result<FdLink, EbpfError> {
    let name = programs::UDP_EGRESS;
    let program_err = |source| EbpfError::Program { name, source };
    let prog = ebpf.program_mut(name).ok_or(EbpfError::Missing(name))?;
    let p: &mut CgroupSkb = prog.try_into().map_err(program_err)?;
    p.load().map_err(program_err)?;
    let id = p
        .attach(
            cgroup_dir,
            CgroupSkbAttachType::Egress,
            CgroupAttachMode::Single,
        )
        .map_err(program_err)?;
    p.take_link(id)
        .map_err(program_err)?
        .try_into()
        .map_err(|source| EbpfError::Link { name, source })
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, EbpfError> {
    ebpf.map_mut(name).ok_or(EbpfError::Missing(name))
}

/// Writes the rules: configuration not-ready first, then every rule map (replacing what a
/// previous daemon left), then the configuration ready.
fn fill_maps(ebpf: &mut Ebpf, rules: &CaptureRules) -> Result<(), EbpfError> {
    {
        let mut cfg: Array<&mut MapData, CaptureConfig> =
            Array::try_from(map_mut(ebpf, maps::CAPTURE_CONFIG)?)
                .map_err(map_err(maps::CAPTURE_CONFIG))?;
        cfg.set(0, rules.not_ready(), 0)
            .map_err(map_err(maps::CAPTURE_CONFIG))?;
    }
    replace_trie(ebpf, maps::EXCLUDE_V4, &rules.exclude_v4)?;
    replace_trie(ebpf, maps::EXCLUDE_V6, &rules.exclude_v6)?;
    replace_trie(ebpf, maps::INCLUDE_V4, &rules.include_v4)?;
    replace_trie(ebpf, maps::INCLUDE_V6, &rules.include_v6)?;
    replace_set(ebpf, maps::EXCLUDE_PORTS, &rules.exclude_ports)?;
    replace_set(ebpf, maps::GOVERNED_UIDS, &rules.uids)?;
    replace_udp_allow(ebpf, rules)?;
    replace_set(ebpf, maps::UNIX_ALLOW, &rules.unix_allow)?;
    let mut cfg: Array<&mut MapData, CaptureConfig> =
        Array::try_from(map_mut(ebpf, maps::CAPTURE_CONFIG)?)
            .map_err(map_err(maps::CAPTURE_CONFIG))?;
    cfg.set(0, rules.config, 0)
        .map_err(map_err(maps::CAPTURE_CONFIG))?;
    Ok(())
}

fn replace_trie<K: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[(K, u32)],
) -> Result<(), EbpfError> {
    let mut trie: LpmTrie<&mut MapData, K, u8> =
        LpmTrie::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    let old: Vec<Key<K>> = trie
        .keys()
        .collect::<Result<_, _>>()
        .map_err(map_err(name))?;
    for k in &old {
        trie.remove(k).map_err(map_err(name))?;
    }
    for (addr, prefix) in entries {
        trie.insert(&Key::new(*prefix, *addr), 1, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

/// `UDP_ALLOW` with each entry's value (a direct destination or a resolver). An entry written
/// twice keeps the last value: resolvers come last.
fn replace_udp_allow(ebpf: &mut Ebpf, rules: &CaptureRules) -> Result<(), EbpfError> {
    let name = maps::UDP_ALLOW;
    let mut trie: LpmTrie<&mut MapData, [u8; bulkhead_common::UDP_KEY_BYTES], u8> =
        LpmTrie::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    let old: Vec<Key<_>> = trie
        .keys()
        .collect::<Result<_, _>>()
        .map_err(map_err(name))?;
    for k in &old {
        trie.remove(k).map_err(map_err(name))?;
    }
    for ((key, prefix), value) in rules.udp_entries() {
        trie.insert(&Key::new(prefix, key), value, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

fn replace_set<K: Pod + Eq + std::hash::Hash>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[K],
) -> Result<(), EbpfError> {
    let mut set: HashMap<&mut MapData, K, u8> =
        HashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    let old: Vec<K> = set
        .keys()
        .collect::<Result<_, _>>()
        .map_err(map_err(name))?;
    for k in &old {
        set.remove(k).map_err(map_err(name))?;
    }
    for k in entries {
        set.insert(k, 1, 0).map_err(map_err(name))?;
    }
    Ok(())
}

/// Where the pinned programs send governed connects, from the pinned `CAPTURE_CONFIG`:
/// `(IPv4 listener, IPv6 listener or None, port, ready)`. `None` when nothing is pinned.
pub fn pinned_redirect(
    pin_dir: &Path,
) -> Option<Result<(std::net::Ipv4Addr, Option<std::net::Ipv6Addr>, u16, bool), EbpfError>> {
    let path = pin_dir.join("maps").join(maps::CAPTURE_CONFIG);
    if !path.exists() {
        return None;
    }
    let read = || -> Result<_, EbpfError> {
        let data = MapData::from_pin(&path).map_err(map_err(maps::CAPTURE_CONFIG))?;
        let array: Array<MapData, CaptureConfig> =
            Array::try_from(aya::maps::Map::Array(data)).map_err(map_err(maps::CAPTURE_CONFIG))?;
        let cfg = array.get(&0, 0).map_err(map_err(maps::CAPTURE_CONFIG))?;
        let v6 = std::net::Ipv6Addr::from(cfg.listener_v6);
        Ok((
            std::net::Ipv4Addr::from(cfg.listener_v4),
            (!v6.is_unspecified()).then_some(v6),
            cfg.listener_port,
            cfg.has(bulkhead_common::FLAG_READY),
        ))
    };
    Some(read())
}

/// Empties the pinned `CONNECTIONS` map (records of redirected connections nobody accepted)
/// and returns how many went. Nothing pinned: nothing to do.
pub fn clear_stale_records(pin_dir: &Path) -> Result<usize, EbpfError> {
    let path = pin_dir.join("maps").join(maps::CONNECTIONS);
    if !path.exists() {
        return Ok(0);
    }
    let data = MapData::from_pin(&path).map_err(map_err(maps::CONNECTIONS))?;
    let mut map: HashMap<MapData, SockKey, ConnectRecord> =
        HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_err(maps::CONNECTIONS))?;
    let keys: Vec<SockKey> = map.keys().filter_map(Result::ok).collect();
    for k in &keys {
        let _ = map.remove(k);
    }
    Ok(keys.len())
}

/// Links pinned under `pin_dir/links` (by this or a previous daemon).
pub fn pinned_links(pin_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(pin_dir.join("links"))
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// Removes what a fail-closed daemon left pinned in `pin_dir` (links first, which detaches
/// the programs from the governed cgroup, then maps), and the directory. Returns how many
/// links were removed. The caller makes sure no daemon runs (it holds the directory's lock).
pub fn remove_pins(pin_dir: &Path) -> Result<usize, EbpfError> {
    let links = pinned_links(pin_dir);
    for link in &links {
        fs::remove_file(link).map_err(io_err(link))?;
    }
    for dir in [pin_dir.join("links"), pin_dir.join("maps")] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
        fs::remove_dir(&dir).map_err(io_err(&dir))?;
    }
    match fs::remove_dir(pin_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(pin_dir)(e)),
        _ => Ok(links.len()),
    }
}

/// Makes sure `pin_dir` exists on bpffs, mounting bpffs at `/sys/fs/bpf` when the pin
/// directory is under it and nothing is mounted there (hosts without systemd).
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<(), EbpfError> {
    let sys_fs_bpf = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(sys_fs_bpf) && !is_bpffs(sys_fs_bpf) {
        fs::create_dir_all(sys_fs_bpf).map_err(io_err(sys_fs_bpf))?;
        // SAFETY: all arguments are valid NUL-terminated strings; data may be null.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(EbpfError::Io {
                path: sys_fs_bpf.to_path_buf(),
                source: io::Error::last_os_error(),
            });
        }
        info!("mounted bpffs at /sys/fs/bpf");
    }
    fs::create_dir_all(pin_dir).map_err(io_err(pin_dir))?;
    if is_bpffs(pin_dir) {
        Ok(())
    } else {
        Err(EbpfError::NotBpffs(pin_dir.to_path_buf()))
    }
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid C string and `st` a properly sized out-parameter.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &raw mut st) == 0 && i64::from(st.f_type) == BPF_FS_MAGIC
    }
}
