//! The results: `bench/results.json` and the table printed at the end of a run.

use std::fmt::Write as _;

use serde::Serialize;

use crate::footprint::Footprint;
use crate::growth::Growth;
use crate::replicas::ReplicaFigures;
use crate::stats::Summary;
use crate::streams::{OpenStreams, ProbeResult};

/// Where and how the figures were measured.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// UTC time the run started.
    pub date: String,
    /// Logical CPUs.
    pub cores: usize,
    /// CPU model.
    pub cpu: String,
    /// Total memory, GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// The commit measured (`git describe --always --dirty`: `-dirty` when the tree had changes).
    pub git: String,
    /// The command line.
    pub command: String,
}

/// Figures 1 and 2: turns against the floor, alternating in the same run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TurnFigures {
    /// What the floor is.
    pub floor_kind: String,
    /// Store commands (or statements) per turn, for the Redis and PostgreSQL floors.
    pub commands_per_turn: Option<usize>,
    /// The commands, by name, for the record.
    pub commands: Vec<String>,
    /// Bytes of parley's turn response (the 2a floor answers as many).
    pub response_bytes: usize,
    /// parley's runs.
    pub parley_runs: Vec<Summary>,
    /// The floor's runs, each next to the parley run of the same index.
    pub floor_runs: Vec<Summary>,
    /// Medians of parley's runs.
    pub parley: Summary,
    /// Medians of the floor's runs.
    pub floor: Summary,
    /// Median over runs of parley's rate / the floor's rate in the same run.
    pub ratio: f64,
}

/// The same turn load on two parley processes that differ in one setting, alternating in the
/// same run: figure 7 (`PARLEY_METRICS`) and 8c (`PARLEY_EVENT_LOG`, streamed turns).
#[derive(Debug, Clone, Default, Serialize)]
pub struct OnOff {
    /// With the setting on, per run.
    pub on_runs: Vec<Summary>,
    /// Off, per run.
    pub off_runs: Vec<Summary>,
    /// Medians with it on.
    pub on: Summary,
    /// Medians with it off.
    pub off: Summary,
    /// Median over runs of on ÷ off in the same run.
    pub ratio: f64,
    /// The median rate on ÷ the median rate off.
    pub ratio_of_medians: f64,
}

/// Everything measured on one store.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreFigures {
    /// `memory`, `redis` or `postgres`.
    pub store: String,
    /// Figures 1 and 2.
    pub turns: Option<TurnFigures>,
    /// Figure 3: history reads, per run.
    pub reads_runs: Vec<Summary>,
    /// Figure 3: medians.
    pub reads: Option<Summary>,
    /// Figure 4.
    pub growth: Option<Growth>,
    /// Figure 5a.
    pub stream_overhead: Option<ProbeResult>,
    /// Figure 5a through the AI SDK's UI message stream (`POST /v1/ai-sdk/chat`).
    pub stream_overhead_ai_sdk: Option<ProbeResult>,
    /// Figure 5a through the openai provider: from the upstream's first content chunk.
    pub stream_overhead_upstream: Option<ProbeResult>,
    /// Figure 5b.
    pub open_streams: Option<OpenStreams>,
    /// Figure 7: turns with metrics on against the same with metrics off (memory store).
    pub metrics_cost: Option<OnOff>,
    /// Figure 8: streams on any replica (Redis and PostgreSQL).
    pub replicas: Option<ReplicaFigures>,
    /// Errors that stopped a figure.
    pub errors: Vec<String>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// The machine.
    pub machine: Machine,
    /// The run's settings.
    pub settings: serde_json::Value,
    /// Per store.
    pub stores: Vec<StoreFigures>,
    /// Figure 6.
    pub footprint: Option<Footprint>,
    /// Each target, met or not.
    pub targets: Vec<Target>,
}

/// One target and whether the run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is aimed at.
    pub what: String,
    /// The measured figure.
    pub measured: String,
    /// Whether it is met.
    pub met: bool,
}

fn target(
    out: &mut Vec<Target>,
    what: String,
    value: Option<f64>,
    fmt: impl Fn(f64) -> String,
    ok: impl Fn(f64) -> bool,
) {
    if let Some(v) = value {
        out.push(Target { what, measured: fmt(v), met: ok(v) });
    }
}

/// Checks every target the run has figures for.
pub fn targets(stores: &[StoreFigures], footprint: Option<&Footprint>) -> Vec<Target> {
    let mut out = Vec::new();
    for s in stores {
        let name = &s.store;
        let turns = s.turns.as_ref();
        let floor = if name == "memory" { "bare-axum floor (2a)" } else { "store floor (2b/2c/2d)" };
        target(
            &mut out,
            format!("{name}: turns/s ≥ 50% of the {floor}"),
            turns.map(|t| t.ratio),
            |v| format!("{:.0}%", v * 100.0),
            |v| v >= 0.5,
        );
        if name == "memory" {
            target(
                &mut out,
                "memory: turn p99 ≤ 5 ms at 64 clients".into(),
                turns.map(|t| t.parley.p99_ms),
                |v| format!("{v:.2} ms"),
                |v| v <= 5.0,
            );
        }
        target(
            &mut out,
            format!("{name}: growth ratio ≤ 1.2"),
            s.growth.as_ref().map(|g| g.ratio),
            |v| format!("{v:.2}"),
            |v| v <= 1.2,
        );
        target(
            &mut out,
            format!("{name}: stream overhead p99 ≤ 1 ms"),
            s.stream_overhead.as_ref().map(|p| p.p99_ms),
            |v| format!("{v:.3} ms"),
            |v| v <= 1.0,
        );
        target(
            &mut out,
            format!("{name}: AI SDK stream overhead p99 ≤ 1 ms"),
            s.stream_overhead_ai_sdk.as_ref().map(|p| p.p99_ms),
            |v| format!("{v:.3} ms"),
            |v| v <= 1.0,
        );
        target(
            &mut out,
            format!("{name}: ≤ 64 KiB resident per open stream"),
            s.open_streams.as_ref().map(|o| o.per_stream_bytes),
            |v| format!("{:.1} KiB", v / 1024.0),
            |v| v <= 65536.0,
        );
        target(
            &mut out,
            format!("{name}: turns/s with metrics on ≥ 97% of metrics off"),
            s.metrics_cost.as_ref().map(|m| m.ratio),
            |v| format!("{:.1}%", v * 100.0),
            |v| v >= 0.97,
        );
        replica_targets(&mut out, name, s.replicas.as_ref());
    }
    if let Some(f) = footprint {
        let limit = 2.0 * f.payload_bytes as f64 + 256.0;
        target(
            &mut out,
            format!("memory store: ≤ 2 × payload + 256 = {limit:.0} B per message"),
            Some(f.bytes_per_message),
            |v| format!("{v:.0} B"),
            |v| v <= limit,
        );
    }
    out
}

/// Figure 8's targets (issue 18).
fn replica_targets(out: &mut Vec<Target>, name: &str, r: Option<&ReplicaFigures>) {
    let Some(r) = r else { return };
    let ms = |v: f64| format!("{v:.3} ms");
    let producer = r.producer.as_ref();
    target(
        out,
        format!("{name}: first-delta overhead with the event log p99 ≤ 1 ms"),
        producer.map(|p| p.on.p99_ms),
        ms,
        |v| v <= 1.0,
    );
    target(
        out,
        format!("{name}: follower on another replica, upstream's delta → its socket p99 ≤ 5 ms"),
        r.follow.as_ref().map(|f| f.other_replica.p99_ms),
        ms,
        |v| v <= 5.0,
    );
    target(
        out,
        format!("{name}: streamed turns/s with the event log ≥ 80% of without"),
        r.streamed_turns.as_ref().map(|t| t.ratio_of_medians),
        |v| format!("{:.0}%", v * 100.0),
        |v| v >= 0.8,
    );
    target(
        out,
        format!("{name}: ≤ 64 KiB resident per follower on another replica"),
        r.follower_memory.as_ref().map(|m| m.per_follower_bytes),
        |v| format!("{:.1} KiB", v / 1024.0),
        |v| v <= 65536.0,
    );
}

fn cell(v: Option<String>) -> String {
    v.unwrap_or_else(|| "–".to_owned())
}

fn row(
    table: &mut String,
    label: &str,
    stores: &[StoreFigures],
    f: impl Fn(&StoreFigures) -> Option<String>,
) {
    let cells: Vec<Option<String>> = stores.iter().map(f).collect();
    // A figure that was not measured on any store (not asked for) has no row.
    if cells.iter().all(Option::is_none) {
        return;
    }
    let cells: Vec<String> = cells.into_iter().map(cell).collect();
    let _ = writeln!(table, "| {label} | {} |", cells.join(" | "));
}

/// Figure 8's rows, for the stores that have it.
fn replica_rows(t: &mut String, stores: &[StoreFigures]) {
    fn r(s: &StoreFigures) -> Option<&ReplicaFigures> {
        s.replicas.as_ref()
    }
    let lat = |x: &Summary| format!("{:.3} / {:.3}", x.p50_ms, x.p99_ms);
    row(t, "8a. first delta → client's socket, with the event log p50 / p99 (ms)", stores, |s| {
        r(s)?.producer.as_ref().map(|p| lat(&p.on))
    });
    row(t, "8a. the same without (`PARLEY_EVENT_LOG=false`) p50 / p99 (ms)", stores, |s| {
        r(s)?.producer.as_ref().map(|p| lat(&p.off))
    });
    row(t, "8b. upstream's delta → follower on another replica p50 / p99 (ms)", stores, |s| {
        r(s)?.follow.as_ref().map(|f| format!("{} ({} deltas)", lat(&f.other_replica), f.other_replica.ok))
    });
    row(t, "8b. the same, follower on the running replica p50 / p99 (ms)", stores, |s| {
        r(s)?.follow.as_ref().map(|f| format!("{} ({} deltas)", lat(&f.same_replica), f.same_replica.ok))
    });
    row(t, "8c. streamed turns/s with the log / without (÷ of medians)", stores, |s| {
        r(s)?.streamed_turns.as_ref().map(|m| {
            format!("{:.0} / {:.0} ({:.0}%)", m.on.per_sec, m.off.per_sec, m.ratio_of_medians * 100.0)
        })
    });
    row(t, "8d. resident per follower on another replica (KiB)", stores, |s| {
        r(s)?
            .follower_memory
            .as_ref()
            .map(|m| format!("{:.1} ({} open)", m.per_follower_bytes / 1024.0, m.open))
    });
    row(t, "8e. store bytes per logged event (encoded event's own bytes)", stores, |s| {
        r(s)?
            .log_size
            .as_ref()
            .map(|l| format!("{:.0} ({:.0})", l.store_bytes_per_event, l.body_bytes_per_event))
    });
}

/// The results as a Markdown table (the figures) and a list (the targets).
pub fn markdown(results: &Results) -> String {
    let stores = &results.stores;
    let mut t = String::new();
    let names: Vec<&str> = stores.iter().map(|s| s.store.as_str()).collect();
    let _ = writeln!(t, "| figure | {} |", names.join(" | "));
    let _ = writeln!(t, "|---|{}", "---:|".repeat(names.len()));
    row(&mut t, "1. turns/s (64 clients, 1,000 sessions)", stores, |s| {
        s.turns.as_ref().map(|x| format!("{:.0}", x.parley.per_sec))
    });
    row(&mut t, "1. turn latency p50 / p99 (ms)", stores, |s| {
        s.turns.as_ref().map(|x| format!("{:.2} / {:.2}", x.parley.p50_ms, x.parley.p99_ms))
    });
    row(&mut t, "2. floor turns/s (2a axum, 2b Redis, 2c PostgreSQL)", stores, |s| {
        s.turns.as_ref().map(|x| format!("{:.0}", x.floor.per_sec))
    });
    row(&mut t, "2. store commands per turn", stores, |s| {
        s.turns.as_ref().and_then(|x| x.commands_per_turn).map(|n| n.to_string())
    });
    row(&mut t, "2. parley ÷ floor", stores, |s| {
        s.turns.as_ref().map(|x| format!("{:.0}%", x.ratio * 100.0))
    });
    row(&mut t, "3. history reads/s (limit=50)", stores, |s| {
        s.reads.as_ref().map(|x| format!("{:.0}", x.per_sec))
    });
    row(&mut t, "3. history read p99 (ms)", stores, |s| s.reads.as_ref().map(|x| format!("{:.2}", x.p99_ms)));
    row(&mut t, "4. turn p50: 100k-message session / 10 (ms)", stores, |s| {
        s.growth.as_ref().map(|g| format!("{:.3} / {:.3}", g.big_p50_ms, g.small_p50_ms))
    });
    row(&mut t, "4. growth ratio", stores, |s| s.growth.as_ref().map(|g| format!("{:.2}", g.ratio)));
    row(&mut t, "5. first-delta overhead to the client's socket p50 / p99 (ms)", stores, |s| {
        s.stream_overhead.as_ref().map(|p| format!("{:.3} / {:.3}", p.p50_ms, p.p99_ms))
    });
    row(&mut t, "5. the same to the client's read returning p50 / p99 (ms)", stores, |s| {
        s.stream_overhead.as_ref().map(|p| format!("{:.3} / {:.3}", p.read_p50_ms, p.read_p99_ms))
    });
    row(&mut t, "5. AI SDK dialect: first text-delta to the client's socket p50 / p99 (ms)", stores, |s| {
        s.stream_overhead_ai_sdk.as_ref().map(|p| format!("{:.3} / {:.3}", p.p50_ms, p.p99_ms))
    });
    row(&mut t, "5. openai provider: upstream's chunk to the client's socket p50 / p99 (ms)", stores, |s| {
        s.stream_overhead_upstream.as_ref().map(|p| format!("{:.3} / {:.3}", p.p50_ms, p.p99_ms))
    });
    row(&mut t, "5. resident per open stream (KiB)", stores, |s| {
        s.open_streams.as_ref().map(|o| format!("{:.1} ({} open)", o.per_stream_bytes / 1024.0, o.open))
    });
    row(&mut t, "7. metrics on / off: turns/s (÷)", stores, |s| {
        s.metrics_cost
            .as_ref()
            .map(|m| format!("{:.0} / {:.0} ({:.1}%)", m.on.per_sec, m.off.per_sec, m.ratio * 100.0))
    });
    replica_rows(&mut t, stores);
    if let Some(f) = &results.footprint {
        let _ = writeln!(
            t,
            "\n6. memory store: {:.0} bytes resident per message ({} messages of {} bytes)",
            f.bytes_per_message, f.messages, f.payload_bytes
        );
    }
    let _ = writeln!(t, "\nTargets:");
    for target in &results.targets {
        let mark = if target.met { "met" } else { "MISSED" };
        let _ = writeln!(t, "- {mark}: {} (measured {})", target.what, target.measured);
    }
    for s in stores {
        for e in &s.errors {
            let _ = writeln!(t, "- error on {}: {e}", s.store);
        }
    }
    t
}
