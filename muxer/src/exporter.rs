//! The metrics endpoint: the router's per-request metrics ([`crate::metrics`]) plus the daemon's
//! and the kernel's counters, read from the control state at scrape time, served as OpenMetrics
//! text on `[metrics] listen` (off by default). Only the daemon uses this module: the data path
//! records into `metrics` and never reaches the exporter.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::accept_errors::back_off;
use crate::control::ControlState;
use crate::log_limit::LogLimit;
use crate::metrics::HttpMetrics;

/// Every metric of the daemon, registered for scraping.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
}

/// Reads the daemon's and kernel's counters when scraped.
#[derive(Debug)]
struct CountersCollector {
    control: Arc<ControlState>,
}

impl prometheus_client::collector::Collector for CountersCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let report = self.control.report();
        let daemon = &report.daemon;
        let routes = &daemon.routes;
        type Pick = fn(&crate::stats::RouteSnapshot) -> u64;
        let per_protocol: [(&str, &str, MetricType, Pick); 4] = [
            (
                "muxer_connections_open",
                "Connections open now",
                MetricType::Gauge,
                |r| r.open,
            ),
            (
                "muxer_connections",
                "Connections accepted",
                MetricType::Counter,
                |r| r.total,
            ),
            (
                "muxer_received_bytes",
                "Bytes from clients",
                MetricType::Counter,
                |r| r.bytes_in,
            ),
            (
                "muxer_sent_bytes",
                "Bytes to clients",
                MetricType::Counter,
                |r| r.bytes_out,
            ),
        ];
        for (name, help, kind, pick) in per_protocol {
            let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
            for (protocol, snapshot) in routes {
                let labels = [("protocol", protocol.as_str())];
                let family = metric.encode_family(&labels)?;
                if matches!(kind, MetricType::Gauge) {
                    ConstGauge::new(pick(snapshot) as i64).encode(family)?;
                } else {
                    ConstCounter::new(pick(snapshot)).encode(family)?;
                }
            }
        }
        let probe = encoder.encode_descriptor(
            "muxer_probe_outcomes",
            "Sniffing outcomes",
            None,
            MetricType::Counter,
        )?;
        let mut probe = probe;
        let unknown = routes.get("unknown").map_or(0, |r| r.total);
        for (outcome, value) in [("timeout", daemon.probe_timeouts), ("unknown", unknown)] {
            ConstCounter::new(value).encode(probe.encode_family(&[("outcome", outcome)])?)?;
        }
        let mut classes = encoder.encode_descriptor(
            "muxer_class_connections",
            "Open connections per class",
            None,
            MetricType::Gauge,
        )?;
        for (class, snapshot) in &daemon.classes {
            ConstGauge::new(snapshot.open as i64)
                .encode(classes.encode_family(&[("class", class.as_str())])?)?;
        }
        let mut limits = encoder.encode_descriptor(
            "muxer_class_limit",
            "Connections each class may hold (the size of the pool it shares)",
            None,
            MetricType::Gauge,
        )?;
        for (class, snapshot) in &daemon.classes {
            ConstGauge::new(snapshot.limit as i64)
                .encode(limits.encode_family(&[("class", class.as_str())])?)?;
        }
        for (name, help, label, values) in [
            (
                "muxer_refused",
                "Connections refused, or idle ones closed, per reason",
                "reason",
                &daemon.refused,
            ),
            (
                "muxer_timeouts",
                "Connections or request bodies ended per kind of timeout",
                "kind",
                &daemon.timeouts,
            ),
        ] {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (key, value) in values {
                ConstCounter::new(*value)
                    .encode(metric.encode_family(&[(label, key.as_str())])?)?;
            }
        }
        for (name, help, value) in [
            (
                "muxer_upstream_connect_errors",
                "Backends that could not be reached",
                daemon.upstream_connect_errors,
            ),
            (
                "muxer_no_route",
                "Connections closed for want of a route",
                daemon.no_route,
            ),
        ] {
            ConstCounter::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        ConstGauge::new(daemon.http_parked as i64).encode(encoder.encode_descriptor(
            "muxer_http_parked_connections",
            "HTTP/1.1 connections idle between requests, parked without buffers",
            None,
            MetricType::Gauge,
        )?)?;
        if !daemon.workers.is_empty() {
            let mut metric = encoder.encode_descriptor(
                "muxer_worker_connections",
                "Connections each worker thread serves now",
                None,
                MetricType::Gauge,
            )?;
            for (index, worker) in daemon.workers.iter().enumerate() {
                let index = index.to_string();
                ConstGauge::new(worker.connections as i64)
                    .encode(metric.encode_family(&[("worker", index.as_str())])?)?;
            }
        }
        if let Some(kernel) = &report.kernel {
            let mut metric = encoder.encode_descriptor(
                "muxer_kernel_packets",
                "Kernel redirect counters",
                None,
                MetricType::Counter,
            )?;
            for (counter, value) in &kernel.global {
                ConstCounter::new(*value)
                    .encode(metric.encode_family(&[("counter", counter.as_str())])?)?;
            }
            for (name, help) in [
                (
                    "muxer_kernel_port_packets",
                    "Packets rewritten per public port and direction",
                ),
                (
                    "muxer_kernel_port_bytes",
                    "Bytes rewritten per public port and direction",
                ),
            ] {
                let mut metric =
                    encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                for port in &kernel.ports {
                    let port_label = port.port.to_string();
                    let (inbound, outbound) = if name.ends_with("packets") {
                        (port.in_packets, port.out_packets)
                    } else {
                        (port.in_bytes, port.out_bytes)
                    };
                    for (direction, value) in [("in", inbound), ("out", outbound)] {
                        let labels = [("port", port_label.as_str()), ("direction", direction)];
                        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Metrics {
    /// The registry with `http`'s metrics and a collector reading `control`'s counters.
    pub(crate) fn new(control: Arc<ControlState>, http: &HttpMetrics) -> Metrics {
        let mut registry = Registry::default();
        http.register(&mut registry);
        registry.register_collector(Box::new(CountersCollector { control }));
        Metrics { registry }
    }

    /// The OpenMetrics text of every metric.
    pub(crate) fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String");
        text
    }
}

/// Longest wait for a metrics request's head, idle keep-alive included.
pub(crate) const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    static WARNING: LogLimit = LogLimit::per(Duration::from_secs(1));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                back_off(&error, "metrics endpoint", &WARNING).await;
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let metrics = Arc::clone(&metrics);
                    async move {
                        let response = if request.uri().path() == "/metrics" {
                            Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(metrics.render())))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"try /metrics\n")))
                        };
                        Ok::<_, std::convert::Infallible>(response.expect("static response"))
                    }
                });
            // A client that connects and sends nothing (or trickles its head) is closed after
            // METRICS_HEADER_TIMEOUT, like any other client of muxer.
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, %error, "metrics connection failed");
            }
        });
    }
}

/// Binds the metrics address, warning (not failing) when it cannot.
pub(crate) async fn bind(address: SocketAddr) -> Option<TcpListener> {
    match TcpListener::bind(address).await {
        Ok(listener) => Some(listener),
        Err(error) => {
            warn!(%address, %error, "metrics endpoint unavailable");
            None
        }
    }
}

/// The metrics socket a previous process bound and handed over.
pub(crate) fn adopt(listener: std::net::TcpListener) -> Option<TcpListener> {
    let registered = listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener));
    match registered {
        Ok(listener) => Some(listener),
        Err(error) => {
            warn!(%error, "metrics endpoint unavailable: the handed-over socket failed");
            None
        }
    }
}
