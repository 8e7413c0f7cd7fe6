//! The HTTP router's per-request metrics: request counts and latency histograms, recorded as
//! requests finish. The data path records them; `exporter.rs` registers and serves them.
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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
    /// Adds these metrics' families to `registry`.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "muxer_http_requests",
            "HTTP requests by route and status",
            self.requests.clone(),
        );
        registry.register(
            "muxer_http_upstream_response_seconds",
            "Time from sending a request upstream to its response head",
            self.upstream_latency.clone(),
        );
        registry.register(
            "muxer_http_time_to_first_byte_seconds",
            "Time from a request's arrival to the first response byte",
            self.ttfb.clone(),
        );
    }

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
