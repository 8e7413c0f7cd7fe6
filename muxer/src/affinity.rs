//! Pinning worker threads to CPUs (`listen.pin_workers`).
//!
//! A worker left to the scheduler is woken by the softirq that received its packets and is often
//! placed on that CPU, next to whatever else runs there. For a bulk splice that is the sender's
//! CPU when the sender is local, and the splice then shares one CPU with it while the other CPU
//! idles (docs/benchmarks.md: 15–17 Gbit/s floating against 18–19 pinned, direct 19). A pinned
//! worker stays put and the scheduler moves the *other* busy threads away from it instead. Pinning
//! also makes CPU steering's claims exact: a pinned worker always runs on the CPU it claims.
use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
use tracing::{info, warn};

/// Why a worker could not be pinned. Not fatal: the worker runs unpinned.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    /// Reading the daemon's CPU affinity failed.
    #[error("sched_getaffinity: {0}")]
    Get(rustix::io::Errno),
    /// Pinning the worker's thread failed.
    #[error("sched_setaffinity to CPU {cpu}: {source}")]
    Set {
        /// The CPU asked for.
        cpu: usize,
        /// The OS error.
        source: rustix::io::Errno,
    },
}

/// The CPUs the calling thread may run on (its affinity mask: taskset, systemd's CPUAffinity,
/// a cgroup cpuset), in ascending order.
pub fn allowed_cpus() -> Result<Vec<usize>, AffinityError> {
    let set = sched_getaffinity(None).map_err(AffinityError::Get)?;
    Ok((0..CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect())
}

/// The CPU worker `index` of `workers` is pinned to: the allowed CPUs in turn.
///
/// `None` when fewer than two CPUs are allowed (pinning would change nothing), or when there are
/// fewer workers than allowed CPUs: then which CPUs the workers should keep is anyone's guess (a
/// cgroup CPU quota sizes the default worker count below the CPUs the mask allows, and the
/// first CPUs of a big host are often its busiest), and the scheduler picks better.
pub fn cpu_for_worker(index: usize, workers: usize, allowed: &[usize]) -> Option<usize> {
    (allowed.len() >= 2 && workers >= allowed.len()).then(|| allowed[index % allowed.len()])
}

/// The CPU each of `workers` workers is to be pinned to, in worker order ([`cpu_for_worker`]
/// over this thread's mask); all `None`, with the reason logged, when nothing is pinned.
pub fn plan(workers: usize) -> Vec<Option<usize>> {
    let allowed = allowed_cpus().unwrap_or_else(|error| {
        warn!(%error, "workers not pinned to CPUs");
        Vec::new()
    });
    if workers < allowed.len() {
        info!(
            workers,
            cpus = allowed.len(),
            "fewer workers than CPUs: workers not pinned"
        );
    }
    (0..workers)
        .map(|index| cpu_for_worker(index, workers, &allowed))
        .collect()
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<(), AffinityError> {
    let mut set = CpuSet::new();
    set.set(cpu);
    sched_setaffinity(None, &set).map_err(|source| AffinityError::Set { cpu, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_take_the_allowed_cpus_in_turn() {
        let allowed = [2, 3, 5];
        let cpus: Vec<_> = (0..5).map(|i| cpu_for_worker(i, 5, &allowed)).collect();
        assert_eq!(cpus, [Some(2), Some(3), Some(5), Some(2), Some(3)]);
        let one_each: Vec<_> = (0..3).map(|i| cpu_for_worker(i, 3, &allowed)).collect();
        assert_eq!(one_each, [Some(2), Some(3), Some(5)]);
    }

    #[test]
    fn a_single_allowed_cpu_pins_nothing() {
        assert_eq!(cpu_for_worker(0, 2, &[4]), None);
        assert_eq!(cpu_for_worker(3, 4, &[]), None);
    }

    #[test]
    fn fewer_workers_than_allowed_cpus_pins_nothing() {
        let allowed: Vec<usize> = (0..64).collect();
        assert_eq!(cpu_for_worker(0, 2, &allowed), None);
        assert_eq!(cpu_for_worker(1, 63, &allowed), None);
        assert_eq!(cpu_for_worker(1, 64, &allowed), Some(1));
    }

    #[test]
    fn the_allowed_cpus_are_this_threads_mask() {
        let allowed = allowed_cpus().unwrap();
        assert!(!allowed.is_empty());
        assert!(allowed.windows(2).all(|pair| pair[0] < pair[1]));
        let parallelism = std::thread::available_parallelism().unwrap().get();
        assert!(allowed.len() >= parallelism, "{allowed:?} vs {parallelism}");
    }

    #[test]
    fn pinning_a_thread_confines_it_to_that_cpu() {
        let allowed = allowed_cpus().unwrap();
        let cpu = *allowed.last().unwrap();
        let seen = std::thread::spawn(move || {
            pin_current_thread(cpu).unwrap();
            (allowed_cpus().unwrap(), rustix::thread::sched_getcpu())
        })
        .join()
        .unwrap();
        assert_eq!(seen, (vec![cpu], cpu));
    }
}
