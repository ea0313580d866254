//! Prometheus metrics: the series parley exports at `/metrics`, in the Prometheus text format
//! (`prometheus-client`). One [`Metrics`] per running service, handed to the parts that count:
//! the HTTP layer (requests, open streams, rate limits), the agent (turns, model and tool calls,
//! conflicts, replays) and the store decorator (`store::instrumented`). Label values are bounded:
//! route templates, never raw paths; no session ids; the tenant only when asked for.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The labels of each family, typed: a key is built without formatting, and fixed values are
/// `&'static str`, so counting costs a hash and a read lock, not a string per label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToolLabels {
    tool: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToolNameLabels {
    tool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    backend: &'static str,
    op: &'static str,
}

/// The `tenant` label, present only with `PARLEY_METRICS_TENANT_LABEL`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct TenantLabel(Option<String>);

impl EncodeLabelSet for TenantLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some(tenant) => [("tenant", tenant.as_str())].encode(encoder),
            None => Ok(()),
        }
    }
}

/// An HTTP method as a fixed label value (`OTHER` for extension methods: bounded).
fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    }
}

/// Sub-millisecond to seconds: HTTP requests and store operations.
const FAST: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Tens of milliseconds to minutes: turns and model calls.
const SLOW: [f64; 14] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn fast() -> Histogram {
    Histogram::new(FAST.iter().copied())
}

fn slow() -> Histogram {
    Histogram::new(SLOW.iter().copied())
}

/// Every series parley exports.
pub struct Metrics {
    registry: Registry,
    /// Whether `tenant` labels are added (`PARLEY_METRICS_TENANT_LABEL`).
    tenant_label: bool,
    http_requests: Family<(HttpLabels, TenantLabel), Counter>,
    http_duration: Histograms<RouteLabels>,
    turns: Family<(OutcomeLabels, TenantLabel), Counter>,
    turn_duration: Histogram,
    model_first_token: Histograms<ModelLabels>,
    model_duration: Histograms<ModelLabels>,
    model_tokens: Family<TokenLabels, Counter>,
    tool_calls: Family<ToolLabels, Counter>,
    tool_duration: Histograms<ToolNameLabels>,
    store_duration: Histograms<StoreLabels>,
    store_errors: Family<StoreLabels, Counter>,
    open_streams: Gauge,
    running_turns: Gauge,
    turn_conflicts: Counter,
    rate_limited: Counter,
    idempotent_replays: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("tenant_label", &self.tenant_label).finish_non_exhaustive()
    }
}

/// A shared handle to the metrics.
pub type DynMetrics = Arc<Metrics>;

impl Metrics {
    /// Every series registered, at zero; `tenant_label` adds the tenant to the request and turn
    /// counters.
    pub fn new(tenant_label: bool) -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            tenant_label,
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(fast as fn() -> Histogram),
            turns: Family::default(),
            turn_duration: slow(),
            model_first_token: Family::new_with_constructor(slow as fn() -> Histogram),
            model_duration: Family::new_with_constructor(slow as fn() -> Histogram),
            model_tokens: Family::default(),
            tool_calls: Family::default(),
            tool_duration: Family::new_with_constructor(slow as fn() -> Histogram),
            store_duration: Family::new_with_constructor(fast as fn() -> Histogram),
            store_errors: Family::default(),
            open_streams: Gauge::default(),
            running_turns: Gauge::default(),
            turn_conflicts: Counter::default(),
            rate_limited: Counter::default(),
            idempotent_replays: Counter::default(),
        };
        m.register();
        m
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "parley_http_requests",
            "HTTP requests, by route template, method and status",
            self.http_requests.clone(),
        );
        r.register(
            "parley_http_request_duration_seconds",
            "Duration of non-streaming HTTP requests, by route template and method",
            self.http_duration.clone(),
        );
        r.register(
            "parley_turns",
            "Ended turns, by outcome (completed, failed, cancelled, abandoned)",
            self.turns.clone(),
        );
        r.register(
            "parley_turn_duration_seconds",
            "Duration of turns, from claim to end",
            self.turn_duration.clone(),
        );
        r.register(
            "parley_model_first_token_seconds",
            "Time from a model request to its first text",
            self.model_first_token.clone(),
        );
        r.register(
            "parley_model_request_duration_seconds",
            "Duration of model requests, by model",
            self.model_duration.clone(),
        );
        r.register(
            "parley_model_tokens",
            "Tokens the model reported, by model and kind (prompt, completion)",
            self.model_tokens.clone(),
        );
        r.register(
            "parley_tool_calls",
            "Tool calls, by tool and outcome (ok, error)",
            self.tool_calls.clone(),
        );
        r.register(
            "parley_tool_duration_seconds",
            "Duration of tool calls, by tool",
            self.tool_duration.clone(),
        );
        r.register(
            "parley_store_operation_duration_seconds",
            "Duration of store operations, by backend and operation",
            self.store_duration.clone(),
        );
        r.register(
            "parley_store_errors",
            "Failed store operations, by backend and operation",
            self.store_errors.clone(),
        );
        r.register("parley_open_streams", "Server-Sent Event streams open now", self.open_streams.clone());
        r.register("parley_running_turns", "Turns running in this process now", self.running_turns.clone());
        r.register(
            "parley_turn_conflicts",
            "Turns refused (409) or made to wait because their session was busy",
            self.turn_conflicts.clone(),
        );
        r.register(
            "parley_rate_limited",
            "Requests refused by a rate limit (429)",
            self.rate_limited.clone(),
        );
        r.register(
            "parley_idempotent_replays",
            "Retries answered from an earlier request's turn",
            self.idempotent_replays.clone(),
        );
        r.register(
            "parley_build",
            "The running build",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_owned())]),
        );
    }

    /// The metrics in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    /// The content type of [`Metrics::render`].
    pub const CONTENT_TYPE: &'static str = prometheus_text::CONTENT_TYPE;

    fn tenant(&self, tenant: &str) -> TenantLabel {
        TenantLabel(self.tenant_label.then(|| tenant.to_owned()))
    }

    /// One HTTP request ended: `duration` is `None` for a streamed answer.
    pub fn http_request(
        &self,
        route: &str,
        method: &str,
        status: u16,
        tenant: &str,
        duration: Option<Duration>,
    ) {
        let method = method_label(method);
        let counted = HttpLabels { route: route.to_owned(), method, status };
        self.http_requests.get_or_create(&(counted, self.tenant(tenant))).inc();
        if let Some(d) = duration {
            let timed = RouteLabels { route: route.to_owned(), method };
            self.http_duration.get_or_create(&timed).observe(d.as_secs_f64());
        }
        if status == 429 {
            self.rate_limited.inc();
        }
    }

    /// A turn ended with this outcome after `duration`.
    pub fn turn_ended(&self, outcome: &'static str, tenant: &str, duration: Duration) {
        self.turns.get_or_create(&(OutcomeLabels { outcome }, self.tenant(tenant))).inc();
        self.turn_duration.observe(duration.as_secs_f64());
    }

    /// A model request ended (its first text came after `first_token`, if any came).
    pub fn model_request(&self, model: &str, first_token: Option<Duration>, duration: Duration) {
        let labels = ModelLabels { model: model.to_owned() };
        if let Some(first) = first_token {
            self.model_first_token.get_or_create(&labels).observe(first.as_secs_f64());
        }
        self.model_duration.get_or_create(&labels).observe(duration.as_secs_f64());
    }

    /// Tokens the model reported for one request.
    pub fn model_tokens(&self, model: &str, prompt: u64, completion: u64) {
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            self.model_tokens.get_or_create(&TokenLabels { model: model.to_owned(), kind }).inc_by(n);
        }
    }

    /// One tool call ended.
    pub fn tool_call(&self, tool: &str, ok: bool, duration: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        self.tool_calls.get_or_create(&ToolLabels { tool: tool.to_owned(), outcome }).inc();
        self.tool_duration
            .get_or_create(&ToolNameLabels { tool: tool.to_owned() })
            .observe(duration.as_secs_f64());
    }

    /// One store operation ended.
    pub fn store_operation(&self, backend: &'static str, op: &'static str, ok: bool, duration: Duration) {
        let labels = StoreLabels { backend, op };
        self.store_duration.get_or_create(&labels).observe(duration.as_secs_f64());
        if !ok {
            self.store_errors.get_or_create(&labels).inc();
        }
    }

    /// A turn was refused (409) or made to wait because its session was busy.
    pub fn turn_conflict(&self) {
        self.turn_conflicts.inc();
    }

    /// A retry was answered from an earlier request's turn.
    pub fn idempotent_replay(&self) {
        self.idempotent_replays.inc();
    }

    /// Counts a running turn until the guard drops.
    pub fn running_turn(self: &Arc<Self>) -> GaugeGuard {
        GaugeGuard::new(self.running_turns.clone())
    }

    /// Counts an open stream until the guard drops.
    pub fn open_stream(self: &Arc<Self>) -> GaugeGuard {
        GaugeGuard::new(self.open_streams.clone())
    }
}

/// Holds one unit of a gauge while it lives.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_named_as_documented_and_counters_end_in_total() {
        let m = Arc::new(Metrics::new(false));
        m.http_request("/v1/sessions/{id}", "GET", 200, "t", Some(Duration::from_millis(2)));
        m.turn_ended("completed", "t", Duration::from_millis(30));
        let _stream = m.open_stream();
        let text = m.render();
        for series in [
            "parley_http_requests_total{route=\"/v1/sessions/{id}\",method=\"GET\",status=\"200\"} 1",
            "parley_turns_total{outcome=\"completed\"} 1",
            "parley_open_streams 1",
            "parley_running_turns 0",
            "parley_build_info{version=",
            "# TYPE parley_http_request_duration_seconds histogram",
            "parley_http_request_duration_seconds_bucket{route=\"/v1/sessions/{id}\",method=\"GET\",le=\"0.0025\"} 1",
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
        assert!(!text.contains("tenant="), "no tenant label unless asked");
        let tenants = Metrics::new(true);
        tenants.turn_ended("failed", "acme", Duration::from_millis(5));
        assert!(tenants.render().contains("parley_turns_total{outcome=\"failed\",tenant=\"acme\"} 1"));
    }
}
