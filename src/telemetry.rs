//! Traces (OpenTelemetry): whether they are on, the spans parley's parts open, and the W3C
//! `traceparent` of the current span for outgoing requests. A layer below every part (the HTTP
//! layer, the agent, the model, the tools and the store all use it, none of them owns it); the
//! exporter ([`export`]) is installed by the wiring (`main.rs`, from `crate::app::trace_settings`).
//!
//! Off (no `PARLEY_OTLP_ENDPOINT`, the default), nothing here creates a span: every helper checks
//! one process-wide flag first and hands back [`Span::none()`] or the bare future, so the hot path
//! neither allocates nor records anything for traces.
//!
//! Every span parley opens for traces has the target [`TARGET`], which the wiring gives to the
//! OpenTelemetry layer only: the log lines stay as they are with traces on.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing::instrument::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of every span opened for traces (kept out of the log lines).
pub const TARGET: &str = "parley_otel";

/// Whether traces are exported; set once at start-up.
static ON: AtomicBool = AtomicBool::new(false);

/// Turns span creation on for this process (the wiring does, once the exporter is installed).
pub fn enable() {
    ON.store(true, Ordering::Relaxed);
}

/// Whether parley creates spans for traces.
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Runs `work` inside the span `make` builds when traces are on; off, `work` runs bare.
pub async fn traced<F: Future>(make: impl FnOnce() -> Span, work: F) -> F::Output {
    if enabled() { work.instrument(make()).await } else { work.await }
}

/// Renames a span that has started (`otel.name` is read only when a span starts): the request
/// span learns its route template once routed.
pub fn rename(span: &Span, name: String) {
    span.context().span().update_name(name);
}

/// Marks the current span as failed (`otel.status_code = ERROR`, a field it must declare) when
/// `failed` says `outcome` is a failure and traces are on; hands `outcome` back.
pub fn failed_if<T>(outcome: T, failed: impl FnOnce(&T) -> bool) -> T {
    if enabled() && failed(&outcome) {
        Span::current().record("otel.status_code", "ERROR");
    }
    outcome
}

/// The W3C `traceparent` of the current span (`00-<trace id>-<span id>-<flags>`), to send with
/// an outgoing request; `None` when traces are off or no span is current.
pub fn traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let context = Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        )
    })
}

/// Makes `span` continue the trace of an incoming request's `traceparent` (and `tracestate`),
/// when it carries a valid one. Call it before the span is first entered.
pub fn continue_trace(span: &Span, headers: &http::HeaderMap) {
    if headers.get(TRACEPARENT).is_none() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        // Only fails for a span already started or disabled: it then stays a root.
        let _ = span.set_parent(parent);
    }
}

/// The name of the W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

/// Reads propagation fields from an HTTP header map.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The OTLP/HTTP exporter of traces: what the wiring installs when `PARLEY_OTLP_ENDPOINT` is set.
pub mod export {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use opentelemetry::KeyValue;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData, SpanExporter};

    /// Where and as what spans are exported.
    #[derive(Debug, Clone)]
    pub struct TraceSettings {
        /// The OTLP/HTTP traces URL, used as is (`http://collector:4318/v1/traces`).
        pub endpoint: String,
        /// The `service.name` of every span.
        pub service_name: String,
    }

    /// The exporting pipeline: the provider (to flush and shut down) and the tracer the
    /// `tracing-opentelemetry` layer records into.
    #[derive(Debug)]
    pub struct Pipeline {
        /// Owns the batch processor; [`Pipeline::shutdown`] flushes it.
        pub provider: SdkTracerProvider,
        /// The tracer for the layer.
        pub tracer: SdkTracer,
    }

    impl Pipeline {
        /// Exports the spans still queued and stops the exporter (blocking: call it outside the
        /// runtime, or in `spawn_blocking`).
        pub fn shutdown(&self) {
            if let Err(e) = self.provider.shutdown() {
                tracing::warn!(error = %e, "the trace exporter did not shut down cleanly");
            }
        }
    }

    /// Builds the OTLP/HTTP (protobuf) exporter behind a batch processor, whose timing follows the
    /// SDK's `OTEL_BSP_*` variables (`OTEL_BSP_SCHEDULE_DELAY`: 5 s by default). The exporter
    /// runs on a thread of its own; an unreachable endpoint costs parley nothing but a log line
    /// now and then (see [`Reported`]). Turns span creation on.
    pub fn install(settings: &TraceSettings) -> anyhow::Result<Pipeline> {
        // reqwest panics without a crypto provider, even for plain http; an installed one stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(settings.endpoint.clone())
            .build()
            .map_err(|e| anyhow::anyhow!("PARLEY_OTLP_ENDPOINT {}: {e}", settings.endpoint))?;
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(Reported::new(exporter, settings.endpoint.clone()))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("parley");
        super::enable();
        Ok(Pipeline { provider, tracer })
    }

    /// How often, at most, failed exports are logged while they keep failing.
    const REPORT_EVERY: Duration = Duration::from_secs(60);

    /// An exporter whose failures are logged, rate-limited: the first failure at once, then one
    /// line per [`REPORT_EVERY`] with how many batches failed meanwhile, and one line when
    /// exporting works again.
    #[derive(Debug)]
    pub struct Reported<E> {
        inner: E,
        endpoint: String,
        state: Mutex<ReportState>,
    }

    #[derive(Debug, Default)]
    struct ReportState {
        /// When a failure was last logged, while exports fail.
        logged: Option<Instant>,
        /// Batches and spans failed since then.
        failed_batches: u64,
        failed_spans: u64,
    }

    impl<E> Reported<E> {
        /// Reports the failures of `inner`, which exports to `endpoint`.
        pub fn new(inner: E, endpoint: String) -> Self {
            Reported { inner, endpoint, state: Mutex::new(ReportState::default()) }
        }

        /// Logs the outcome of one export of `spans` spans, if it is time to; returns whether it
        /// logged a line.
        pub(super) fn report(&self, result: &OTelSdkResult, spans: usize) -> bool {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let endpoint = self.endpoint.as_str();
            match result {
                Ok(()) => {
                    state.failed_batches = 0;
                    state.failed_spans = 0;
                    let recovered = state.logged.take().is_some();
                    if recovered {
                        tracing::info!(endpoint, "trace export works again");
                    }
                    recovered
                }
                Err(e) => {
                    state.failed_batches += 1;
                    state.failed_spans += spans as u64;
                    let due = state.logged.is_none_or(|at| at.elapsed() >= REPORT_EVERY);
                    if due {
                        let (batches, spans) = (state.failed_batches, state.failed_spans);
                        tracing::warn!(endpoint, error = %e, failed_batches = batches, dropped_spans = spans,
                            "could not export traces (logged at most once a minute while it lasts)");
                        state.logged = Some(Instant::now());
                        state.failed_batches = 0;
                        state.failed_spans = 0;
                    }
                    due
                }
            }
        }
    }

    impl<E: SpanExporter> SpanExporter for Reported<E> {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let spans = batch.len();
            let result = self.inner.export(batch).await;
            let _logged = self.report(&result, spans);
            result
        }

        fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
            self.inner.shutdown_with_timeout(timeout)
        }

        fn force_flush(&self) -> OTelSdkResult {
            self.inner.force_flush()
        }

        fn set_resource(&mut self, resource: &Resource) {
            self.inner.set_resource(resource);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_exports_are_logged_once_then_at_most_once_a_minute() {
        use opentelemetry_sdk::error::OTelSdkError;
        let reported = export::Reported::new((), "http://collector/v1/traces".to_owned());
        let failed = || Err(OTelSdkError::InternalFailure("connection refused".to_owned()));
        let logged: Vec<bool> = (0..5).map(|_| reported.report(&failed(), 3)).collect();
        assert_eq!(logged, [true, false, false, false, false], "the first failure only");
        assert!(reported.report(&Ok(()), 3), "the recovery is logged");
        assert!(!reported.report(&Ok(()), 3), "once");
        assert!(reported.report(&failed(), 3), "a new outage is logged at once");
    }

    #[test]
    fn off_nothing_is_made_and_no_traceparent_is_sent() {
        // The flag is process-wide and no unit test turns it on.
        let made = std::cell::Cell::new(false);
        let make = || {
            made.set(true);
            tracing::info_span!("never")
        };
        let current = futures::executor::block_on(traced(make, async { Span::current().is_none() }));
        assert!(current && !made.get(), "the work ran bare");
        assert_eq!(traceparent(), None);
        assert_eq!(failed_if(Err::<(), ()>(()), Result::is_err), Err(()));
    }
}
