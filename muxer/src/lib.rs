//! muxer: one public port for SSH, HTTP and TLS.
//!
//! The data path in the order a connection meets it: [`listener`] (accept, [`limits`],
//! [`steering`] between workers) →
//! [`sniff`] (probes over the first bytes) → [`connection`] (route decision and dispatch) →
//! [`splice`] (layer-4 forwarding). [`daemon`] ties them together for `muxer run`.

pub(crate) mod accept_errors;
pub(crate) mod address_text;
pub mod affinity;
pub mod certs;
pub(crate) mod client_source;
pub mod config;
pub(crate) mod connection;
pub mod control;
pub mod daemon;
pub(crate) mod ebpf;
pub(crate) mod exporter;
pub mod handover;
pub mod http;
pub mod install;
pub(crate) mod internal_ports;
pub(crate) mod limits;
pub(crate) mod listener;
pub(crate) mod log_format;
pub(crate) mod log_limit;
pub mod logging;
pub mod memory;
pub mod metrics;
pub(crate) mod policy_routing;
pub mod proxy_protocol;
pub mod redirect;
pub(crate) mod runtime;
pub mod sniff;
pub(crate) mod sockets;
pub(crate) mod splice;
pub(crate) mod stats;
pub mod stats_view;
pub mod steering;
pub(crate) mod tls_router;
pub mod tls_termination;
pub(crate) mod workers;
