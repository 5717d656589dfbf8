//! Logs, recent errors and traces.
//!
//! - Logs: JSON lines (one object per event, fields flattened) or pretty, level from `RUST_LOG`.
//! - Recent errors: the last WARN/ERROR events, kept for the operations page.
//! - Traces: OpenTelemetry over OTLP/HTTP (JSON encoding) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; only chatmesh's own spans are exported. A send
//!   carries its W3C `traceparent` into the write-back stream entry, so the instance that stores
//!   it continues the same trace. With traces off, a send still gets a fresh trace id, logged by
//!   the instance that accepts it and (at debug level, target `chatmesh::sync`) by the one that
//!   stores it.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;
use crate::domain::Timestamp;

static OTEL_ON: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported; span-building code is skipped entirely when not.
pub fn traces_enabled() -> bool {
    OTEL_ON.load(Ordering::Relaxed)
}

/// Flushes exported spans when dropped (keep it alive until the process exits).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

fn otlp_configured() -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()))
}

fn tracer_provider(instance_id: &str) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .build()
        .map_err(|e| e.to_string())?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "chatmesh".into());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .with_attribute(opentelemetry::KeyValue::new("service.instance.id", instance_id.to_string()))
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber. A second call (tests) keeps the first one.
pub fn init(format: LogFormat, instance_id: &str) -> Telemetry {
    let provider = if otlp_configured() {
        match tracer_provider(instance_id) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("chatmesh: OpenTelemetry exporter not started: {e}");
                None
            }
        }
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("chatmesh"))
            // Our spans only: a dependency's spans (the exporter's own HTTP client among them)
            // would flood the collector or feed back into it.
            .with_filter(Targets::new().with_target("chatmesh", Level::INFO))
    });
    let json = format == LogFormat::Json;
    let json_logs = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stdout)
            .with_filter(env_filter())
    });
    let pretty_logs = (!json)
        .then(|| tracing_subscriber::fmt::layer().compact().with_writer(std::io::stdout).with_filter(env_filter()));
    let result = tracing_subscriber::registry()
        .with(json_logs)
        .with(pretty_logs)
        .with(RecentErrors.with_filter(LevelFilter::WARN))
        .with(otel)
        .try_init();
    if result.is_ok() && provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        OTEL_ON.store(true, Ordering::Relaxed);
    }
    Telemetry { provider: if result.is_ok() { provider } else { None } }
}

// ---- trace context ---------------------------------------------------------------------------

/// The W3C `traceparent` of the current span when traces are on; otherwise a fresh one, so the
/// log lines about one message share a trace id across instances anyway.
pub fn traceparent() -> String {
    if traces_enabled() {
        let cx = tracing::Span::current().context();
        let span = cx.span();
        let sc = span.span_context();
        if sc.is_valid() {
            return format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8());
        }
    }
    format!("00-{:032x}-{:016x}-01", rand::random::<u128>(), rand::random::<u64>() | 1)
}

/// A span for one Socket.IO event (disabled when traces are off).
pub fn event_span(event: &'static str) -> tracing::Span {
    if traces_enabled() {
        tracing::info_span!("socket event", otel.name = event, otel.kind = "server")
    } else {
        tracing::Span::none()
    }
}

/// The trace id part of a `traceparent` (empty when malformed).
pub fn trace_id(traceparent: &str) -> &str {
    traceparent.get(3..35).unwrap_or("")
}

/// Makes `span` a child of the remote context in `traceparent` (no-op when traces are off or the
/// value is not a valid traceparent).
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    if !traces_enabled() || traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

// ---- recent errors ---------------------------------------------------------------------------

const RECENT_ERRORS: usize = 20;
static RECENT: Mutex<VecDeque<ErrorRecord>> = Mutex::new(VecDeque::new());

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ErrorRecord {
    pub at: Timestamp,
    pub level: String,
    pub target: String,
    pub message: String,
}

/// The last WARN/ERROR events of this process, oldest first.
pub fn recent_errors() -> Vec<ErrorRecord> {
    RECENT.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
}

struct RecentErrors;

#[derive(Default)]
struct Fields(String, String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.1, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.1, " {}={value}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for RecentErrors {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut message = fields.0 + &fields.1;
        if message.len() > 500 {
            let mut cut = 500;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let record = ErrorRecord {
            at: Timestamp::now(),
            level: meta.level().to_string(),
            target: meta.target().to_string(),
            message,
        };
        let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_ERRORS {
            recent.pop_front();
        }
        recent.push_back(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_traceparents_are_well_formed_and_distinct() {
        let a = traceparent();
        let b = traceparent();
        assert_ne!(a, b);
        for tp in [&a, &b] {
            let parts: Vec<&str> = tp.split('-').collect();
            assert_eq!(parts.len(), 4, "{tp}");
            assert_eq!((parts[0], parts[1].len(), parts[2].len(), parts[3]), ("00", 32, 16, "01"));
            assert!(parts[1].chars().all(|c| c.is_ascii_hexdigit()));
        }
        assert_eq!(trace_id(&a), a.split('-').nth(1).unwrap());
        assert_eq!(trace_id("garbage"), "");
    }

    #[test]
    fn warnings_are_kept_with_their_fields_and_bounded() {
        let subscriber = tracing_subscriber::registry().with(RecentErrors.with_filter(LevelFilter::WARN));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("not kept");
            for i in 0..RECENT_ERRORS + 5 {
                tracing::warn!(attempt = i, "store write failed");
            }
        });
        let recent = recent_errors();
        assert!(recent.len() <= RECENT_ERRORS);
        let last = recent.last().expect("warnings were kept");
        assert_eq!(last.level, "WARN");
        assert!(last.message.starts_with("store write failed"), "{}", last.message);
        assert!(last.message.contains(&format!("attempt={}", RECENT_ERRORS + 4)), "{}", last.message);
        assert!(recent.iter().all(|r| r.message != "not kept"));
    }
}
