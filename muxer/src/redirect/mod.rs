//! The kernel fast path: loads muxer's eBPF programs, attaches them, and owns the attachments.
//!
//! Two ways to steer the public ports (docs/redirect.md): TC (or XDP) programs on each interface
//! that rewrite each public port to an internal port of its own, where muxer listens, or an
//! sk_lookup program on the network namespace that assigns new connections to muxer's listening
//! sockets.
//!
//! Fail-open rests on three things: the programs are attached through TCX, XDP and netns *links*
//! owned by this process, so they vanish the moment it dies, SIGKILL included; the programs only
//! steer a new connection when a socket of muxer's listens (a closed socket also leaves the
//! sk_lookup program's map); and nothing here pins a link. Stale attachments an earlier muxer may
//! have left (legacy netlink filters, used by kernels without TCX) and stale pins are removed
//! before attaching.

mod counters;
mod handover;
mod interfaces;
mod netns_links;
mod pins;

use std::path::PathBuf;

use aya::maps::{Array, HashMap, MapError, SockMap};
use aya::programs::tc::{self, TcAttachType};
use muxer_common::{PublicPort, Steered, INTERNAL_PORTS_MAP};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};

use aya::programs::sk_lookup::SkLookupLinkId;
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::xdp::XdpLinkId;
use aya::programs::{ProgramError, SchedClassifier, SkLookup, Xdp, XdpMode};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use muxer_common::{
    Listener, COUNTERS_MAP, LISTENERS_MAP, PORT_COUNTERS_MAP, PROGRAM_SK_LOOKUP, PROGRAM_TC_EGRESS,
    PROGRAM_TC_INGRESS, PROGRAM_XDP_INGRESS, PUBLIC_PORTS_MAP,
};
use tracing::{info, warn};

pub use counters::read as read_counters;
pub use counters::{KernelCounters, PortCounters};
pub use interfaces::resolve as resolve_interfaces;

use crate::config::{Redirect as RedirectConfig, RedirectMode};

/// Why the redirect could not be set up. The daemon keeps serving on its listen port.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// No interface qualifies and none was configured.
    #[error("no interface to attach to: none is up, non-loopback and addressed (set redirect.interfaces)")]
    NoInterfaces,
    /// Listing the interfaces failed.
    #[error("cannot list network interfaces: getifaddrs: {0}")]
    ListInterfaces(nix::Error),
    /// A configured interface does not exist.
    #[error("redirect.interfaces: no interface named {0:?}")]
    UnknownInterface(String),
    /// bpffs could not be mounted or the pin directory prepared.
    #[error("{call} {}: {source}", path.display())]
    Pins {
        /// The failing call.
        call: &'static str,
        /// The path it was given.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The embedded object could not be loaded (typically: no CAP_BPF).
    #[error("cannot load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program is missing from the object or of the wrong type.
    #[error("eBPF program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// What failed.
        source: ProgramError,
    },
    /// Attaching a program to an interface failed.
    #[error("attaching {program} to {interface}: {source}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// Interface name.
        interface: String,
        /// What failed.
        source: ProgramError,
    },
    /// A map is missing or could not be written or pinned.
    #[error("eBPF map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What failed.
        source: MapError,
    },
    /// The network namespace to attach the sk_lookup program to could not be opened.
    #[error("cannot open this network namespace ({path}): {source}")]
    Netns {
        /// The namespace file.
        path: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// No listening socket to steer connections to.
    #[error("no listening socket to assign connections to (sk_lookup needs the listen sockets)")]
    NoListener,
    /// A public port has no internal port to redirect to (TC/XDP mode).
    #[error("public port {0} has no internal listening port")]
    NoInternalPort(u16),
    /// An XDP link could not be handed to or taken from another process.
    #[error("handing over an XDP link: {0}")]
    HandoverLink(#[from] aya::programs::links::LinkError),
    /// A map or link could not be pinned.
    #[error("pinning eBPF {name}: {}", with_causes(source))]
    Pin {
        /// Map name.
        name: &'static str,
        /// What failed.
        source: aya::pin::PinError,
    },
}

/// `error` and, after colons, what caused it (aya's pin errors name only the failing call).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text.push_str(": ");
        text.push_str(&error.to_string());
        cause = error.source();
    }
    text
}

impl RedirectError {
    /// Whether the failure is a missing privilege (EPERM/EACCES somewhere in its chain), the one
    /// cause for which the capabilities are worth naming.
    pub fn is_permission(&self) -> bool {
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(error) = current {
            if let Some(io) = error.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::PermissionDenied {
                    return true;
                }
            }
            current = error.source();
        }
        false
    }
}

/// How the ingress program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IngressHook {
    /// TC (TCX link, or a netlink filter on kernels before 6.6).
    Tc,
    /// Native (driver) XDP.
    XdpNative,
    /// Generic (skb) XDP.
    XdpGeneric,
    /// sk_lookup on the network namespace (no per-interface hook).
    SkLookup,
}

/// The links of one interface.
#[derive(Debug)]
struct InterfaceLinks {
    egress: SchedClassifierLinkId,
    ingress: IngressLink,
}

#[derive(Debug)]
enum IngressLink {
    Tc(SchedClassifierLinkId),
    Xdp(XdpLinkId),
    /// Pinned for a successor process ([`Redirect::offer_links`]).
    Offered,
}

/// The attached redirect. Dropping it detaches everything and removes the pins.
pub struct Redirect {
    ebpf: Ebpf,
    pins: Vec<PathBuf>,
    logger: Option<tokio::task::JoinHandle<()>>,
    links: BTreeMap<String, InterfaceLinks>,
    /// The sk_lookup program's link to the network namespace, in that mode.
    netns_link: Option<SkLookupLinkId>,
    /// XDP links pinned for a successor, by interface.
    offered: Vec<(String, aya::programs::links::PinnedLink)>,
    /// Where the counters are pinned, and where a previous process offers its links.
    pin_dir: PathBuf,
    /// Whether a previous process hands its attachments over to this one.
    successor: bool,
    /// `(public port, counter slot)`.
    slots: Vec<(u16, u32)>,
    /// Public port → internal port, in TC/XDP mode.
    internal_ports: BTreeMap<u16, u16>,
    /// The mode attached in (`tc` where `sk_lookup` was asked of a kernel without it).
    mode: RedirectMode,
    /// The mode the config asked for.
    requested: RedirectMode,
    /// muxer's listen port (for direct connections; sk_lookup steers to its sockets).
    pub target_port: u16,
    /// How ingress is hooked.
    pub ingress: IngressHook,
}

impl std::fmt::Debug for Redirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirect")
            .field("interfaces", &self.interfaces())
            .field("ports", &self.ports())
            .field("target_port", &self.target_port)
            .field("ingress", &self.ingress)
            .finish()
    }
}

/// The mode to attach in: `sk_lookup` needs Linux 5.9; older kernels get `tc` ([`Redirect::attach`]
/// says so, once per attachment).
fn effective_mode(wanted: RedirectMode, kernel: Option<KernelVersion>) -> RedirectMode {
    let too_old = kernel.is_some_and(|version| version < KernelVersion::new(5, 9, 0));
    if wanted == RedirectMode::SkLookup && too_old {
        return RedirectMode::Tc;
    }
    wanted
}

/// The program `name` of `ebpf` as a `T`.
pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, RedirectError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(RedirectError::Program {
        name,
        source: ProgramError::UnexpectedProgramType,
    })?;
    program
        .try_into()
        .map_err(|source| RedirectError::Program { name, source })
}

fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, RedirectError> {
    ebpf.map_mut(name).ok_or(RedirectError::Map {
        name,
        source: MapError::InvalidName { name: name.into() },
    })
}

fn attach_error(
    program: &'static str,
    interface: &str,
) -> impl FnOnce(ProgramError) -> RedirectError {
    let interface = interface.to_owned();
    move |source| RedirectError::Attach {
        program,
        interface,
        source,
    }
}

/// Where the public ports lead.
pub struct Targets<'a> {
    /// muxer's listen port.
    pub listen_port: u16,
    /// One listening socket per listen address (sk_lookup mode steers to them).
    pub listeners: &'a [BorrowedFd<'a>],
    /// Public port → the internal port where muxer listens for the connections redirected from it
    /// (TC/XDP mode; see [`Redirect::needs_internal_ports`]).
    pub internal_ports: &'a BTreeMap<u16, u16>,
    /// Whether this process succeeds one that still steers (`muxer upgrade`): its attachments
    /// are taken over or joined, never removed as stale.
    pub successor: bool,
}

impl Redirect {
    /// Whether `config` steers with TC/XDP programs, which need an internal listening port per
    /// public port, in this kernel.
    pub fn needs_internal_ports(config: &RedirectConfig) -> bool {
        matches!(
            effective_mode(config.mode, KernelVersion::current().ok()),
            RedirectMode::Tc | RedirectMode::Xdp
        )
    }

    /// Loads the programs and attaches them so that `config.ports` reach muxer's sockets in
    /// `targets`. Call only once they listen: from the first steered packet on, clients need
    /// them.
    pub fn attach(
        config: &RedirectConfig,
        targets: &Targets<'_>,
    ) -> Result<Redirect, RedirectError> {
        let target_port = targets.listen_port;
        let listeners = targets.listeners;
        let mode = effective_mode(config.mode, KernelVersion::current().ok());
        if mode != config.mode {
            warn!(
                "redirect.mode = \"sk_lookup\" needs Linux 5.9 or later; using \"tc\" on this kernel"
            );
        }
        let interfaces = match mode {
            RedirectMode::SkLookup => {
                if !config.interfaces.is_empty() {
                    warn!("redirect.interfaces is not used in sk_lookup mode: it steers the public ports on every interface of the network namespace");
                }
                Vec::new()
            }
            _ => interfaces::resolve(&config.interfaces)?,
        };
        // Loading first: without CAP_BPF this is the step that fails, with the clearest reason.
        let Loaded { ebpf, logger } = load(&[])?;
        let mut redirect = Redirect {
            ebpf,
            pins: Vec::new(),
            logger: logger.and_then(spawn_logger),
            links: BTreeMap::new(),
            netns_link: None,
            offered: Vec::new(),
            pin_dir: config.pin_dir.clone(),
            successor: targets.successor,
            slots: Vec::new(),
            internal_ports: BTreeMap::new(),
            mode,
            requested: config.mode,
            target_port,
            ingress: IngressHook::Tc,
        };
        redirect.set_ports(&config.ports, targets.internal_ports)?;
        if mode == RedirectMode::SkLookup {
            redirect.attach_netns(listeners)?;
        }
        for interface in &interfaces {
            redirect.attach_interface(interface)?;
        }
        if let Err(error) = pins::prepare(&config.pin_dir, redirect.successor)
            .and_then(|()| redirect.pin_counters(&config.pin_dir))
        {
            warn!(%error, "kernel counters not pinned (muxer stats still shows them)");
        }
        info!(
            interfaces = ?redirect.interfaces(),
            ports = ?redirect.ports(),
            internal_ports = ?redirect.internal_ports,
            ingress = ?redirect.ingress,
            "kernel redirect attached"
        );
        Ok(redirect)
    }

    /// Interfaces the programs are attached to.
    pub fn interfaces(&self) -> Vec<String> {
        self.links.keys().cloned().collect()
    }

    /// Public ports redirected.
    pub fn ports(&self) -> Vec<u16> {
        self.slots.iter().map(|&(port, _)| port).collect()
    }

    /// Public port → internal port (TC/XDP mode; empty in sk_lookup mode).
    pub fn internal_ports(&self) -> &BTreeMap<u16, u16> {
        &self.internal_ports
    }

    /// The mode the config asked for (a reload with another one re-attaches).
    pub fn requested_mode(&self) -> RedirectMode {
        self.requested
    }

    /// Applies new `interfaces` and `ports` without a gap: new interfaces and ports are added
    /// before old ones are removed, so port 22 is never closed or sent astray on the way. (A mode
    /// change needs a new [`Redirect`].)
    pub fn update(
        &mut self,
        config: &RedirectConfig,
        internal_ports: &BTreeMap<u16, u16>,
    ) -> Result<(), RedirectError> {
        if self.mode == RedirectMode::SkLookup {
            self.set_ports(&config.ports, internal_ports)?;
            info!(ports = ?self.ports(), "kernel steering updated");
            return Ok(());
        }
        let wanted = interfaces::resolve(&config.interfaces)?;
        self.set_ports(&config.ports, internal_ports)?;
        for interface in &wanted {
            if !self.links.contains_key(interface) {
                self.attach_interface(interface)?;
            }
        }
        let stale: Vec<String> = self
            .links
            .keys()
            .filter(|name| !wanted.contains(name))
            .cloned()
            .collect();
        for interface in stale {
            self.detach_interface(&interface);
        }
        info!(interfaces = ?self.interfaces(), ports = ?self.ports(), "kernel redirect updated");
        Ok(())
    }

    /// Makes `ports` the redirected ports: added ones first, then removed ones. In TC/XDP mode
    /// each needs its internal port in `internal_ports`.
    fn set_ports(
        &mut self,
        ports: &[u16],
        internal_ports: &BTreeMap<u16, u16>,
    ) -> Result<(), RedirectError> {
        let tc = self.mode != RedirectMode::SkLookup;
        let mut wanted = Vec::with_capacity(ports.len());
        for &port in ports {
            let internal = match internal_ports.get(&port) {
                Some(&internal) if tc => internal,
                None if tc => return Err(RedirectError::NoInternalPort(port)),
                _ => 0,
            };
            wanted.push((port, internal));
        }
        let mut maps = PortMaps::open(&mut self.ebpf)?;
        for &(port, internal) in &wanted {
            if self.slots.iter().any(|&(p, _)| p == port) {
                continue;
            }
            let slot = (0..muxer_common::MAX_PUBLIC_PORTS)
                .find(|slot| !self.slots.iter().any(|&(_, used)| used == *slot))
                .expect("validated: at most MAX_PUBLIC_PORTS ports");
            maps.add(port, slot, internal)?;
            self.slots.push((port, slot));
            if internal != 0 {
                self.internal_ports.insert(port, internal);
            }
        }
        let removed: Vec<u16> = self
            .slots
            .iter()
            .map(|&(p, _)| p)
            .filter(|p| !ports.contains(p))
            .collect();
        for port in removed {
            maps.remove(port, self.internal_ports.remove(&port))?;
            self.slots.retain(|&(p, _)| p != port);
        }
        Ok(())
    }

    /// Puts `listeners` in the sk_lookup program's map, one per family, and attaches the program
    /// to this thread's network namespace.
    fn attach_netns(&mut self, listeners: &[BorrowedFd<'_>]) -> Result<(), RedirectError> {
        let map_error = |source| RedirectError::Map {
            name: LISTENERS_MAP,
            source,
        };
        let mut map: SockMap<_> =
            SockMap::try_from(map_mut(&mut self.ebpf, LISTENERS_MAP)?).map_err(map_error)?;
        let mut placed = [false; Listener::COUNT as usize];
        for listener in listeners {
            let address = socket2::SockRef::from(listener).local_addr();
            let slot = match address.ok().and_then(|address| address.as_socket()) {
                Some(std::net::SocketAddr::V4(_)) => Listener::V4,
                Some(std::net::SocketAddr::V6(_)) => Listener::V6,
                None => continue,
            };
            if std::mem::replace(&mut placed[slot as usize], true) {
                continue;
            }
            map.set(slot as u32, listener, 0).map_err(map_error)?;
        }
        if !placed.contains(&true) {
            return Err(RedirectError::NoListener);
        }
        const NETNS: &str = "/proc/thread-self/ns/net";
        let netns = std::fs::File::open(NETNS).map_err(|source| RedirectError::Netns {
            path: NETNS,
            source,
        })?;
        if !self.successor {
            // A predecessor handing over keeps its link until it exits; ours runs after it and
            // decides (BPF_SK_LOOKUP_F_REPLACE).
            netns_links::remove_stale(netns.as_fd(), PROGRAM_SK_LOOKUP);
        }
        let program: &mut SkLookup = program(&mut self.ebpf, PROGRAM_SK_LOOKUP)?;
        let link = program
            .attach(netns.as_fd())
            .map_err(attach_error(PROGRAM_SK_LOOKUP, "the network namespace"))?;
        self.netns_link = Some(link);
        self.ingress = IngressHook::SkLookup;
        Ok(())
    }

    /// Stops steering new connections to muxer's sockets at once (sk_lookup mode: they leave the
    /// map, so new connections reach the original services while the daemon finishes its
    /// requests). The TC/XDP programs need no such step: they steer only while a socket listens.
    pub fn stop_steering(&mut self) {
        let Some(map) = self.ebpf.map_mut(LISTENERS_MAP) else {
            return;
        };
        if let Ok(mut map) = SockMap::try_from(map) {
            for slot in [Listener::V4, Listener::V6] {
                let _ = map.clear_index(&(slot as u32));
            }
        }
    }

    /// Attaches egress, then ingress, to `interface`.
    fn attach_interface(&mut self, interface: &str) -> Result<(), RedirectError> {
        if !self.successor {
            // A predecessor handing over keeps its programs until it exits; they steer alike.
            remove_stale_filters(interface);
        }
        let has_tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if !has_tcx {
            // Without TCX, TC programs hang off the clsact qdisc.
            let _ = tc::qdisc_add_clsact(interface);
        }
        // Egress first: by the time a SYN is redirected, its SYN-ACK can be restored.
        let egress: &mut SchedClassifier = program(&mut self.ebpf, PROGRAM_TC_EGRESS)?;
        let egress_link = egress
            .attach(interface, TcAttachType::Egress)
            .map_err(attach_error(PROGRAM_TC_EGRESS, interface))?;
        let adopted = match (self.mode, self.successor) {
            (RedirectMode::Xdp, true) => self.adopt_xdp(&self.pin_dir.clone(), interface)?,
            _ => None,
        };
        let ingress = match (self.mode, adopted) {
            (_, Some((link, hook))) => {
                self.ingress = hook;
                link
            }
            (RedirectMode::Xdp, None) => {
                let xdp: &mut Xdp = program(&mut self.ebpf, PROGRAM_XDP_INGRESS)?;
                let link = match xdp.attach(interface, XdpMode::Driver) {
                    Ok(link) => {
                        self.ingress = IngressHook::XdpNative;
                        link
                    }
                    Err(_) => {
                        warn!(interface, "driver has no native XDP; using generic XDP");
                        self.ingress = IngressHook::XdpGeneric;
                        xdp.attach(interface, XdpMode::Skb)
                            .map_err(attach_error(PROGRAM_XDP_INGRESS, interface))?
                    }
                };
                IngressLink::Xdp(link)
            }
            _ => {
                let classifier: &mut SchedClassifier = program(&mut self.ebpf, PROGRAM_TC_INGRESS)?;
                self.ingress = IngressHook::Tc;
                IngressLink::Tc(
                    classifier
                        .attach(interface, TcAttachType::Ingress)
                        .map_err(attach_error(PROGRAM_TC_INGRESS, interface))?,
                )
            }
        };
        self.links.insert(
            interface.to_owned(),
            InterfaceLinks {
                egress: egress_link,
                ingress,
            },
        );
        Ok(())
    }

    /// Detaches ingress, then egress, from `interface`.
    fn detach_interface(&mut self, interface: &str) {
        let Some(links) = self.links.remove(interface) else {
            return;
        };
        let result = match links.ingress {
            IngressLink::Tc(link) => program::<SchedClassifier>(&mut self.ebpf, PROGRAM_TC_INGRESS)
                .and_then(|p| {
                    p.detach(link).map_err(|source| RedirectError::Program {
                        name: PROGRAM_TC_INGRESS,
                        source,
                    })
                }),
            IngressLink::Xdp(link) => {
                program::<Xdp>(&mut self.ebpf, PROGRAM_XDP_INGRESS).and_then(|p| {
                    p.detach(link).map_err(|source| RedirectError::Program {
                        name: PROGRAM_XDP_INGRESS,
                        source,
                    })
                })
            }
            IngressLink::Offered => Ok(()),
        };
        let result = result.and_then(|()| {
            program::<SchedClassifier>(&mut self.ebpf, PROGRAM_TC_EGRESS).and_then(|p| {
                p.detach(links.egress)
                    .map_err(|source| RedirectError::Program {
                        name: PROGRAM_TC_EGRESS,
                        source,
                    })
            })
        });
        if let Err(error) = result {
            warn!(interface, %error, "detaching from an interface failed");
        }
    }

    fn pin_counters(&mut self, dir: &std::path::Path) -> Result<(), RedirectError> {
        for name in [COUNTERS_MAP, PORT_COUNTERS_MAP] {
            let path = dir.join(name);
            let map = map_mut(&mut self.ebpf, name)?;
            map.pin(&path).map_err(|source| RedirectError::Pin {
                name: "counter map",
                source,
            })?;
            self.pins.push(path);
        }
        Ok(())
    }

    /// Reads the kernel counters, summed over CPUs.
    pub fn counters(&self) -> Result<KernelCounters, RedirectError> {
        counters::read(&self.ebpf, &self.slots)
    }
}

impl Drop for Redirect {
    fn drop(&mut self) {
        if let Some(logger) = self.logger.take() {
            logger.abort();
        }
        for pin in &self.pins {
            let _ = std::fs::remove_file(pin);
        }
        for (_, offered) in self.offered.drain(..) {
            let _ = offered.unpin();
        }
        // `ebpf` drops after this body: its links detach, and port 22 reaches sshd again.
        info!("kernel redirect detached");
    }
}

/// Muxer's programs loaded into the kernel (verified, not attached) with their maps configured.
pub struct Loaded {
    /// The object: programs, maps, and later the links.
    pub ebpf: Ebpf,
    /// Reader of the programs' aya-log records, if the object carries the log map.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// Loads the embedded object, redirecting each public port of `ports` (`(public, internal)`;
/// internal 0 for sk_lookup only) from counter slot 0 on, and loads every program. Used by
/// [`Redirect::attach`], and on its own by tests that run the programs with `BPF_PROG_TEST_RUN`.
pub fn load(ports: &[(u16, u16)]) -> Result<Loaded, RedirectError> {
    let mut ebpf = EbpfLoader::new().load(crate::ebpf::OBJECT)?;
    // The log reader must exist before the programs load: it owns the log ring buffer they use.
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(logger) => Some(logger),
        Err(error) => {
            warn!(%error, "eBPF log records unavailable");
            None
        }
    };
    let mut maps = PortMaps::open(&mut ebpf)?;
    for (slot, &(port, internal)) in ports.iter().enumerate() {
        maps.add(port, slot as u32, internal)?;
    }
    for name in [PROGRAM_TC_EGRESS, PROGRAM_TC_INGRESS] {
        let classifier: &mut SchedClassifier = program(&mut ebpf, name)?;
        classifier
            .load()
            .map_err(|source| RedirectError::Program { name, source })?;
    }
    let steer: &mut SkLookup = program(&mut ebpf, PROGRAM_SK_LOOKUP)?;
    steer.load().map_err(|source| RedirectError::Program {
        name: PROGRAM_SK_LOOKUP,
        source,
    })?;
    let xdp: &mut Xdp = program(&mut ebpf, PROGRAM_XDP_INGRESS)?;
    xdp.load().map_err(|source| RedirectError::Program {
        name: PROGRAM_XDP_INGRESS,
        source,
    })?;
    Ok(Loaded { ebpf, logger })
}

/// The two maps that say which ports are steered where, written together.
struct PortMaps<'a> {
    public: HashMap<&'a mut aya::maps::MapData, u16, PublicPort>,
    internal: Array<&'a mut aya::maps::MapData, Steered>,
}

impl<'a> PortMaps<'a> {
    fn open(ebpf: &'a mut Ebpf) -> Result<PortMaps<'a>, RedirectError> {
        let map_error = |name| move |source| RedirectError::Map { name, source };
        let mut public = None;
        let mut internal = None;
        for (name, map) in ebpf.maps_mut() {
            match name {
                PUBLIC_PORTS_MAP => public = Some(map),
                INTERNAL_PORTS_MAP => internal = Some(map),
                _ => {}
            }
        }
        let missing = |name: &'static str| RedirectError::Map {
            name,
            source: MapError::InvalidName { name: name.into() },
        };
        Ok(PortMaps {
            public: HashMap::try_from(public.ok_or_else(|| missing(PUBLIC_PORTS_MAP))?)
                .map_err(map_error(PUBLIC_PORTS_MAP))?,
            internal: Array::try_from(internal.ok_or_else(|| missing(INTERNAL_PORTS_MAP))?)
                .map_err(map_error(INTERNAL_PORTS_MAP))?,
        })
    }

    /// Steers `port` (counted in `slot`) to `internal` (0: no internal port). The internal port
    /// is entered first, so its replies are restored before its first connection arrives.
    fn add(&mut self, port: u16, slot: u32, internal: u16) -> Result<(), RedirectError> {
        let slot = slot as u16;
        if internal != 0 {
            let steered = Steered {
                public_port: port,
                slot,
            };
            self.internal
                .set(u32::from(internal), steered, 0)
                .map_err(|source| RedirectError::Map {
                    name: INTERNAL_PORTS_MAP,
                    source,
                })?;
        }
        let public = PublicPort {
            slot,
            internal_port: internal,
        };
        self.public
            .insert(port, public, 0)
            .map_err(|source| RedirectError::Map {
                name: PUBLIC_PORTS_MAP,
                source,
            })
    }

    /// Stops steering `port`, and forgets its internal port.
    fn remove(&mut self, port: u16, internal: Option<u16>) -> Result<(), RedirectError> {
        self.public
            .remove(&port)
            .map_err(|source| RedirectError::Map {
                name: PUBLIC_PORTS_MAP,
                source,
            })?;
        if let Some(internal) = internal {
            let none = Steered {
                public_port: 0,
                slot: 0,
            };
            self.internal
                .set(u32::from(internal), none, 0)
                .map_err(|source| RedirectError::Map {
                    name: INTERNAL_PORTS_MAP,
                    source,
                })?;
        }
        Ok(())
    }
}

/// Removes TC filters carrying muxer's program names left on `interface` by an earlier muxer on a
/// kernel without TCX (netlink filters outlive their process), and reports TCX attachments of
/// another muxer still running.
fn remove_stale_filters(interface: &str) {
    for (attach_type, name) in [
        (TcAttachType::Ingress, PROGRAM_TC_INGRESS),
        (TcAttachType::Egress, PROGRAM_TC_EGRESS),
    ] {
        if tc::qdisc_detach_program(interface, attach_type, name).is_ok() {
            warn!(
                interface,
                program = name,
                "removed a stale TC filter left by an earlier muxer"
            );
        }
        if let Ok((_, programs)) = SchedClassifier::query_tcx(interface, attach_type) {
            for info in programs {
                if info.name_as_str() == Some(name) {
                    warn!(
                        interface,
                        program = name,
                        id = info.id(),
                        "another process holds muxer's program on this interface; it detaches when that process exits"
                    );
                }
            }
        }
    }
}

/// Forwards the programs' aya-log records to `tracing` (via the `log` bridge).
fn spawn_logger(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> Option<tokio::task::JoinHandle<()>> {
    // SAFETY: the AsyncFd owns the logger, so the ring buffer's fd stays open while registered.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut readable) = registered else {
        warn!("eBPF log records unavailable: cannot watch the log ring buffer");
        return None;
    };
    Some(tokio::spawn(async move {
        while let Ok(mut guard) = readable.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_privilege_names_the_capabilities() {
        assert!(!RedirectError::NoInterfaces.is_permission());
        let denied = RedirectError::Pins {
            call: "mkdir",
            path: "/sys/fs/bpf/muxer".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert!(denied.is_permission());
    }

    #[test]
    fn kernels_before_5_9_get_tc_instead_of_sk_lookup() {
        let old = Some(KernelVersion::new(5, 4, 0));
        let new = Some(KernelVersion::new(6, 18, 0));
        assert_eq!(
            effective_mode(RedirectMode::SkLookup, old),
            RedirectMode::Tc
        );
        assert_eq!(
            effective_mode(RedirectMode::SkLookup, new),
            RedirectMode::SkLookup
        );
        assert_eq!(
            effective_mode(RedirectMode::SkLookup, None),
            RedirectMode::SkLookup
        );
        assert_eq!(effective_mode(RedirectMode::Xdp, old), RedirectMode::Xdp);
    }
}
