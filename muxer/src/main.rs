//! The `muxer` command line.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use muxer::config::Config;
use tracing_subscriber::EnvFilter;

/// Exit status for a config file that cannot be used.
const EXIT_BAD_CONFIG: u8 = 2;

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
        #[arg(long, short, default_value = "/etc/muxer/muxer.toml")]
        config: PathBuf,
    },
    /// Show the running daemon's counters (connections, bytes, kernel redirect).
    Stats {
        /// The config file, to find the control socket.
        #[arg(long, short, default_value = "/etc/muxer/muxer.toml")]
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
    /// Validate a config file and exit: 0 when valid, 2 when not.
    Check {
        /// The TOML config file.
        #[arg(long, short, default_value = "/etc/muxer/muxer.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
            let socket = socket.unwrap_or_else(|| match Config::load(&config) {
                Ok(config) => config.control.socket,
                Err(_) => muxer::config::Control::default_socket(),
            });
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
            match runtime.block_on(stats(&socket, json, watch, interval)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("muxer: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("muxer: {error}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            init_logging();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("muxer: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(muxer::daemon::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("muxer: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn stats(
    socket: &std::path::Path,
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

fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}
