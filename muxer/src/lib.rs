//! muxer: one public port for SSH, HTTP and TLS.
//!
//! The data path in the order a connection meets it: [`listener`] (accept, [`limits`],
//! [`steering`] between workers) →
//! [`sniff`] (probes over the first bytes) → [`connection`] (route decision and dispatch) →
//! [`splice`] (layer-4 forwarding). [`daemon`] ties them together for `muxer run`.

pub mod accept_errors;
pub mod affinity;
pub mod client_source;
pub mod config;
pub mod connection;
pub mod control;
pub mod daemon;
pub mod ebpf;
pub mod http;
pub mod install;
pub mod internal_ports;
pub mod limits;
pub mod listener;
pub mod log_limit;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod policy_routing;
pub mod proxy_protocol;
pub mod redirect;
pub mod runtime;
pub mod sniff;
pub mod splice;
pub mod stats;
pub mod stats_view;
pub mod steering;
pub mod tls_router;
pub mod workers;
