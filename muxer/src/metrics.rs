//! Prometheus metrics: HTTP request counts and latency histograms recorded as requests finish,
//! plus the daemon's and the kernel's counters read at scrape time. Served as OpenMetrics text on
//! `[metrics] listen` (off by default).
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::accept_errors::back_off;
use crate::control::ControlState;
use crate::log_limit::LogLimit;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms … ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// What the HTTP router records per request.
#[derive(Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    upstream_latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    ttfb: Family<RouteLabels, Histogram, fn() -> Histogram>,
}

impl Default for HttpMetrics {
    /// Families not yet in any registry.
    fn default() -> HttpMetrics {
        HttpMetrics {
            requests: Family::default(),
            upstream_latency: Family::new_with_constructor(latency_histogram),
            ttfb: Family::new_with_constructor(latency_histogram),
        }
    }
}

/// Status codes [`RouteMetrics`] keeps a counter handle for (all valid ones).
const STATUSES: std::ops::Range<u16> = 100..600;

/// One route's metric series, looked up once each and then reused: a per-request lookup would
/// hash and allocate the route label three times for every request.
#[derive(Debug)]
pub struct RouteMetrics {
    route: String,
    metrics: Arc<HttpMetrics>,
    requests: Box<[OnceLock<Counter>]>,
    upstream_latency: OnceLock<Histogram>,
    ttfb: OnceLock<Histogram>,
}

impl RouteMetrics {
    /// Handles for `route`'s series in `metrics`, each created on first use.
    pub fn new(metrics: Arc<HttpMetrics>, route: &str) -> RouteMetrics {
        RouteMetrics {
            route: route.to_owned(),
            metrics,
            requests: STATUSES.map(|_| OnceLock::new()).collect(),
            upstream_latency: OnceLock::new(),
            ttfb: OnceLock::new(),
        }
    }

    /// Counts one finished request, as [`HttpMetrics::record`] does.
    pub fn record(&self, status: u16, upstream: Option<Duration>, ttfb: Option<Duration>) {
        let Some(slot) = status
            .checked_sub(STATUSES.start)
            .and_then(|index| self.requests.get(usize::from(index)))
        else {
            self.metrics.record(&self.route, status, upstream, ttfb);
            return;
        };
        slot.get_or_init(|| {
            self.metrics
                .requests
                .get_or_create(&RequestLabels {
                    route: self.route.clone(),
                    status,
                })
                .clone()
        })
        .inc();
        let labels = || RouteLabels {
            route: self.route.clone(),
        };
        if let Some(upstream) = upstream {
            self.upstream_latency
                .get_or_init(|| {
                    self.metrics
                        .upstream_latency
                        .get_or_create(&labels())
                        .clone()
                })
                .observe(upstream.as_secs_f64());
        }
        if let Some(ttfb) = ttfb {
            self.ttfb
                .get_or_init(|| self.metrics.ttfb.get_or_create(&labels()).clone())
                .observe(ttfb.as_secs_f64());
        }
    }
}

impl HttpMetrics {
    /// Counts one finished request: its status, the time the upstream took to answer (absent for
    /// local answers), and the time to the first response byte.
    pub fn record(
        &self,
        route: &str,
        status: u16,
        upstream: Option<Duration>,
        ttfb: Option<Duration>,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                status,
            })
            .inc();
        let labels = RouteLabels {
            route: route.to_owned(),
        };
        if let Some(upstream) = upstream {
            self.upstream_latency
                .get_or_create(&labels)
                .observe(upstream.as_secs_f64());
        }
        if let Some(ttfb) = ttfb {
            self.ttfb.get_or_create(&labels).observe(ttfb.as_secs_f64());
        }
    }
}

/// Every metric of the daemon.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The router's per-request metrics.
    pub http: Arc<HttpMetrics>,
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
    /// The registry with the HTTP metrics and a collector reading `control`'s counters.
    pub fn new(control: Arc<ControlState>) -> Metrics {
        let mut registry = Registry::default();
        let http = Arc::new(HttpMetrics::default());
        registry.register(
            "muxer_http_requests",
            "HTTP requests by route and status",
            http.requests.clone(),
        );
        registry.register(
            "muxer_http_upstream_response_seconds",
            "Time from sending a request upstream to its response head",
            http.upstream_latency.clone(),
        );
        registry.register(
            "muxer_http_time_to_first_byte_seconds",
            "Time from a request's arrival to the first response byte",
            http.ttfb.clone(),
        );
        registry.register_collector(Box::new(CountersCollector { control }));
        Metrics { registry, http }
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String");
        text
    }
}

/// Longest wait for a metrics request's head, idle keep-alive included.
pub const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
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
pub async fn bind(address: SocketAddr) -> Option<TcpListener> {
    match TcpListener::bind(address).await {
        Ok(listener) => Some(listener),
        Err(error) => {
            warn!(%address, %error, "metrics endpoint unavailable");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    fn registry(http: &HttpMetrics) -> Registry {
        let mut registry = Registry::default();
        registry.register("req", "r", http.requests.clone());
        registry.register("up", "u", http.upstream_latency.clone());
        registry.register("ttfb", "t", http.ttfb.clone());
        registry
    }

    #[test]
    fn route_handles_count_into_the_same_series_as_lookups() {
        let http = Arc::new(HttpMetrics::default());
        let route = RouteMetrics::new(Arc::clone(&http), "llm");
        route.record(
            200,
            Some(Duration::from_millis(3)),
            Some(Duration::from_millis(4)),
        );
        route.record(
            200,
            Some(Duration::from_millis(3)),
            Some(Duration::from_millis(4)),
        );
        http.record("llm", 200, Some(Duration::from_millis(3)), None);
        route.record(502, None, Some(Duration::from_millis(1)));
        // Out of range: counted through the lookup path, not dropped.
        route.record(999, None, None);
        let mut text = String::new();
        encode(&mut text, &registry(&http)).unwrap();
        assert!(
            text.contains("req_total{route=\"llm\",status=\"200\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("req_total{route=\"llm\",status=\"502\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("req_total{route=\"llm\",status=\"999\"} 1"),
            "{text}"
        );
        assert!(text.contains("up_count{route=\"llm\"} 3"), "{text}");
        assert!(text.contains("ttfb_count{route=\"llm\"} 3"), "{text}");
    }

    #[test]
    fn a_route_with_no_requests_has_no_series() {
        let http = Arc::new(HttpMetrics::default());
        let _route = RouteMetrics::new(Arc::clone(&http), "idle");
        let mut text = String::new();
        encode(&mut text, &registry(&http)).unwrap();
        assert!(!text.contains("idle"), "{text}");
    }
}
