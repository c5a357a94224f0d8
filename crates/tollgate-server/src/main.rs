//! The `tollgate` binary: `serve` (the HTTP server) and the policy author's and CI's
//! tools `validate`, `check` and `test`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;
mod server;

// A decision allocates a few dozen small objects on whichever worker thread serves it;
// mimalloc's per-thread heaps keep that cheap under concurrency (see tollgate-alloc for
// how it is asked).
#[global_allocator]
static ALLOCATOR: tollgate_alloc::Mimalloc = tollgate_alloc::Mimalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Policy engine for LLM and AI-agent traffic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the HTTP server (embedded SQLite store by default).
    Serve(server::ServeOptions),
    /// Validates policy documents; prints `FILE:LINE:COL: error: …` and exits 1 on errors.
    Validate {
        /// Policy files (YAML or JSON).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Evaluates one request against a policy file and prints the decision.
    Check {
        /// The policy file.
        file: PathBuf,
        /// The request, a JSON file (`-` for standard input).
        #[arg(long)]
        request: PathBuf,
        /// Fill the decision's `trace`.
        #[arg(long)]
        explain: bool,
    },
    /// Runs scenario files (or folders of `*.yaml`) on a manual clock.
    Test {
        /// Scenario files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(options) => server::run(options),
        Command::Validate { files } => cli::validate(&files),
        Command::Check {
            file,
            request,
            explain,
        } => cli::check(&file, &request, explain),
        Command::Test { paths } => cli::test(&paths),
    }
}

/// The default listen address.
const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8480);
