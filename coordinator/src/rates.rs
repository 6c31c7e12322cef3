//! Counters of answered transfers and a fixed histogram of their latency, kept in atomics so the hot path pays
//! a few relaxed increments. `GET /stats` serves them cumulatively; the console takes the difference of two
//! readings to chart transfers per second and the p50 and p99 latency of each interval.

use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds (the last bucket takes everything above).
pub const LATENCY_BOUNDS_MICROS: [u64; 20] = [
    100, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 7_500, 10_000, 15_000, 20_000, 30_000, 50_000, 100_000,
    250_000, 1_000_000, 5_000_000,
];
const BUCKETS: usize = LATENCY_BOUNDS_MICROS.len() + 1;

#[derive(Default)]
pub struct TransferRates {
    committed: AtomicU64,
    aborted: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl TransferRates {
    pub fn record(&self, committed: bool, took: Duration) {
        let counter = if committed { &self.committed } else { &self.aborted };
        counter.fetch_add(1, Relaxed);
        let micros = took.as_micros() as u64;
        let bucket = LATENCY_BOUNDS_MICROS.iter().position(|bound| micros <= *bound).unwrap_or(BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Relaxed);
    }

    pub fn to_json(&self) -> Value {
        let buckets: Vec<u64> = self.latency.iter().map(|b| b.load(Relaxed)).collect();
        json!({
            "committed": self.committed.load(Relaxed),
            "aborted": self.aborted.load(Relaxed),
            "latency_bounds_micros": LATENCY_BOUNDS_MICROS,
            "latency_buckets": buckets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_in_their_bucket() {
        let rates = TransferRates::default();
        rates.record(true, Duration::from_micros(150));
        rates.record(false, Duration::from_secs(60));
        let v = rates.to_json();
        assert_eq!((v["committed"].as_u64(), v["aborted"].as_u64()), (Some(1), Some(1)));
        assert_eq!(v["latency_buckets"][1], 1, "150 µs is in the 100..=200 bucket");
        assert_eq!(v["latency_buckets"][BUCKETS - 1], 1, "a minute is in the last bucket");
    }
}
