//! `parley-bench`: the benchmark harness of parley (see `bench/README.md`).
//!
//! `parley-bench run` is the load process: it starts parley (release build) with each store and
//! the echo model as a child process, drives it over HTTP on 127.0.0.1, measures the floors next
//! to it in the same run, prints a table and writes `bench/results.json`. The other subcommands
//! are the pieces `run` starts as separate processes.
//!
//! # Layout
//! - `run`: the orchestration and every figure's sequence.
//! - `client`, `load`: a lean keep-alive HTTP/1.1 client and the closed-loop load generator.
//! - `floor`: the bare-axum floor server and the raw Redis / PostgreSQL replays.
//! - `setup`: sessions and histories through the API.
//! - `growth`, `streams`, `footprint`, `replicas`: figures 4, 5, 6 and 8.
//! - `upstream`, `rxstamp`: the OpenAI-compatible upstream of figures 5a and 8b, receive stamps.
//! - `procs`, `stats`, `report`: child processes and /proc, percentiles and medians, the output.

mod client;
mod floor;
mod footprint;
mod growth;
mod load;
mod procs;
mod replicas;
mod report;
mod run;
mod rxstamp;
mod setup;
mod stats;
mod streams;
mod upstream;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use parley::config::StoreKind;

/// The benchmark harness of parley.
#[derive(Debug, Parser)]
#[command(name = "parley-bench", about = "Measures parley against its floors (see bench/README.md).")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Measure every figure and write bench/results.json.
    Run(run::RunArgs),
    /// Figure 8 only, streams on any replica: `run --figures 8` on the stores that keep a turn
    /// event log (Redis and PostgreSQL; others given are left out).
    Replicas(run::RunArgs),
    /// The bare-axum floor server of figure 2a (listens on PARLEY_ADDR).
    FloorServer {
        /// Listen address.
        #[arg(long, env = "PARLEY_ADDR", default_value = "127.0.0.1:8090")]
        addr: SocketAddr,
        /// Size of the JSON body of each answer.
        #[arg(long, default_value_t = 700)]
        body_bytes: usize,
        /// Pin the runtime's workers one per CPU, as parley does with PARLEY_PIN_WORKERS=true.
        #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
        pin_workers: bool,
        /// Turn transparent huge pages off, as parley does with PARLEY_DISABLE_THP=true.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        disable_thp: bool,
    },
    /// Figure 5a: parley's application in-process with an instrumented echo model; prints JSON.
    StreamProbe(streams::ProbeArgs),
    /// Drive a parley that is already running (for profiling it): turns or history reads.
    Load(run::LoadArgs),
    /// Figure 6: memory store footprint in this process; prints JSON.
    Footprint {
        /// Messages to store.
        #[arg(long, default_value_t = 1_000_000)]
        messages: usize,
        /// Content bytes per message.
        #[arg(long, default_value_t = 200)]
        bytes: usize,
        /// Sessions to spread them over.
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parley-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn dispatch(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::Run(args) => runtime()?.block_on(run::run(args)),
        Cmd::Replicas(mut args) => {
            args.figures = vec![8];
            args.stores.retain(|k| matches!(k, StoreKind::Redis | StoreKind::Postgres));
            runtime()?.block_on(run::run(args))
        }
        Cmd::Load(args) => runtime()?.block_on(run::load(args)),
        Cmd::FloorServer { addr, body_bytes, pin_workers, disable_thp } => {
            if disable_thp {
                parley::runtime::disable_transparent_huge_pages()?;
            }
            parley::runtime::build(pin_workers)?.block_on(floor::serve_floor(addr, body_bytes))
        }
        Cmd::StreamProbe(args) => {
            let result = streams::probe(&args)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Cmd::Footprint { messages, bytes, sessions } => {
            // The store as parley runs it by default (PARLEY_DISABLE_THP=true).
            parley::runtime::disable_transparent_huge_pages()?;
            let rt = tokio::runtime::Builder::new_current_thread().build()?;
            let result = rt.block_on(footprint::measure(messages, bytes, sessions))?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
    }
}
