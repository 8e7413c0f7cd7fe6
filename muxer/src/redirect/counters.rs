//! Reading the per-CPU counter maps.
use aya::maps::PerCpuArray;
use aya::Ebpf;
use muxer_common::{Counter, PortCounter, COUNTERS_MAP, PORT_COUNTERS_MAP};
use serde::{Deserialize, Serialize};

use super::RedirectError;

/// Counters of one public port, summed over CPUs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortCounters {
    /// The public port.
    pub port: u16,
    /// Packets redirected to muxer (TC/XDP mode).
    pub in_packets: u64,
    /// Bytes redirected to muxer.
    pub in_bytes: u64,
    /// Replies given the public port back.
    pub out_packets: u64,
    /// Bytes of those replies.
    pub out_bytes: u64,
}

/// Every kernel counter, summed over CPUs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelCounters {
    /// [`Counter`] values by their names.
    pub global: std::collections::BTreeMap<String, u64>,
    /// Per public port.
    pub ports: Vec<PortCounters>,
}

fn sum(
    map: &PerCpuArray<&aya::maps::MapData, u64>,
    index: u32,
    name: &'static str,
) -> Result<u64, RedirectError> {
    let values = map
        .get(&index, 0)
        .map_err(|source| RedirectError::Map { name, source })?;
    Ok(values.iter().sum())
}

/// Reads every counter of `ebpf` for the public ports, given as `(port, counter slot)`.
pub fn read(ebpf: &Ebpf, ports: &[(u16, u32)]) -> Result<KernelCounters, RedirectError> {
    let open =
        |name: &'static str| -> Result<PerCpuArray<&aya::maps::MapData, u64>, RedirectError> {
            let map = ebpf.map(name).ok_or(RedirectError::Map {
                name,
                source: aya::maps::MapError::InvalidName { name: name.into() },
            })?;
            PerCpuArray::try_from(map).map_err(|source| RedirectError::Map { name, source })
        };
    let global_map = open(COUNTERS_MAP)?;
    let port_map = open(PORT_COUNTERS_MAP)?;
    let mut counters = KernelCounters::default();
    for counter in Counter::ALL {
        counters.global.insert(
            counter.name().into(),
            sum(&global_map, counter as u32, COUNTERS_MAP)?,
        );
    }
    for &(port, slot) in ports {
        let value = |counter: PortCounter| sum(&port_map, counter.index(slot), PORT_COUNTERS_MAP);
        counters.ports.push(PortCounters {
            port,
            in_packets: value(PortCounter::InPackets)?,
            in_bytes: value(PortCounter::InBytes)?,
            out_packets: value(PortCounter::OutPackets)?,
            out_bytes: value(PortCounter::OutBytes)?,
        });
    }
    Ok(counters)
}
