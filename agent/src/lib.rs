//! Bulkhead: a host agent that puts every outbound connection of a governed process through a
//! local gateway. See `docs/ARCHITECTURE.md` for the data path.

pub mod account;
pub mod approval;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod conn_log;
pub mod control;
pub mod credentials;
pub mod daemon;
pub mod dns;
pub mod ebpf;
pub mod exclusive;
pub mod identity;
pub mod kube;
pub mod net;
pub mod policy;
pub mod privilege;
pub mod protocol;
pub mod proxy;
pub mod record;
pub mod refusals;
pub mod text;
pub mod tls;
pub mod udp_flows;
