//! The eBPF programs run on crafted packets with BPF_PROG_TEST_RUN: ports rewritten where they
//! must be, checksums verified from scratch in Rust, every other packet returned byte for byte.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};

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
const HTTPS: u16 = 443;
const MUXER: u16 = 2222;
/// The internal ports of [`PUBLIC`] and [`HTTPS`].
const INTERNAL: u16 = 3022;
const INTERNAL_HTTPS: u16 = 3443;
const CLIENT4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
const SERVER4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
const CLIENT6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1));
const SERVER6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2));
const TC_PASS: u32 = u32::MAX; // TC_ACT_UNSPEC: continue
const TC_SHOT: u32 = 2;
const XDP_DROP: u32 = 1;
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
            loaded: redirect::load(&[(PUBLIC, INTERNAL), (HTTPS, INTERNAL_HTTPS)])
                .expect("load programs (needs CAP_BPF)"),
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

    fn ingress_verdict(&self, hook: Ingress, packet: &[u8]) -> (bool, Vec<u8>) {
        let (name, pass, drop) = match hook {
            Ingress::Tc => (PROGRAM_TC_INGRESS, TC_PASS, TC_SHOT),
            Ingress::Xdp => (PROGRAM_XDP_INGRESS, XDP_PASS, XDP_DROP),
        };
        let (verdict, out) = self.run(name, packet);
        assert!(
            verdict == pass || verdict == drop,
            "{name}: verdict {verdict}"
        );
        (verdict == pass, out)
    }

    fn ingress(&self, hook: Ingress, packet: &[u8]) -> Vec<u8> {
        let (passed, out) = self.ingress_verdict(hook, packet);
        assert!(passed, "{hook:?} ingress must pass the packet");
        out
    }

    fn egress(&self, packet: &[u8]) -> Vec<u8> {
        let (verdict, out) = self.run(PROGRAM_TC_EGRESS, packet);
        assert_eq!(verdict, TC_PASS);
        out
    }

    fn counters(&self) -> redirect::KernelCounters {
        redirect::read_counters(&self.loaded.ebpf, &[(PUBLIC, 0), (HTTPS, 1)]).unwrap()
    }

    fn counter(&self, name: &str) -> u64 {
        self.counters().global[name]
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

/// A real connection from `client:client_port` to `server:port` inside the namespace (both
/// addresses are on its loopback interface), so the programs' socket lookups find it.
fn connection(client: IpAddr, client_port: u16, server: IpAddr, port: u16) -> TcpStream {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(SocketAddr::new(client, 0)),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&SocketAddr::new(client, client_port).into())
        .unwrap();
    socket
        .connect(&SocketAddr::new(server, port).into())
        .unwrap();
    socket.into()
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

/// Runs `body` inside a fresh namespace whose loopback carries the test addresses, with IPv4 and
/// IPv6 listeners on the internal ports (`listening`), so the programs' socket lookups find them,
/// and on the listen port, which must make no difference.
fn in_namespace(test: &str, listening: bool, body: impl FnOnce(&Programs) + Send) {
    if !netns_available(test) {
        return;
    }
    let netns = Netns::new("bpf");
    netns.run_ok("ip", &["link", "set", "lo", "up"]);
    for address in [CLIENT4, SERVER4, CLIENT6, SERVER6] {
        let address = address.to_string();
        netns.run_ok("ip", &["addr", "add", &address, "dev", "lo", "nodad"]);
    }
    netns.enter(|| {
        let ports = if listening {
            vec![MUXER, INTERNAL, INTERNAL_HTTPS]
        } else {
            vec![MUXER]
        };
        let _listeners: Vec<_> = ports
            .iter()
            .map(|&port| {
                (
                    TcpListener::bind(("0.0.0.0", port)).unwrap(),
                    listen_v6_only(port),
                )
            })
            .collect();
        let programs = Programs::load();
        body(&programs);
    });
}

fn ingress_rewrites_every_header_layout(hook: Ingress) {
    in_namespace("ingress_rewrites_every_header_layout", true, |programs| {
        let mut layouts = vec![
            Spec::tcp(CLIENT4, 40001, SERVER4, PUBLIC, SYN),
            Spec::tcp(CLIENT6, 40002, SERVER6, PUBLIC, SYN),
            Spec::tcp(CLIENT4, 40005, SERVER4, HTTPS, SYN),
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
            let internal = if spec.dport == HTTPS {
                INTERNAL_HTTPS
            } else {
                INTERNAL
            };
            let out = programs.ingress(hook, &packet);
            assert_redirected(&packet, &out, (spec.sport, internal));
        }
        assert_eq!(
            programs.counter("connections_redirected"),
            layouts.len() as u64
        );

        // Later packets of a connection on the internal port follow it (a RST too), IPv4 and
        // IPv6: the kernel's socket table is the only record.
        let _v4 = connection(CLIENT4, 40011, SERVER4, INTERNAL);
        let _v6 = connection(CLIENT6, 40004, SERVER6, INTERNAL);
        for flags in [ACK, ACK | RST] {
            let packet = packets::build(&Spec::tcp(CLIENT4, 40011, SERVER4, PUBLIC, flags));
            assert_redirected(&packet, &programs.ingress(hook, &packet), (40011, INTERNAL));
            let mut spec = Spec::tcp(CLIENT6, 40004, SERVER6, PUBLIC, flags);
            spec.ipv6_extensions = vec![0, 60, 43, 51];
            let packet = packets::build(&spec);
            assert_redirected(&packet, &programs.ingress(hook, &packet), (40004, INTERNAL));
        }
        assert_eq!(programs.counter("redirected_strays"), 0);
    });
}

fn ingress_leaves_other_packets_untouched(hook: Ingress) {
    in_namespace("ingress_leaves_other_packets_untouched", true, |programs| {
        // The original service's own connection, opened before the redirect: left alone.
        let _ssh = TcpListener::bind((SERVER4, PUBLIC)).unwrap();
        let _session = connection(CLIENT4, 41005, SERVER4, PUBLIC);
        let mut fragment4 = Spec::tcp(CLIENT4, 41001, SERVER4, PUBLIC, SYN);
        fragment4.fragment = true;
        let mut fragment6 = Spec::tcp(CLIENT6, 41002, SERVER6, PUBLIC, SYN);
        fragment6.fragment = true;
        fragment6.ipv6_extensions = vec![0];
        let mut udp = Spec::tcp(CLIENT4, 41003, SERVER4, PUBLIC, SYN);
        udp.protocol = 17;
        let other_port = Spec::tcp(CLIENT4, 41004, SERVER4, 80, SYN);
        let sshd_session = Spec::tcp(CLIENT4, 41005, SERVER4, PUBLIC, ACK);
        let direct = Spec::tcp(CLIENT4, 41007, SERVER4, MUXER, SYN);
        for spec in [
            &fragment4,
            &fragment6,
            &udp,
            &other_port,
            &sshd_session,
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

        // Packets of no connection at all go to the internal port's listener, which answers
        // them (a SYN-cookie ACK completes its handshake there; anything else gets a reset).
        for flags in [ACK, SYN | ACK] {
            let packet = packets::build(&Spec::tcp(CLIENT4, 41006, SERVER4, PUBLIC, flags));
            assert_redirected(&packet, &programs.ingress(hook, &packet), (41006, INTERNAL));
        }
        // Straight to an internal port from outside: dropped.
        for port in [INTERNAL, INTERNAL_HTTPS] {
            let packet = packets::build(&Spec::tcp(CLIENT6, 41009, SERVER6, port, SYN));
            assert!(!programs.ingress_verdict(hook, &packet).0, "must drop");
        }

        assert_eq!(programs.counter("passed_fragment"), 2);
        assert_eq!(programs.counter("passed_untracked"), 1);
        assert_eq!(programs.counter("redirected_strays"), 2);
        assert_eq!(programs.counter("dropped_direct_to_internal"), 2);
        assert_eq!(programs.counter("parse_failures"), 1);
        assert_eq!(programs.counter("connections_redirected"), 0);
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
fn tc_ingress_passes_fragments_udp_other_ports_and_the_original_services_connections_unchanged() {
    ingress_leaves_other_packets_untouched(Ingress::Tc);
}

#[test]
fn xdp_ingress_passes_fragments_udp_other_ports_and_the_original_services_connections_unchanged() {
    ingress_leaves_other_packets_untouched(Ingress::Xdp);
}

#[test]
fn egress_gives_every_packet_from_an_internal_port_its_public_port_and_nothing_else() {
    in_namespace(
        "egress_gives_every_packet_from_an_internal_port_its_public_port_and_nothing_else",
        true,
        |programs| {
            for (client, server, port) in [(CLIENT4, SERVER4, 42001), (CLIENT6, SERVER6, 42002)] {
                for flags in [SYN | ACK, ACK, RST] {
                    let reply =
                        packets::build(&Spec::tcp(server, INTERNAL_HTTPS, client, port, flags));
                    assert_redirected(&reply, &programs.egress(&reply), (HTTPS, port));
                }
                let reply = packets::build(&Spec::tcp(server, INTERNAL, client, port, ACK));
                assert_redirected(&reply, &programs.egress(&reply), (PUBLIC, port));
                // Replies from the listen port (direct connections) and from sshd are untouched.
                for from in [MUXER, PUBLIC] {
                    let other = packets::build(&Spec::tcp(server, from, client, port, ACK));
                    assert_eq!(programs.egress(&other), other);
                }
            }
            let counters = programs.counters();
            let https = counters.ports.iter().find(|p| p.port == HTTPS).unwrap();
            assert_eq!((https.in_packets, https.out_packets), (0, 6));
            assert!(https.out_bytes > 0);
        },
    );
}

#[test]
fn no_listener_on_the_internal_port_means_no_redirect() {
    in_namespace(
        "no_listener_on_the_internal_port_means_no_redirect",
        false,
        |programs| {
            for hook in [Ingress::Tc, Ingress::Xdp] {
                for flags in [SYN, ACK] {
                    let packet = packets::build(&Spec::tcp(CLIENT4, 43001, SERVER4, PUBLIC, flags));
                    assert_eq!(programs.ingress(hook, &packet), packet);
                }
            }
            assert_eq!(programs.counter("passed_no_listener"), 2);
            assert_eq!(programs.counter("passed_untracked"), 2);
            assert_eq!(programs.counter("connections_redirected"), 0);
        },
    );
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
    /// The struct's alignment padding, named so that it is zeroed: the kernel refuses a context
    /// whose bytes after `local_port` are not all zero, and padding holds whatever the stack did.
    _tail: u32,
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
