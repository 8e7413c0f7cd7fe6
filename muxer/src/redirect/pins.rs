//! The bpffs directory holding the pinned counter maps.
use std::path::Path;

use super::RedirectError;

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

fn io_error<'a>(
    call: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> RedirectError + 'a {
    move |source| RedirectError::Pins {
        call,
        path: path.to_owned(),
        source,
    }
}

/// Makes sure `pin_dir`'s parent is a bpffs mount (mounting one if needed), creates `pin_dir`,
/// and removes pins an earlier muxer left behind (a SIGKILLed daemon cannot clean up), or, for a
/// `successor`, those of the process it takes over from.
pub(crate) fn prepare(pin_dir: &Path, successor: bool) -> Result<(), RedirectError> {
    let mount_point = pin_dir.parent().unwrap_or(Path::new("/"));
    let is_bpffs = rustix::fs::statfs(mount_point)
        .is_ok_and(|fs| u64::try_from(fs.f_type).ok() == Some(BPF_FS_MAGIC));
    if !is_bpffs {
        std::fs::create_dir_all(mount_point).map_err(io_error("mkdir", mount_point))?;
        rustix::mount::mount(
            "bpf",
            mount_point,
            "bpf",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .map_err(|errno| io_error("mount -t bpf", mount_point)(errno.into()))?;
    }
    std::fs::create_dir_all(pin_dir).map_err(io_error("mkdir", pin_dir))?;
    for entry in std::fs::read_dir(pin_dir).map_err(io_error("read", pin_dir))? {
        let path = entry.map_err(io_error("read", pin_dir))?.path();
        std::fs::remove_file(&path).map_err(io_error("remove stale pin", &path))?;
        if successor {
            tracing::debug!(pin = %path.display(), "replacing the previous process's pin");
        } else {
            tracing::info!(pin = %path.display(), "removed a stale pin");
        }
    }
    Ok(())
}
