//! The `parley` binary: telemetry, configuration, then serve (or migrate, print the spec, or make
//! an API key).

use std::process::ExitCode;

use clap::Parser;
use parley::config::{Cli, Command, Config, KeysCommand, LogFormat, redact_url};
use parley::logwriter::LogGuard;
use parley::telemetry::export::Pipeline;
use tokio::net::TcpListener;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer};

// The profile (bench/README.md) showed glibc malloc/free as the largest single cost of a turn.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Installs the log subscriber, and with `PARLEY_OTLP_ENDPOINT` the trace exporter beside it
/// (returned, to be flushed at the end). Traces off, the subscriber is the plain fmt one.
///
/// Logs go to stderr in batches, from a thread of their own (`parley::logwriter`): the access
/// log costs a request no system call. The guard writes what is left when `main` returns.
fn init_tracing(config: &Config) -> (LogGuard, Option<Pipeline>) {
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = parley::logwriter::stderr();
    // Colours only on a terminal: a log file or a collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let plain = |filter, writer| {
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
        match config.log_format {
            LogFormat::Json => builder.json().init(),
            LogFormat::Text => builder.init(),
        }
    };
    let Some(settings) = parley::app::trace_settings(config) else {
        plain(filter, writer);
        return (guard, None);
    };
    let pipeline = match parley::telemetry::export::install(&settings) {
        Ok(pipeline) => pipeline,
        Err(e) => {
            plain(filter, writer);
            tracing::error!("{e:#}; traces are not exported");
            return (guard, None);
        }
    };
    // Each layer filters for itself: the log lines follow PARLEY_LOG and never show the trace
    // spans; the trace layer takes parley's trace spans whatever PARLEY_LOG says.
    let logs = filter
        .add_directive(format!("{}=off", parley::telemetry::TARGET).parse().expect("a valid directive"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi);
    let fmt = match config.log_format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let traces = tracing_opentelemetry::layer()
        .with_tracer(pipeline.tracer.clone())
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(Targets::new().with_target(parley::telemetry::TARGET, Level::TRACE));
    tracing_subscriber::registry().with(fmt.with_filter(logs)).with(traces).init();
    tracing::info!(endpoint = %settings.endpoint, service = %settings.service_name, "exporting traces over OTLP/HTTP");
    if !settings.endpoint.trim_end_matches('/').ends_with("/v1/traces") {
        tracing::warn!(endpoint = %settings.endpoint, "PARLEY_OTLP_ENDPOINT is used as is and does not end with /v1/traces: collectors usually expect it");
    }
    (guard, Some(pipeline))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = terminate => {} }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let state = parley::app::build_state(&config).await?;
    let listener = TcpListener::bind(config.addr).await?;
    tracing::info!(
        addr = %listener.local_addr()?,
        store = state.agent.store_backend(),
        pinned_workers = config.pin_workers,
        transparent_huge_pages = !parley::runtime::transparent_huge_pages_disabled(),
        model = ?config.model.provider,
        "parley listening"
    );
    if let (Some(addr), Some(metrics)) = (config.http.metrics_addr, state.metrics.clone()) {
        let metrics_listener = TcpListener::bind(addr).await?;
        tracing::info!(addr = %metrics_listener.local_addr()?, "metrics listening");
        let router = parley::http::observe::metrics_router(metrics, None);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(metrics_listener, router).await {
                tracing::error!(error = %e, "the metrics listener stopped");
            }
        });
    }
    parley::app::serve(listener, state, shutdown_signal(), config.http.shutdown_grace).await
}

async fn migrate(config: Config) -> anyhow::Result<()> {
    tracing::info!(database = %redact_url(&config.store.database_url), "applying migrations");
    parley::app::migrate(&config).await
}

/// Prints a new key once, and the entry to append to the keys file (which holds only its hash).
fn new_key(tenant: &str, id: Option<&str>, json: bool) -> anyhow::Result<()> {
    if !parley::auth::key::is_valid_tenant(tenant) {
        anyhow::bail!("the tenant must be 1 to 64 characters from A-Z a-z 0-9 . _ : -");
    }
    let new = parley::auth::key::generate(id).map_err(anyhow::Error::msg)?;
    let sha256 = new.digest.to_hex();
    println!("API key (shown once; give it to the client, it is not stored):\n\n    {}\n", new.key.expose());
    if json {
        let entry = serde_json::json!({"id": new.id, "tenant": tenant, "sha256": sha256});
        println!("Add this entry to the \"keys\" array of PARLEY_API_KEYS_FILE:\n\n{entry}");
    } else {
        println!(
            "Append this to PARLEY_API_KEYS_FILE:\n\n[[keys]]\nid = \"{}\"\ntenant = \"{tenant}\"\nsha256 = \"{sha256}\"",
            new.id
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (_log_writer, traces) = init_tracing(&cli.config);
    let command = cli.command.unwrap_or(Command::Serve);
    let serving = matches!(command, Command::Serve);
    if serving
        && cli.config.disable_thp
        && let Err(e) = parley::runtime::disable_transparent_huge_pages()
    {
        tracing::warn!(error = %e, "could not turn transparent huge pages off; they stay as the system sets them");
    }
    let pin = cli.config.pin_workers && serving;
    let result = match parley::runtime::build(pin) {
        Ok(runtime) => runtime.block_on(run(command, cli.config)),
        Err(e) => Err(anyhow::Error::new(e).context("could not start the runtime")),
    };
    if let Some(traces) = traces {
        // Outside the runtime: the exporter's shutdown blocks until the last spans are sent.
        traces.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("parley: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(config).await,
        Command::Migrate => migrate(config).await,
        Command::Openapi => {
            print!("{}", parley::http::openapi_json());
            Ok(())
        }
        Command::Keys(KeysCommand::New { tenant, id, json }) => new_key(&tenant, id.as_deref(), json),
    }
}
