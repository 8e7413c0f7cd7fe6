//! The kernel side of a handover to a successor process (docs/handover.md): no packet of a
//! redirected connection may reach the public port unrewritten while the programs change hands.
//!
//! - TC (TCX) and sk_lookup take several programs per hook: the successor attaches its own beside
//!   the old ones, both steer alike (same internal ports, same listening sockets), and the old
//!   ones go when the old process exits.
//! - XDP takes one program per interface: the old process pins its XDP links under the pin
//!   directory (`handover-<interface>-<mode>`), and the successor opens each pin, removes it, and
//!   swaps its own program into the link (BPF_LINK_UPDATE, atomic). A pin left by a crash in
//!   between is removed with the other stale pins at the next start.
use std::path::{Path, PathBuf};

use aya::pin::PinError;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{ProgramError, Xdp};
use muxer_common::PROGRAM_XDP_INGRESS;
use tracing::{info, warn};

use super::{attach_error, program, IngressHook, IngressLink, Redirect, RedirectError};

/// Name prefix of the pins that carry links to a successor.
const PREFIX: &str = "handover-";

fn pin_path(dir: &Path, interface: &str, hook: IngressHook) -> PathBuf {
    let mode = match hook {
        IngressHook::XdpGeneric => "xdp-generic",
        _ => "xdp-native",
    };
    // bpffs refuses names with dots (reserved); interface names may have them (VLANs).
    dir.join(format!("{PREFIX}{}-{mode}", interface.replace('.', "_")))
}

fn pin_error(source: PinError) -> RedirectError {
    RedirectError::Pin {
        name: "XDP link",
        source,
    }
}

fn link_error(source: impl Into<ProgramError>) -> RedirectError {
    RedirectError::Program {
        name: PROGRAM_XDP_INGRESS,
        source: source.into(),
    }
}

impl Redirect {
    /// Makes the links a successor cannot attach beside (XDP) available to it as pins under
    /// `pin_dir`. Until [`Redirect::withdraw_links`] or this process's exit the links keep
    /// steering as before.
    pub fn offer_links(&mut self, pin_dir: &Path) -> Result<(), RedirectError> {
        let interfaces: Vec<String> = self
            .links
            .iter()
            .filter(|(_, links)| matches!(links.ingress, IngressLink::Xdp(_)))
            .map(|(name, _)| name.clone())
            .collect();
        for interface in interfaces {
            let Some(links) = self.links.get_mut(&interface) else {
                continue;
            };
            let IngressLink::Xdp(id) = std::mem::replace(&mut links.ingress, IngressLink::Offered)
            else {
                continue;
            };
            let xdp: &mut Xdp = program(&mut self.ebpf, PROGRAM_XDP_INGRESS)?;
            let link = xdp.take_link(id).map_err(link_error)?;
            let link = FdLink::try_from(link)?;
            let path = pin_path(pin_dir, &interface, self.ingress);
            let _ = std::fs::remove_file(&path);
            let pinned = link.pin(&path).map_err(pin_error)?;
            self.offered.push((interface, pinned));
        }
        Ok(())
    }

    /// The successor did not take over: the offered links come back (their pins go).
    pub fn withdraw_links(&mut self) {
        for (interface, pinned) in std::mem::take(&mut self.offered) {
            let restored = pinned
                .unpin()
                .map_err(|error| link_error(ProgramError::IOError(error)))
                .and_then(|link| Ok(XdpLink::try_from(link)?))
                .and_then(|link| {
                    program::<Xdp>(&mut self.ebpf, PROGRAM_XDP_INGRESS)?
                        .attach_to_link(link)
                        .map_err(attach_error(PROGRAM_XDP_INGRESS, &interface))
                });
            match (restored, self.links.get_mut(&interface)) {
                (Ok(id), Some(links)) => links.ingress = IngressLink::Xdp(id),
                (Ok(_), None) => {}
                (Err(error), _) => {
                    warn!(interface, %error, "an offered XDP link could not be taken back")
                }
            }
        }
    }

    /// The successor took over: the pins it uses (the counters, at the same paths) stay when
    /// this is dropped, and so do its XDP links (the successor holds them now).
    pub fn leave_to_successor(&mut self) {
        self.pins.clear();
        self.offered.clear();
    }

    /// Takes over the XDP link a previous process offered for `interface`, running this
    /// process's program in it from now on; `None` when there is none.
    pub(super) fn adopt_xdp(
        &mut self,
        pin_dir: &Path,
        interface: &str,
    ) -> Result<Option<(IngressLink, IngressHook)>, RedirectError> {
        for hook in [IngressHook::XdpNative, IngressHook::XdpGeneric] {
            let path = pin_path(pin_dir, interface, hook);
            if !path.exists() {
                continue;
            }
            let pinned = PinnedLink::from_pin(&path)?;
            let link = pinned
                .unpin()
                .map_err(|error| link_error(ProgramError::IOError(error)))?;
            let link = XdpLink::try_from(link)?;
            let xdp: &mut Xdp = program(&mut self.ebpf, PROGRAM_XDP_INGRESS)?;
            let id = xdp
                .attach_to_link(link)
                .map_err(attach_error(PROGRAM_XDP_INGRESS, interface))?;
            info!(interface, "XDP link taken over from the previous process");
            return Ok(Some((IngressLink::Xdp(id), hook)));
        }
        Ok(None)
    }
}
