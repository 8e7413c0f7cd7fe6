//! Spoofed floods against the kernel steering, in every mode: an idle SSH session through port 22
//! must outlive 300 000 spoofed SYN-then-ACK pairs to port 22 (the flood that once evicted its
//! flow record) and SYNs carrying its own tuple to every port muxer listens on (one such SYN once
//! deleted the record), and new logins must still come through muxer afterwards.
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use muxer_tests::muxer::Muxer;
use muxer_tests::netns::{CLIENT_V4, SERVER_V4};
use muxer_tests::packets::{self, Spec};
use muxer_tests::public_host::PublicHost;
use muxer_tests::{netns_available, wait_for};

const READY: &str = "127.0.0.1:2222";

fn config(mode: &str) -> String {
    format!(
        "[listen]\naddresses = [\"0.0.0.0:2222\", \"[::]:2222\"]\n\
         [redirect]\nmode = \"{mode}\"\nports = [22]\n{interfaces}\
         [ssh]\nupstream = \"127.0.0.1:22\"\n\
         [[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\n",
        interfaces = if mode == "sk_lookup" {
            ""
        } else {
            "interfaces = [\"veth-s\"]\n"
        }
    )
}

/// The ports muxer listens on in the server namespace (its listen port, and in TC/XDP mode the
/// internal ports redirected connections land on).
fn muxer_ports(host: &PublicHost, pid: u32) -> Vec<u16> {
    let listening = host
        .link
        .server
        .run_ok("ss", &["-Htlnp", "sport", "!=", ":22"]);
    let mut ports: Vec<u16> = listening
        .lines()
        .filter(|line| line.contains(&format!("pid={pid},")))
        .filter_map(|line| line.split_whitespace().nth(3))
        .filter_map(|local| local.rsplit(':').next()?.parse().ok())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn an_idle_ssh_session_survives_spoofed_floods(mode: &str, test: &str) {
    if !netns_available(test) {
        return;
    }
    let server = PublicHost::new();
    let muxer = Muxer::start(&server.link.server, &config(mode), READY.parse().unwrap());
    // An interactive session through port 22 that stays idle until the test writes a line.
    let mut session = server
        .link
        .client
        .command("ssh")
        .args(
            server
                .sshd
                .ssh_args(&SERVER_V4.to_string(), 22, "read line; echo alive-$line"),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ssh");
    wait_for("the session to open", Duration::from_secs(10), || {
        (muxer.stats()["daemon"]["routes"]["ssh"]["open"] == 1).then_some(())
    });
    let sockets = server
        .link
        .client
        .run_ok("ss", &["-Htn", "state", "established", "( dport = :22 )"]);
    let client_port: u16 = sockets
        .split_whitespace()
        .find_map(|field| field.strip_prefix(&format!("{CLIENT_V4}:")))
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("the session's port in {sockets:?}"));
    let ports = muxer_ports(&server, muxer.process.pid());
    assert!(ports.contains(&2222), "muxer listens on {ports:?}");
    if mode != "sk_lookup" {
        // The listen port and port 22's internal port.
        assert_eq!(ports.len(), 2, "muxer listens on {ports:?}");
    }

    let started = Instant::now();
    let (flood, tuple_syns) = server.link.client.enter(|| {
        let flood = packets::spoofed_syn_ack_pairs(SERVER_V4, 22, 300_000);
        // SYNs to every port of muxer's carrying the session's own tuple.
        let syns = ports.iter().flat_map(|&port| {
            let syn = packets::build(&Spec::tcp(
                CLIENT_V4.into(),
                client_port,
                SERVER_V4.into(),
                port,
                packets::SYN,
            ));
            std::iter::repeat_n(syn, 1_000)
        });
        (flood, packets::send_raw_ipv4(SERVER_V4, syns))
    });
    assert_eq!(
        (flood, tuple_syns),
        (600_000, 1_000 * ports.len()),
        "packets sent"
    );
    eprintln!("{mode}: flood sent in {:?}", started.elapsed());

    let mut stdin = session.stdin.take().unwrap();
    stdin.write_all(b"1\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(session.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "alive-1",
        "{mode}: the idle session must survive the floods"
    );
    assert!(session.wait().unwrap().success());
    // And new logins still come through muxer.
    assert!(server.ssh(&SERVER_V4.to_string()).through_muxer());
}

#[test]
fn sk_lookup_an_idle_ssh_session_survives_spoofed_floods() {
    an_idle_ssh_session_survives_spoofed_floods(
        "sk_lookup",
        "sk_lookup_an_idle_ssh_session_survives_spoofed_floods",
    );
}

#[test]
fn tc_an_idle_ssh_session_survives_spoofed_floods() {
    an_idle_ssh_session_survives_spoofed_floods(
        "tc",
        "tc_an_idle_ssh_session_survives_spoofed_floods",
    );
}

#[test]
fn xdp_an_idle_ssh_session_survives_spoofed_floods() {
    an_idle_ssh_session_survives_spoofed_floods(
        "xdp",
        "xdp_an_idle_ssh_session_survives_spoofed_floods",
    );
}
