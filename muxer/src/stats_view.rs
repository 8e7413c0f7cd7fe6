//! `muxer stats` output: a table for people (with rates in `--watch` mode) and JSON for scripts.
use std::fmt::Write as _;

use crate::control::StatsReport;

/// Renders `report` as a table. With `previous` (an earlier report), adds per-second rates.
pub fn table(report: &StatsReport, previous: Option<&StatsReport>) -> String {
    let mut out = String::new();
    let elapsed = previous
        .map(|p| report.uptime_seconds - p.uptime_seconds)
        .filter(|seconds| *seconds > 0.0);
    let rate = |now: u64, before: Option<u64>| -> String {
        match (elapsed, before) {
            (Some(seconds), Some(before)) => {
                format!("{:.1}/s", now.saturating_sub(before) as f64 / seconds)
            }
            _ => "-".into(),
        }
    };
    let redirect = &report.redirect;
    let _ = writeln!(out, "muxer up {:.0}s", report.uptime_seconds);
    match redirect.state.as_str() {
        "attached" => {
            let on = if redirect.interfaces.is_empty() {
                "the network namespace".to_owned()
            } else {
                redirect.interfaces.join(", ")
            };
            let to = if redirect.internal_ports.is_empty() {
                redirect
                    .target_port
                    .map(|p| format!("muxer's sockets on {p}"))
                    .unwrap_or_default()
            } else {
                let pairs: Vec<String> = redirect
                    .internal_ports
                    .iter()
                    .map(|(public, internal)| format!("{public}→{internal}"))
                    .collect();
                format!("internal ports {}", pairs.join(", "))
            };
            let _ = writeln!(
                out,
                "redirect: {} on {} — ports {:?} → {to}",
                redirect
                    .ingress
                    .map(|h| format!("{h:?}").to_lowercase())
                    .unwrap_or_default(),
                on,
                redirect.ports,
            );
        }
        state => {
            let _ = writeln!(
                out,
                "redirect: {state} ({})",
                redirect.reason.as_deref().unwrap_or("no reason given")
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<8} {:>6} {:>9} {:>10} {:>14} {:>14} {:>12} {:>12}",
        "route", "open", "total", "conn rate", "bytes in", "bytes out", "in rate", "out rate"
    );
    for (name, route) in &report.daemon.routes {
        let before = previous.and_then(|p| p.daemon.routes.get(name));
        let _ = writeln!(
            out,
            "{:<8} {:>6} {:>9} {:>10} {:>14} {:>14} {:>12} {:>12}",
            name,
            route.open,
            route.total,
            rate(route.total, before.map(|b| b.total)),
            route.bytes_in,
            route.bytes_out,
            rate(route.bytes_in, before.map(|b| b.bytes_in)),
            rate(route.bytes_out, before.map(|b| b.bytes_out)),
        );
    }
    let daemon = &report.daemon;
    let _ = writeln!(
        out,
        "\nprobe timeouts {}   upstream connect errors {}   no route {}   idle HTTP connections parked {}",
        daemon.probe_timeouts, daemon.upstream_connect_errors, daemon.no_route, daemon.http_parked
    );
    if !daemon.classes.is_empty() {
        let classes: Vec<String> = daemon
            .classes
            .iter()
            .map(|(class, c)| format!("{class} {}/{}", c.open, c.limit))
            .collect();
        let _ = writeln!(out, "open/limit by class: {}", classes.join("   "));
    }
    for (title, counts) in [
        ("refused", &daemon.refused),
        ("closed by timeout", &daemon.timeouts),
    ] {
        let nonzero: Vec<String> = counts
            .iter()
            .filter(|(_, value)| **value > 0)
            .map(|(key, value)| format!("{key} {value}"))
            .collect();
        let shown = if nonzero.is_empty() {
            "none".to_owned()
        } else {
            nonzero.join("   ")
        };
        let _ = writeln!(out, "{title}: {shown}");
    }
    if !daemon.workers.is_empty() {
        let workers: Vec<String> = daemon
            .workers
            .iter()
            .enumerate()
            .map(|(index, worker)| {
                let cpus = match (worker.claimed_cpu, worker.pinned_cpu) {
                    (Some(claimed), Some(pinned)) if claimed == pinned => {
                        format!(" (CPU {claimed}, pinned)")
                    }
                    (Some(claimed), Some(pinned)) => {
                        format!(" (CPU {claimed}, pinned to {pinned})")
                    }
                    (Some(claimed), None) => format!(" (CPU {claimed})"),
                    (None, Some(pinned)) => format!(" (pinned to {pinned})"),
                    (None, None) => String::new(),
                };
                format!("{index}: {}{cpus}", worker.connections)
            })
            .collect();
        let _ = writeln!(
            out,
            "connections per worker (CPU claimed)   {}",
            workers.join("   ")
        );
    }
    if let Some(kernel) = &report.kernel {
        let _ = writeln!(out, "\nkernel");
        let _ = writeln!(
            out,
            "{:<8} {:>12} {:>14} {:>12} {:>14} {:>12}",
            "port", "in packets", "in bytes", "out packets", "out bytes", "in pkt rate"
        );
        for port in &kernel.ports {
            let before = previous
                .and_then(|p| p.kernel.as_ref())
                .and_then(|k| k.ports.iter().find(|b| b.port == port.port));
            let _ = writeln!(
                out,
                "{:<8} {:>12} {:>14} {:>12} {:>14} {:>12}",
                port.port,
                port.in_packets,
                port.in_bytes,
                port.out_packets,
                port.out_bytes,
                rate(port.in_packets, before.map(|b| b.in_packets)),
            );
        }
        let line: Vec<String> = kernel
            .global
            .iter()
            .map(|(name, value)| format!("{name} {value}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("   "));
    }
    out
}
