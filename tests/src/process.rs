//! Child processes that are killed and reaped when their guard drops.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A running child process, killed on drop. Its stderr goes to a log file shown on failure.
pub struct Running {
    child: Option<Child>,
    name: String,
    log: PathBuf,
}

impl Running {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Running {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open log");
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        Running {
            child: Some(child),
            name: name.to_owned(),
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("pid");
        rustix::process::kill_process(pid, signal).expect("kill");
    }

    /// Sends `signal` and waits for the exit status.
    pub fn signal_and_wait(&mut self, signal: rustix::process::Signal) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        let _ = rustix::process::kill_process(pid, signal);
        child.wait().expect("wait")
    }

    /// Returns the exit status if the process has already exited.
    pub fn try_exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Panics with the process's log unless it is still running.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_exit_status() {
            panic!(
                "{} exited with {status}; its log:\n{}",
                self.name,
                self.log()
            );
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() || std::env::var_os("MUXER_TEST_SHOW_LOGS").is_some() {
                eprintln!("---- log of {} ----\n{}", self.name, self.log());
            }
        }
    }
}

/// A memory figure of process `pid` from `/proc/PID/status` in KiB (`field`: "VmRSS", "VmHWM",
/// …), or `None` when the process or the field is gone.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

/// CPU seconds (user + system, including reaped children) process `pid` has used, from
/// `/proc/PID/stat` (0 once the process is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = (11..15)
        .filter_map(|i| fields.get(i))
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}
