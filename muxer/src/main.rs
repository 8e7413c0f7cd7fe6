//! The `muxer` command line.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use muxer::config::Config;

// mimalloc: measured lower memory per idle connection than glibc's allocator (docs/benchmarks.md),
// asked through its plain entry points where they give the alignment (`memory::Allocator`).
#[global_allocator]
static ALLOCATOR: muxer::memory::Allocator = muxer::memory::Allocator;

/// Exit status for a config file that cannot be used.
const EXIT_BAD_CONFIG: u8 = 2;
const DEFAULT_CONFIG: &str = "/etc/muxer/muxer.toml";

#[derive(Parser)]
#[command(
    name = "muxer",
    version,
    about = "One public port for SSH, HTTP and TLS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the multiplexer.
    Run {
        /// The TOML config file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a config file and exit: 0 when valid, 2 when not.
    Check {
        /// The TOML config file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show the running daemon's counters (connections, bytes, kernel redirect).
    Stats {
        /// The config file, to find the control socket.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The control socket (overrides the config's `control.socket`).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh until interrupted, with per-second rates.
        #[arg(long)]
        watch: bool,
        /// Refresh interval for --watch.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
    },
    /// Make the running daemon re-read its config file (like SIGHUP), reporting the outcome.
    Reload {
        /// The config file, to find the control socket.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The control socket (overrides the config's `control.socket`).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Start the binary again (a new version after a package upgrade) and hand it every socket:
    /// SSH sessions and other spliced connections go on in the new process (like SIGUSR2). The
    /// old process serves on if the new one fails to start.
    Upgrade {
        /// The config file, to find the control socket.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The control socket (overrides the config's `control.socket`).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Start this binary instead of the one running (its path as it was started).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Print the public-key pin of each TLS certificate muxer serves (`sha256//…`, for curl's
    /// `--pinnedpubkey`) and how clients use it; the self-signed one muxer generated included.
    Cert {
        /// The TOML config file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Read a password from standard input (one line) and print its argon2id hash, for a route's
    /// `auth.basic` (`"user:HASH"`).
    HashPassword,
    /// Install the binary, a default config (if none exists), a system user and a systemd unit.
    Install {
        /// Install under this directory instead of / (for packaging and tests).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Where the binary goes.
        #[arg(long, default_value = "/usr/local/bin/muxer")]
        binary: PathBuf,
        /// Where the config goes (kept if it exists).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Where the unit goes.
        #[arg(long, default_value = "/etc/systemd/system/muxer.service")]
        unit: PathBuf,
        /// The system user to run as.
        #[arg(long, default_value = "muxer")]
        user: String,
        /// Do not create the user or run `systemctl daemon-reload` (implied by --root other than /).
        #[arg(long)]
        no_system_setup: bool,
    },
}

fn current_thread_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            eprintln!("muxer: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        })
}

/// The control socket: given, or from the config file, or the default.
fn control_socket(config: &Path, socket: Option<PathBuf>) -> PathBuf {
    // No secrets: whoever runs `muxer stats` may not have the daemon's environment.
    socket.unwrap_or_else(|| match Config::load_without_secrets(config) {
        Ok(config) => config.control.socket,
        Err(_) => muxer::config::Control::default_socket(),
    })
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("muxer: {error}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Stats {
            config,
            socket,
            json,
            watch,
            interval,
        } => {
            let socket = control_socket(&config, socket);
            let runtime = match current_thread_runtime() {
                Ok(runtime) => runtime,
                Err(code) => return code,
            };
            match runtime.block_on(stats(&socket, json, watch, interval)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("muxer: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Reload { config, socket } => ask_daemon(
            &control_socket(&config, socket),
            "reload",
            "reload rejected, still running the previous config",
        ),
        Command::Upgrade {
            config,
            socket,
            binary,
        } => {
            let command = match binary {
                Some(binary) => match std::path::absolute(&binary) {
                    Ok(binary) => format!("upgrade {}", binary.display()),
                    Err(error) => {
                        eprintln!("muxer: {}: {error}", binary.display());
                        return ExitCode::FAILURE;
                    }
                },
                None => "upgrade".to_owned(),
            };
            ask_daemon(
                &control_socket(&config, socket),
                &command,
                "upgrade failed, the running process serves on",
            )
        }
        Command::Install {
            root,
            binary,
            config,
            unit,
            user,
            no_system_setup,
        } => {
            let system_setup = !no_system_setup && root == Path::new("/");
            let layout = muxer::install::Layout {
                root,
                binary,
                config,
                unit,
                user,
                system_setup,
            };
            match muxer::install::install(&layout) {
                Ok(lines) => {
                    for line in lines {
                        println!("muxer: {line}");
                    }
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("muxer: install failed: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::HashPassword => hash_password(),
        Command::Cert { config } => cert(&config),
        Command::Run { config: path } => {
            // First, before the heap grows: what is touched before this may already be in huge
            // pages.
            let small_pages = muxer::memory::keep_heap_in_small_pages();
            let config = match Config::load(&path) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("muxer: {error}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            // Held to the end of `main`: dropping it writes the lines still queued.
            let _log_writer = muxer::logging::init(config.log_format, config.access_log);
            if let Err(error) = small_pages {
                tracing::warn!(%error, "cannot turn transparent huge pages off: idle memory may grow by megabytes in the background");
            }
            // Connections are served by the worker threads' own runtimes (see `workers`); this
            // one runs signals, reloads, the control socket and metrics.
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("muxer: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(muxer::daemon::run(config, &path)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("muxer: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Sends `command` to the daemon and prints its answer; `rejected` prefixes a refusal, which
/// exits with the bad-config code.
fn ask_daemon(socket: &Path, command: &str, rejected: &str) -> ExitCode {
    let runtime = match current_thread_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(muxer::control::request(socket, command)) {
        Ok(answer) => match (answer.get("ok"), answer.get("error")) {
            (Some(ok), _) => {
                println!("muxer: {}", ok.as_str().unwrap_or("done"));
                ExitCode::SUCCESS
            }
            (_, error) => {
                eprintln!(
                    "muxer: {rejected}: {}",
                    error.and_then(|e| e.as_str()).unwrap_or("unknown error")
                );
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Err(error) => {
            eprintln!("muxer: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn stats(
    socket: &Path,
    json: bool,
    watch: bool,
    interval: std::time::Duration,
) -> Result<(), muxer::control::ControlError> {
    let mut previous = None;
    loop {
        let report = muxer::control::request_stats(socket).await?;
        if json {
            println!("{}", serde_json::to_string(&report).expect("serialisable"));
        } else {
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", muxer::stats_view::table(&report, previous.as_ref()));
        }
        if !watch {
            return Ok(());
        }
        previous = Some(report);
        tokio::time::sleep(interval).await;
    }
}

/// `muxer cert`: each terminating TLS route's certificate, its pin, and client snippets.
fn cert(path: &Path) -> ExitCode {
    let config = match Config::load_without_secrets(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("muxer: {error}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let routes: Vec<_> = config
        .tls
        .iter()
        .flat_map(|tls| &tls.routes)
        .filter(|route| route.terminate)
        .collect();
    if routes.is_empty() {
        eprintln!(
            "muxer: no [[tls.route]] with terminate = true in {}",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    let mut failed = false;
    for route in routes {
        let (key, cert) = match (&route.key, &route.cert) {
            (Some(key), Some(cert)) => (key.clone(), cert.clone()),
            _ => muxer::certs::self_signed_paths(&config.state_dir),
        };
        let pin = match muxer::tls_termination::pin(&key) {
            Ok(pin) => pin,
            Err(error) if route.self_signed && !key.exists() => {
                eprintln!("muxer: {error}: muxer generates the self-signed certificate when it starts; start it first");
                failed = true;
                continue;
            }
            Err(error) => {
                eprintln!("muxer: {error}");
                failed = true;
                continue;
            }
        };
        let host = if route.sni.starts_with('*') || route.default {
            "HOST"
        } else {
            route.sni.as_str()
        };
        println!(
            "route sni = {:?}{}",
            route.sni,
            if route.default {
                " (also the default)"
            } else {
                ""
            }
        );
        println!("  certificate: {}", cert.display());
        println!("  public-key pin: {pin}");
        println!("  curl --pinnedpubkey '{pin}' -k https://{host}:22/v1/models");
        println!("  curl --cacert {} https://{host}:22/v1/models   (a copy of the certificate on the client)", cert.display());
        println!(
            "  python: OpenAI(base_url=\"https://{host}:22/v1\", api_key=KEY, http_client=httpx.Client(verify=\"{}\"))",
            cert.display()
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `muxer hash-password`: the hash of the first line of standard input.
fn hash_password() -> ExitCode {
    let mut line = String::new();
    if let Err(error) = std::io::stdin().read_line(&mut line) {
        eprintln!("muxer: cannot read the password: {error}");
        return ExitCode::FAILURE;
    }
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        eprintln!("muxer: an empty password cannot be hashed; type one and press enter");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    match muxer::http::auth::hash_password(password.as_bytes()) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("muxer: cannot hash the password: {error}");
            ExitCode::FAILURE
        }
    }
}
