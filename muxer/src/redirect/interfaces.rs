//! Which interfaces the redirect attaches to.
use std::collections::BTreeSet;

use nix::net::if_::InterfaceFlags;

use super::RedirectError;

/// The configured interfaces (each must exist), or else every up, non-loopback interface that
/// holds an IPv4 or IPv6 address.
pub fn resolve(configured: &[String]) -> Result<Vec<String>, RedirectError> {
    if !configured.is_empty() {
        for name in configured {
            if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
                return Err(RedirectError::UnknownInterface(name.clone()));
            }
        }
        return Ok(configured.to_vec());
    }
    let mut found = BTreeSet::new();
    for entry in nix::ifaddrs::getifaddrs().map_err(RedirectError::ListInterfaces)? {
        let up = entry.flags.contains(InterfaceFlags::IFF_UP);
        let loopback = entry.flags.contains(InterfaceFlags::IFF_LOOPBACK);
        let addressed = entry.address.as_ref().is_some_and(|address| {
            address.as_sockaddr_in().is_some() || address.as_sockaddr_in6().is_some()
        });
        if up && !loopback && addressed {
            found.insert(entry.interface_name);
        }
    }
    if found.is_empty() {
        return Err(RedirectError::NoInterfaces);
    }
    Ok(found.into_iter().collect())
}
