//! Process-wide logging and metrics set-up, shared by every subcommand.

use std::sync::Arc;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, with span fields (request_id, room, session).
    Json,
    /// Human-readable lines.
    Text,
}

/// Starts logging to stderr. `RUST_LOG` (or `WEIR_LOG`) sets the filter.
pub fn init_logging(format: LogFormat) {
    let filter = std::env::var("WEIR_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info,str0m=warn,dimpl=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::NONE);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Installs the Prometheus recorder and returns what renders `/metrics`.
pub fn init_metrics() -> anyhow::Result<Arc<dyn Fn() -> String + Send + Sync>> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
            ],
        )?
        .install_recorder()?;
    let upkeep = handle.clone();
    // Histograms are drained on render; upkeep keeps memory flat when nobody scrapes.
    std::thread::Builder::new()
        .name("weir-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                upkeep.run_upkeep();
            }
        })?;
    metrics::gauge!("weir_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(Arc::new(move || handle.render()))
}
