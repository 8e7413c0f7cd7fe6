//! Worker placement, end to end: each worker thread is pinned to a CPU of its own
//! (`listen.pin_workers`), a new connection goes to the worker running on the CPU that received
//! it, and a worker far ahead of the others gives way. Clients are pinned to CPUs so that which
//! CPU handles each handshake is known.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use muxer::steering::{CLAIM_SLACK, HANDOFF_SLACK};
use muxer_tests::backends::{self, Backend};
use muxer_tests::muxer::Muxer;
use muxer_tests::netns::{Link, SERVER_V4};
use muxer_tests::{netns_available, wait_for};
use rustix::thread::{sched_setaffinity, CpuSet};

const MUX_PORT: u16 = 2222;

/// Two workers with the defaults: CPU steering and pinning on.
const TWO_PINNED: &str = "workers = 2\ncpu_steering = true\npin_workers = true";

struct Server {
    link: Link,
    _echo: Backend,
    muxer: Muxer,
}

/// Every connection goes to an echo backend (the fallback route) and stays open. `listen` holds
/// the `[listen]` keys besides the address; `wrapper` goes in front of the muxer command.
fn server(listen: &str, wrapper: &[&str]) -> Server {
    let link = Link::new();
    let echo = backends::echo(&link.server, "127.0.0.1:7000".parse().unwrap());
    let muxer = Muxer::start_as(
        &link.server,
        &format!(
            "[listen]\naddresses = [\"0.0.0.0:{MUX_PORT}\"]\n{listen}\n\
             [sniff]\ntimeout = \"2s\"\n\
             [ssh]\nupstream = \"127.0.0.1:22\"\n\
             [fallback]\nupstream = \"127.0.0.1:7000\"\n"
        ),
        "127.0.0.1:2222".parse().unwrap(),
        wrapper,
    );
    Server {
        link,
        _echo: echo,
        muxer,
    }
}

fn only(cpu: usize) -> CpuSet {
    let mut set = CpuSet::new();
    set.set(cpu);
    set
}

impl Server {
    /// A connection made by a thread running on `cpu` (its handshake is processed there: veth
    /// delivers in the sender's context), carried through to the echo backend.
    fn connect_from(&self, cpu: usize) -> TcpStream {
        let to = SocketAddr::from((SERVER_V4, MUX_PORT));
        let mut stream = self.link.client.enter(|| {
            sched_setaffinity(None, &only(cpu)).expect("pin the client thread");
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect")
        });
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(b"steer me\n").unwrap();
        let mut echoed = [0u8; 9];
        stream.read_exact(&mut echoed).unwrap();
        stream
    }

    /// Per worker: (connections, claimed CPU), once the counts have settled.
    fn workers(&self) -> Vec<(u64, Option<u64>)> {
        std::thread::sleep(Duration::from_millis(100));
        self.muxer.stats()["daemon"]["workers"]
            .as_array()
            .expect("workers in stats")
            .iter()
            .map(|worker| {
                (
                    worker["connections"].as_u64().unwrap(),
                    worker["claimed_cpu"].as_u64(),
                )
            })
            .collect()
    }

    /// Per worker, in worker order: the CPUs its thread may run on, as the kernel reports them.
    /// Waits for all `count` worker threads: the listen port answers before they are all named.
    fn worker_affinities(&self, count: usize) -> Vec<String> {
        let pid = self.muxer.process.pid();
        wait_for("every worker thread", Duration::from_secs(10), || {
            let mut workers = Vec::new();
            for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
                let task = task.ok()?.path();
                let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
                if let Some(index) = name.trim().strip_prefix("muxer-worker-") {
                    workers.push((index.parse::<usize>().ok()?, cpus_allowed(&task)));
                }
            }
            workers.sort();
            (workers.len() == count).then(|| workers.into_iter().map(|(_, cpus)| cpus).collect())
        })
    }

    /// Per worker: the CPU `muxer stats` says it is pinned to.
    fn pinned_cpus(&self) -> Vec<Option<u64>> {
        self.muxer.stats()["daemon"]["workers"]
            .as_array()
            .expect("workers in stats")
            .iter()
            .map(|worker| worker["pinned_cpu"].as_u64())
            .collect()
    }
}

/// The CPUs the task at `/proc` path `task` may run on, as the kernel lists them (`0-1`).
fn cpus_allowed(task: &std::path::Path) -> String {
    std::fs::read_to_string(task.join("status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc status")
        .trim()
        .to_owned()
}

/// This test process's CPUs.
fn all_cpus() -> String {
    cpus_allowed(std::path::Path::new("/proc/self"))
}

fn two_cpus(test: &str) -> bool {
    if !netns_available(test) {
        return false;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("SKIPPED {test}: needs 2 CPUs, this machine has {cpus}");
        return false;
    }
    true
}

#[test]
fn each_worker_takes_the_new_connections_of_the_cpu_it_runs_on() {
    if !two_cpus("each_worker_takes_the_new_connections_of_the_cpu_it_runs_on") {
        return;
    }
    let server = server(TWO_PINNED, &[]);
    // A worker moves its claim to the CPU it runs on at its next accept: connect from both CPUs
    // until both claims have followed the pinning.
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        held.push(server.connect_from(0));
        held.push(server.connect_from(1));
        let claims: Vec<_> = server.workers().iter().map(|w| w.1).collect();
        if claims == [Some(0), Some(1)] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "claims never settled: {claims:?}"
        );
    }
    let before = server.workers();
    // Few enough that the loads stay within the claim slack.
    let batch = CLAIM_SLACK / 4;
    for _ in 0..batch {
        held.push(server.connect_from(1));
    }
    let after_cpu1 = server.workers();
    assert_eq!(
        (after_cpu1[0].0, after_cpu1[1].0),
        (before[0].0, before[1].0 + batch as u64),
        "connections from CPU 1 go to the worker on CPU 1"
    );
    for _ in 0..batch {
        held.push(server.connect_from(0));
    }
    let after_cpu0 = server.workers();
    assert_eq!(
        (after_cpu0[0].0, after_cpu0[1].0),
        (after_cpu1[0].0 + batch as u64, after_cpu1[1].0),
        "connections from CPU 0 go to the worker on CPU 0"
    );
    let table = std::process::Command::new(muxer_tests::muxer::binary())
        .args(["stats", "--socket"])
        .arg(server.muxer.socket())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("connections per worker (CPU claimed)")
            && table.contains("(CPU 0, pinned)")
            && table.contains("(CPU 1, pinned)"),
        "{table}"
    );
}

#[test]
fn a_worker_far_ahead_leaves_new_connections_to_the_others() {
    if !two_cpus("a_worker_far_ahead_leaves_new_connections_to_the_others") {
        return;
    }
    let server = server(TWO_PINNED, &[]);
    // Every handshake on one CPU, as with a network card that has a single receive queue: the
    // worker there would get them all.
    let count = 3 * HANDOFF_SLACK;
    let held: Vec<_> = (0..count).map(|_| server.connect_from(0)).collect();
    let workers = server.workers();
    let (first, second) = (workers[0].0, workers[1].0);
    assert_eq!(first + second, count as u64, "{workers:?}");
    assert!(
        first.abs_diff(second) <= HANDOFF_SLACK as u64 + 1,
        "one worker far ahead: {workers:?}"
    );
    drop(held);
}

#[test]
fn with_steering_off_no_worker_claims_a_cpu_and_hashing_spreads_connections() {
    if !two_cpus("with_steering_off_no_worker_claims_a_cpu_and_hashing_spreads_connections") {
        return;
    }
    let server = server(
        "workers = 2\ncpu_steering = false\npin_workers = false",
        &[],
    );
    let held: Vec<_> = (0..24).map(|_| server.connect_from(0)).collect();
    let workers = server.workers();
    assert!(
        workers.iter().all(|w| w.1.is_none()),
        "a claim with steering off: {workers:?}"
    );
    assert!(
        workers.iter().all(|w| w.0 > 0),
        "hashing left a worker without connections: {workers:?}"
    );
    drop(held);
}

#[test]
fn each_worker_thread_is_pinned_to_a_cpu_of_its_own() {
    if !two_cpus("each_worker_thread_is_pinned_to_a_cpu_of_its_own") {
        return;
    }
    let allowed = muxer::affinity::allowed_cpus().unwrap();
    let server = server(TWO_PINNED, &[]);
    // A worker thread exists (and is named) a moment before it pins itself: wait for the pin.
    let expected = [allowed[0].to_string(), allowed[1].to_string()];
    let reported = [Some(allowed[0] as u64), Some(allowed[1] as u64)];
    wait_for("both workers pinned", Duration::from_secs(10), || {
        (server.worker_affinities(2) == expected && server.pinned_cpus() == reported).then_some(())
    });
}

#[test]
fn workers_float_with_pinning_off() {
    if !two_cpus("workers_float_with_pinning_off") {
        return;
    }
    let server = server("workers = 2\npin_workers = false", &[]);
    assert_eq!(server.worker_affinities(2), [all_cpus(), all_cpus()]);
    assert_eq!(server.pinned_cpus(), [None, None]);
}

#[test]
fn a_daemon_confined_to_one_cpu_pins_nothing() {
    if !two_cpus("a_daemon_confined_to_one_cpu_pins_nothing") {
        return;
    }
    let server = server(TWO_PINNED, &["taskset", "-c", "1"]);
    assert_eq!(server.worker_affinities(2), ["1", "1"]);
    assert_eq!(server.pinned_cpus(), [None, None]);
}

#[test]
fn fewer_workers_than_cpus_are_not_pinned() {
    if !two_cpus("fewer_workers_than_cpus_are_not_pinned") {
        return;
    }
    let server = server("workers = 1\npin_workers = true", &[]);
    assert_eq!(server.worker_affinities(1), [all_cpus()]);
    assert_eq!(server.pinned_cpus(), [None]);
}
