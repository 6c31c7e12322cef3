//! Logging set-up shared by both binaries: tracing to stderr, filtered by `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?}: use text or json")),
        }
    }
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal: log files and pipes get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Latency buckets in seconds: from a fast fsync (100 µs) to a slow prepare round (5 s).
const LATENCY_BUCKETS_SECONDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Records-per-flush buckets: how well group commit batches.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Metric names shared by both binaries.
pub mod names {
    pub const WAL_FLUSH_SECONDS: &str = "ledger_wal_flush_seconds";
    pub const WAL_RECORDS_PER_FLUSH: &str = "ledger_wal_records_per_flush";
    pub const WAL_FSYNCS: &str = "ledger_wal_fsyncs_total";
}

/// How often histogram samples are folded into their buckets, which bounds the samples held in memory to
/// about this long's worth.
const METRICS_UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Installs the process-wide Prometheus recorder (once) and returns the handle that renders `/metrics`.
pub fn install_metrics() -> metrics_exporter_prometheus::PrometheusHandle {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_SECONDS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(names::WAL_RECORDS_PER_FLUSH.into()), BATCH_BUCKETS)
                })
                .expect("bucket lists are non-empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Histogram samples wait in the recorder until upkeep folds them into buckets; without it they pile
            // up for as long as nobody scrapes `/metrics` (8 bytes per sample, several samples per transfer).
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
                std::thread::sleep(METRICS_UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            });
            if let Err(error) = spawned {
                tracing::error!(%error, "cannot start the metrics upkeep thread: histograms grow until scraped");
            }
            // Fails only if another recorder is installed; then ours renders nothing, which tests would show.
            let _ = metrics::set_global_recorder(recorder);
            metrics::describe_histogram!(
                names::WAL_FLUSH_SECONDS,
                "Time of one group commit: sled flush plus fdatasync"
            );
            metrics::describe_histogram!(names::WAL_RECORDS_PER_FLUSH, "Writers released by one group commit");
            metrics::describe_counter!(names::WAL_FSYNCS, "fdatasync calls made by the group-commit flusher");
            handle
        })
        .clone()
}

/// The `/metrics` response: Prometheus text format.
pub fn render_metrics(handle: &metrics_exporter_prometheus::PrometheusHandle) -> axum::response::Response {
    use axum::response::IntoResponse;
    handle.run_upkeep();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}
