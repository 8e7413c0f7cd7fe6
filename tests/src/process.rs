//! Child processes that are killed and reaped when their guard drops.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A running child process, killed on drop. Its stderr goes to a log file shown on failure.
pub struct Running {
    child: Option<Child>,
    /// A process this one did not start (a muxer's successor), killed on drop too.
    successor: Option<u32>,
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
            successor: None,
            name: name.to_owned(),
            log,
        }
    }

    /// The process id (the successor's, once [`Running::succeeded_by`] named one).
    pub fn pid(&self) -> u32 {
        match self.successor {
            Some(pid) => pid,
            None => self.child.as_ref().expect("running").id(),
        }
    }

    /// Waits for this process to exit (it handed over to `pid`, writing to the same log), and
    /// follows `pid` from now on: signals go to it, and it is killed on drop.
    pub fn succeeded_by(&mut self, pid: u32, within: std::time::Duration) {
        let status = crate::wait_for(
            &format!("{} to exit after the handover", self.name),
            within,
            || self.try_exit_status(),
        );
        assert!(status.success(), "{} exited with {status}", self.name);
        self.child = None;
        self.successor = Some(pid);
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

    /// Sends `signal` and waits for the exit status (for a successor: until it is gone; the
    /// status is then unknown and reported as 0).
    pub fn signal_and_wait(&mut self, signal: rustix::process::Signal) -> std::process::ExitStatus {
        if let Some(pid) = self.successor.take() {
            kill_and_wait_foreign(pid, signal);
            return std::os::unix::process::ExitStatusExt::from_raw(0);
        }
        let mut child = self.child.take().expect("running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        let _ = rustix::process::kill_process(pid, signal);
        child.wait().expect("wait")
    }

    /// Sends `signal` and waits up to `within` for the exit, then kills: a clean stop that
    /// cannot hang. Returns the exit status unless the process had to be killed.
    pub fn stop(
        &mut self,
        signal: rustix::process::Signal,
        within: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        if self.successor.is_some() {
            self.signal_and_wait(signal);
            return None;
        }
        self.signal(signal);
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        None
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

/// Sends `signal` to `pid`, which is not a child of ours, and waits until it is gone (init
/// reaps it).
fn kill_and_wait_foreign(pid: u32, signal: rustix::process::Signal) {
    let Some(id) = rustix::process::Pid::from_raw(pid as i32) else {
        return;
    };
    let _ = rustix::process::kill_process(id, signal);
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !gone() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(pid) = self.successor.take() {
            kill_and_wait_foreign(pid, rustix::process::Signal::KILL);
            if std::thread::panicking() || std::env::var_os("MUXER_TEST_SHOW_LOGS").is_some() {
                eprintln!(
                    "---- log of {} (and its successors) ----\n{}",
                    self.name,
                    self.log()
                );
            }
        }
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

/// `curl -N` in `netns` (with `extra` arguments) reading the event stream at `url` for at most
/// `max_time` seconds, and the lines it prints, as they arrive.
pub fn sse_curl(
    netns: &crate::netns::Netns,
    url: &str,
    max_time: u32,
    extra: &[&str],
) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut curl = netns
        .command("curl")
        .args(["-sS", "-N", "--max-time", &max_time.to_string()])
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    let lines = lines_of(curl.stdout.take().expect("stdout"));
    (curl, lines)
}

/// The lines of `output`, as they arrive, read on a thread; the receiver ends with the output.
pub fn lines_of(output: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(output).lines() {
            let Ok(line) = line else { return };
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    receiver
}
