//! The eBPF programs run on crafted packets with BPF_PROG_TEST_RUN: ports rewritten where they
//! must be, checksums verified from scratch in Rust, every other packet returned byte for byte.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};

use aya::programs::{SchedClassifier, SkLookup, TestRun, TestRunOptions, Xdp};
use muxer::redirect::{self, Loaded};
use muxer_common::{
    Listener, LISTENERS_MAP, PROGRAM_SK_LOOKUP, PROGRAM_TC_EGRESS, PROGRAM_TC_INGRESS,
    PROGRAM_XDP_INGRESS,
};
use muxer_tests::netns::Netns;
use muxer_tests::netns_available;
use muxer_tests::packets::{self, Spec, ACK, RST, SYN};

const PUBLIC: u16 = 22;
const MUXER: u16 = 2222;
const CLIENT4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
const SERVER4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
const CLIENT6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1));
const SERVER6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2));
const TC_PASS: u32 = u32::MAX; // TC_ACT_UNSPEC: continue
const XDP_PASS: u32 = 2;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ingress {
    Tc,
    Xdp,
}

struct Programs {
    loaded: Loaded,
}

impl Programs {
    fn load() -> Programs {
        Programs {
            loaded: redirect::load(&[PUBLIC, 443], MUXER).expect("load programs (needs CAP_BPF)"),
        }
    }

    fn run(&self, name: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; packet.len() + 256];
        let program = self.loaded.ebpf.program(name).expect("program");
        let options = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        let result = if name == PROGRAM_XDP_INGRESS {
            <&Xdp>::try_from(program).unwrap().test_run(options)
        } else {
            <&SchedClassifier>::try_from(program)
                .unwrap()
                .test_run(options)
        }
        .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn ingress(&self, hook: Ingress, packet: &[u8]) -> Vec<u8> {
        let (name, pass) = match hook {
            Ingress::Tc => (PROGRAM_TC_INGRESS, TC_PASS),
            Ingress::Xdp => (PROGRAM_XDP_INGRESS, XDP_PASS),
        };
        let (verdict, out) = self.run(name, packet);
        assert_eq!(verdict, pass, "{name} must pass the packet");
        out
    }

    fn egress(&self, packet: &[u8]) -> Vec<u8> {
        let (verdict, out) = self.run(PROGRAM_TC_EGRESS, packet);
        assert_eq!(verdict, TC_PASS);
        out
    }

    fn counter(&self, name: &str) -> u64 {
        let counters =
            redirect::read_counters(&self.loaded.ebpf, &[(PUBLIC, 0), (443, 1)]).unwrap();
        counters.global[name]
    }
}

/// An IPv6-only listener, like muxer's own, beside the IPv4 one.
fn listen_v6_only(port: u16) -> socket2::Socket {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    socket.set_only_v6(true).unwrap();
    socket
        .bind(&std::net::SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())
        .unwrap();
    socket.listen(8).unwrap();
    socket
}

fn assert_redirected(before: &[u8], after: &[u8], ports: (u16, u16)) {
    assert_eq!(before.len(), after.len());
    assert_eq!(packets::ports(after), ports);
    assert!(
        packets::tcp_checksum_ok(after),
        "checksum broken after rewrite"
    );
    let l4 = packets::tcp_offset(before);
    // Only the port and the checksum may differ.
    for (index, (a, b)) in before.iter().zip(after).enumerate() {
        let allowed = (l4..l4 + 4).contains(&index) || (l4 + 16..l4 + 18).contains(&index);
        assert!(a == b || allowed, "byte {index} changed");
    }
}

/// Runs `body` inside a fresh namespace with listeners on the muxer port, so the programs'
/// socket lookup finds them.
fn in_namespace(test: &str, body: impl FnOnce(&Programs) + Send) {
    if !netns_available(test) {
        return;
    }
    let netns = Netns::new("bpf");
    netns.enter(|| {
        let _v4 = TcpListener::bind(("0.0.0.0", MUXER)).unwrap();
        let _v6 = listen_v6_only(MUXER);
        let programs = Programs::load();
        body(&programs);
    });
}

fn ingress_rewrites_every_header_layout(hook: Ingress) {
    in_namespace("ingress_rewrites_every_header_layout", |programs| {
        let mut layouts = vec![
            Spec::tcp(CLIENT4, 40001, SERVER4, PUBLIC, SYN),
            Spec::tcp(CLIENT6, 40002, SERVER6, PUBLIC, SYN),
            Spec::tcp(CLIENT4, 40005, SERVER4, 443, SYN),
        ];
        let mut options = Spec::tcp(CLIENT4, 40003, SERVER4, PUBLIC, SYN);
        options.ipv4_options = vec![1, 1, 7, 7, 4, 0, 0, 0, 0, 0]; // NOP NOP record-route
        layouts.push(options);
        let mut extensions = Spec::tcp(CLIENT6, 40004, SERVER6, PUBLIC, SYN);
        extensions.ipv6_extensions = vec![0, 60, 43, 51];
        layouts.push(extensions);
        let mut odd = Spec::tcp(CLIENT4, 40006, SERVER4, PUBLIC, SYN);
        odd.payload = vec![0xff; 1001];
        layouts.push(odd);

        for spec in &layouts {
            let packet = packets::build(spec);
            assert!(
                packets::tcp_checksum_ok(&packet),
                "the test's own packet is wrong"
            );
            let out = programs.ingress(hook, &packet);
            assert_redirected(&packet, &out, (spec.sport, MUXER));
        }
        assert_eq!(programs.counter("flows_tracked"), layouts.len() as u64);

        // Later packets of a tracked flow follow it; a RST too.
        for flags in [ACK, ACK | RST] {
            let spec = Spec::tcp(CLIENT6, 40004, SERVER6, PUBLIC, flags);
            let mut spec = spec;
            spec.ipv6_extensions = vec![0, 60, 43, 51];
            let packet = packets::build(&spec);
            assert_redirected(&packet, &programs.ingress(hook, &packet), (40004, MUXER));
        }
    });
}

fn ingress_leaves_other_packets_untouched(hook: Ingress) {
    in_namespace("ingress_leaves_other_packets_untouched", |programs| {
        let mut fragment4 = Spec::tcp(CLIENT4, 41001, SERVER4, PUBLIC, SYN);
        fragment4.fragment = true;
        let mut fragment6 = Spec::tcp(CLIENT6, 41002, SERVER6, PUBLIC, SYN);
        fragment6.fragment = true;
        fragment6.ipv6_extensions = vec![0];
        let mut udp = Spec::tcp(CLIENT4, 41003, SERVER4, PUBLIC, SYN);
        udp.protocol = 17;
        let other_port = Spec::tcp(CLIENT4, 41004, SERVER4, 80, SYN);
        let untracked = Spec::tcp(CLIENT4, 41005, SERVER4, PUBLIC, ACK);
        let synack_to_public = Spec::tcp(CLIENT4, 41006, SERVER4, PUBLIC, SYN | ACK);
        let direct = Spec::tcp(CLIENT4, 41007, SERVER4, MUXER, SYN);
        for spec in [
            &fragment4,
            &fragment6,
            &udp,
            &other_port,
            &untracked,
            &synack_to_public,
            &direct,
        ] {
            let packet = packets::build(spec);
            assert_eq!(
                programs.ingress(hook, &packet),
                packet,
                "{spec:?} must pass unchanged"
            );
        }
        let mut truncated = packets::build(&Spec::tcp(CLIENT4, 41008, SERVER4, PUBLIC, SYN));
        truncated.truncate(14 + 20 + 10);
        assert_eq!(programs.ingress(hook, &truncated), truncated);

        assert_eq!(programs.counter("passed_fragment"), 2);
        assert_eq!(programs.counter("passed_untracked"), 2);
        assert_eq!(programs.counter("direct_to_muxer_port"), 1);
        assert_eq!(programs.counter("parse_failures"), 1);
        assert_eq!(programs.counter("flows_tracked"), 0);
    });
}

#[test]
fn tc_ingress_rewrites_ipv4_options_ipv6_extensions_and_keeps_checksums() {
    ingress_rewrites_every_header_layout(Ingress::Tc);
}

#[test]
fn xdp_ingress_rewrites_ipv4_options_ipv6_extensions_and_keeps_checksums() {
    ingress_rewrites_every_header_layout(Ingress::Xdp);
}

#[test]
fn tc_ingress_passes_fragments_udp_other_ports_untracked_and_direct_packets_unchanged() {
    ingress_leaves_other_packets_untouched(Ingress::Tc);
}

#[test]
fn xdp_ingress_passes_fragments_udp_other_ports_untracked_and_direct_packets_unchanged() {
    ingress_leaves_other_packets_untouched(Ingress::Xdp);
}

#[test]
fn egress_restores_the_public_port_of_tracked_flows_only() {
    in_namespace(
        "egress_restores_the_public_port_of_tracked_flows_only",
        |programs| {
            for (client, server, port) in [(CLIENT4, SERVER4, 42001), (CLIENT6, SERVER6, 42002)] {
                programs.ingress(
                    Ingress::Tc,
                    &packets::build(&Spec::tcp(client, port, server, 443, SYN)),
                );
                let reply = packets::build(&Spec::tcp(server, MUXER, client, port, SYN | ACK));
                assert_redirected(&reply, &programs.egress(&reply), (443, port));
                // Another client's reply from the muxer port is not a redirected flow.
                let other = packets::build(&Spec::tcp(server, MUXER, client, port + 100, ACK));
                assert_eq!(programs.egress(&other), other);
                // Replies from other ports are never touched.
                let ssh = packets::build(&Spec::tcp(server, PUBLIC, client, port, ACK));
                assert_eq!(programs.egress(&ssh), ssh);
            }
            // A direct connection reusing a redirected flow's tuple replaces it: its replies keep
            // the muxer port.
            programs.ingress(
                Ingress::Tc,
                &packets::build(&Spec::tcp(CLIENT4, 42001, SERVER4, MUXER, SYN)),
            );
            let reply = packets::build(&Spec::tcp(SERVER4, MUXER, CLIENT4, 42001, SYN | ACK));
            assert_eq!(programs.egress(&reply), reply);
            let counters =
                redirect::read_counters(&programs.loaded.ebpf, &[(PUBLIC, 0), (443, 1)]).unwrap();
            let https = counters.ports.iter().find(|p| p.port == 443).unwrap();
            assert_eq!((https.in_packets, https.out_packets), (2, 2));
            assert!(https.out_bytes > 0 && https.in_bytes > 0);
        },
    );
}

#[test]
fn a_client_port_reused_for_a_new_connection_follows_the_new_connection() {
    in_namespace(
        "a_client_port_reused_for_a_new_connection_follows_the_new_connection",
        |programs| {
            let reply = packets::build(&Spec::tcp(SERVER4, MUXER, CLIENT4, 42101, SYN | ACK));
            // The same public port again (the usual reuse): the recorded flow is kept as it is.
            for _ in 0..2 {
                programs.ingress(
                    Ingress::Tc,
                    &packets::build(&Spec::tcp(CLIENT4, 42101, SERVER4, 443, SYN)),
                );
                assert_redirected(&reply, &programs.egress(&reply), (443, 42101));
            }
            // Another public port from the same client port: its replies carry the new port.
            programs.ingress(
                Ingress::Tc,
                &packets::build(&Spec::tcp(CLIENT4, 42101, SERVER4, PUBLIC, SYN)),
            );
            assert_redirected(&reply, &programs.egress(&reply), (PUBLIC, 42101));
            assert_eq!(programs.counter("flows_tracked"), 3);
        },
    );
}

#[test]
fn no_listener_on_the_muxer_port_means_no_redirect() {
    if !netns_available("no_listener_on_the_muxer_port_means_no_redirect") {
        return;
    }
    let netns = Netns::new("bpf");
    netns.enter(|| {
        let programs = Programs::load(); // nothing listens on 2222 here
        for hook in [Ingress::Tc, Ingress::Xdp] {
            let syn = packets::build(&Spec::tcp(CLIENT4, 43001, SERVER4, PUBLIC, SYN));
            assert_eq!(programs.ingress(hook, &syn), syn);
        }
        assert_eq!(programs.counter("passed_no_listener"), 2);
        assert_eq!(programs.counter("flows_tracked"), 0);
    });
}

/// `struct bpf_sk_lookup` as user space passes it to BPF_PROG_TEST_RUN (uapi layout).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SkLookupCtx {
    cookie: u64,
    family: u32,
    protocol: u32,
    remote_ip4: u32,
    remote_ip6: [u32; 4],
    remote_port: u16,
    _pad: u16,
    local_ip4: u32,
    local_ip6: [u32; 4],
    local_port: u32,
    ingress_ifindex: u32,
}

/// The `test` member of `union bpf_attr` for BPF_PROG_TEST_RUN.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const SK_PASS: u32 = 1;

/// Runs the sk_lookup program on a lookup for `local` (a TCP connection from `remote`); returns
/// the cookie of the socket it selected (0: none, the lookup goes on as usual).
fn sk_lookup_selects(programs: &Programs, remote: SocketAddr, local: SocketAddr) -> u64 {
    use std::os::fd::{AsFd, AsRawFd};
    let program: &SkLookup = programs
        .loaded
        .ebpf
        .program(PROGRAM_SK_LOOKUP)
        .unwrap()
        .try_into()
        .unwrap();
    let words = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => (u32::from_ne_bytes(v4.octets()), [0; 4]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (0, [word(0), word(4), word(8), word(12)])
        }
    };
    let (remote_ip4, remote_ip6) = words(remote.ip());
    let (local_ip4, local_ip6) = words(local.ip());
    let ctx_in = SkLookupCtx {
        family: if local.is_ipv4() { 2 } else { 10 },
        protocol: 6,
        remote_ip4,
        remote_ip6,
        remote_port: remote.port().to_be(),
        local_ip4,
        local_ip6,
        local_port: u32::from(local.port()),
        ..SkLookupCtx::default()
    };
    let mut ctx_out = SkLookupCtx::default();
    let mut attr = TestRunAttr {
        prog_fd: program.fd().unwrap().as_fd().as_raw_fd() as u32,
        repeat: 1,
        ctx_size_in: std::mem::size_of::<SkLookupCtx>() as u32,
        ctx_size_out: std::mem::size_of::<SkLookupCtx>() as u32,
        ctx_in: &ctx_in as *const SkLookupCtx as u64,
        ctx_out: &mut ctx_out as *mut SkLookupCtx as u64,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is a valid BPF_PROG_TEST_RUN attribute whose pointers outlive the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    assert_eq!(
        result,
        0,
        "BPF_PROG_TEST_RUN: {}",
        std::io::Error::last_os_error()
    );
    assert_eq!(
        attr.retval, SK_PASS,
        "the program always lets the lookup go on"
    );
    ctx_out.cookie
}

#[test]
fn sk_lookup_assigns_public_port_connections_to_the_listener_of_their_family_only() {
    use aya::maps::SockMap;
    use std::os::fd::AsFd;
    let test = "sk_lookup_assigns_public_port_connections_to_the_listener_of_their_family_only";
    if !netns_available(test) {
        return;
    }
    Netns::new("bpf").enter(|| {
        let mut programs = Programs::load();
        let v4 = TcpListener::bind(("0.0.0.0", MUXER)).unwrap();
        let v6 = listen_v6_only(MUXER);
        let cookie4 = rustix::net::sockopt::socket_cookie(&v4).unwrap();
        let cookie6 = rustix::net::sockopt::socket_cookie(&v6).unwrap();
        let public4 = SocketAddr::new(SERVER4, PUBLIC);
        let public6 = SocketAddr::new(SERVER6, PUBLIC);
        let from4 = SocketAddr::new(CLIENT4, 40000);
        let from6 = SocketAddr::new(CLIENT6, 40000);
        // Nothing in the map yet: the lookup goes on to the original service.
        assert_eq!(sk_lookup_selects(&programs, from4, public4), 0);
        assert_eq!(programs.counter("passed_no_listener"), 1);

        {
            let map = programs.loaded.ebpf.map_mut(LISTENERS_MAP).unwrap();
            let mut map: SockMap<_> = SockMap::try_from(map).unwrap();
            map.set(Listener::V4 as u32, &v4.as_fd(), 0).unwrap();
            map.set(Listener::V6 as u32, &v6.as_fd(), 0).unwrap();
        }
        assert_eq!(sk_lookup_selects(&programs, from4, public4), cookie4);
        assert_eq!(sk_lookup_selects(&programs, from6, public6), cookie6);
        assert_eq!(programs.counter("sk_lookup_assigned"), 2);
        // Another port, and a loopback address (muxer's own connection to sshd): untouched.
        assert_eq!(
            sk_lookup_selects(&programs, from4, SocketAddr::new(SERVER4, 80)),
            0
        );
        let loopback4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), PUBLIC);
        let loopback6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), PUBLIC);
        assert_eq!(sk_lookup_selects(&programs, from4, loopback4), 0);
        assert_eq!(sk_lookup_selects(&programs, from6, loopback6), 0);
        assert_eq!(programs.counter("sk_lookup_local"), 2);
        // A closed listening socket leaves the map: fail-open.
        drop(v4);
        assert_eq!(sk_lookup_selects(&programs, from4, public4), 0);
        assert_eq!(sk_lookup_selects(&programs, from6, public6), cookie6);
        assert_eq!(programs.counter("passed_no_listener"), 2);
        assert_eq!(programs.counter("sk_lookup_errors"), 0);
    });
}
