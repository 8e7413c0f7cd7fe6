//! sk_lookup programs already attached to the network namespace when muxer attaches its own: an
//! earlier muxer that is still alive (hung, or not yet exited) keeps its link, and its program
//! would keep assigning new connections to its own sockets.
//!
//! muxer's program assigns with `BPF_SK_LOOKUP_F_REPLACE`, and programs run in the order they were
//! attached, so the newest muxer's choice wins in any case. Beyond that, a link of an earlier
//! muxer's program (same name) is detached at start when the process may (it takes CAP_SYS_ADMIN to
//! open another process's link by id); otherwise it is named in a warning. Other sk_lookup programs
//! are only reported.
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use aya::programs::links::LinkType;
use tracing::warn;

/// `BPF_PROG_QUERY`, `BPF_LINK_GET_FD_BY_ID`, `BPF_LINK_DETACH` (uapi `enum bpf_cmd`).
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `BPF_SK_LOOKUP` in uapi `enum bpf_attach_type`.
const BPF_SK_LOOKUP: u32 = 36;
/// Most programs listed; more than this many sk_lookup programs on one namespace is not a case.
const MAX_PROGRAMS: usize = 64;

/// The `query` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// `bpf(cmd, attr, size_of(attr))`, its result or the OS error.
///
/// # Safety
/// `attr` must be a valid attribute for `cmd`, and every pointer in it must be valid for the
/// kernel to read or write for the call's duration.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: the caller guarantees `attr` is what `cmd` expects; its size is passed with it.
    let result =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(result)
}

/// The ids of the sk_lookup programs attached to the network namespace `netns`.
fn attached_programs(netns: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    let mut ids = vec![0u32; MAX_PROGRAMS];
    let mut attr = QueryAttr {
        target_fd: netns.as_raw_fd() as u32,
        attach_type: BPF_SK_LOOKUP,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: MAX_PROGRAMS as u32,
        ..QueryAttr::default()
    };
    // SAFETY: a BPF_PROG_QUERY attribute; `prog_ids` points at `prog_cnt` u32s that outlive the
    // call.
    unsafe { bpf(BPF_PROG_QUERY, &mut attr) }?;
    ids.truncate((attr.prog_cnt as usize).min(MAX_PROGRAMS));
    Ok(ids)
}

/// Detaches the link `id` from whatever it is attached to.
fn detach_link(id: u32) -> std::io::Result<()> {
    // The `*_id` member of `union bpf_attr`: id, next id, open flags.
    let mut by_id = [id, 0, 0];
    // SAFETY: a BPF_LINK_GET_FD_BY_ID attribute, without pointers.
    let fd = unsafe { bpf(BPF_LINK_GET_FD_BY_ID, &mut by_id) }?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut detach = [link.as_raw_fd() as u32];
    // SAFETY: a BPF_LINK_DETACH attribute, without pointers.
    unsafe { bpf(BPF_LINK_DETACH, &mut detach) }?;
    Ok(())
}

/// Finds the sk_lookup programs on `netns` before muxer attaches its program `name`, detaches the
/// links of earlier muxers' (when permitted) and reports the rest.
pub(crate) fn remove_stale(netns: BorrowedFd<'_>, name: &str) {
    let programs = match attached_programs(netns) {
        Ok(programs) if programs.is_empty() => return,
        Ok(programs) => programs,
        Err(error) => {
            warn!(%error, "cannot list the sk_lookup programs already on this network namespace");
            return;
        }
    };
    let names: Vec<(u32, Option<String>)> = programs
        .iter()
        .map(|&id| {
            let name = aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .find(|info| info.id() == id)
                .and_then(|info| info.name_as_str().map(str::to_owned));
            (id, name)
        })
        .collect();
    let stale: Vec<u32> = names
        .iter()
        .filter(|(_, program)| program.as_deref() == Some(name))
        .map(|&(id, _)| id)
        .collect();
    let mut removed = Vec::new();
    for link in aya::programs::loaded_links().filter_map(Result::ok) {
        if link.link_type().ok() != Some(LinkType::Netns) || !stale.contains(&link.program_id()) {
            continue;
        }
        match detach_link(link.id()) {
            Ok(()) => {
                removed.push(link.program_id());
                warn!(
                    link = link.id(),
                    program = link.program_id(),
                    "removed a stale sk_lookup link of an earlier muxer from this network namespace"
                );
            }
            Err(error) => {
                warn!(link = link.id(), %error, "cannot remove an earlier muxer's sk_lookup link")
            }
        }
    }
    let remaining: Vec<&(u32, Option<String>)> = names
        .iter()
        .filter(|(id, _)| !removed.contains(id))
        .collect();
    if !remaining.is_empty() {
        // Without CAP_SYS_ADMIN neither names nor links can be read: say what is known.
        warn!(
            programs = ?remaining,
            "other sk_lookup programs on this network namespace; muxer's assignment replaces theirs for the public ports"
        );
    }
}
