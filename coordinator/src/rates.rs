//! Counters of answered transfers and a fixed histogram of their latency, kept in atomics so the hot path pays
//! a few relaxed increments. `GET /stats` serves them cumulatively; the console takes the difference of two
//! readings to chart transfers per second and the p50 and p99 latency of each interval.
//!
//! They also keep what was answered in each of the last [`RECENT_SECONDS`] seconds, so that a console opened now
//! shows the recent past at once rather than an empty chart. A second is closed by the first answer or reading
//! after it ends: the counters then hold exactly what was answered until then, so no timer is needed.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds of the latency buckets, in microseconds (the last bucket takes everything above).
pub const LATENCY_BOUNDS_MICROS: [u64; 20] = [
    100, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 7_500, 10_000, 15_000, 20_000, 30_000, 50_000, 100_000,
    250_000, 1_000_000, 5_000_000,
];
const BUCKETS: usize = LATENCY_BOUNDS_MICROS.len() + 1;

/// Seconds of history kept: the console chart's window (three minutes at a reading a second).
pub const RECENT_SECONDS: u64 = 180;

pub struct TransferRates {
    committed: AtomicU64,
    aborted: AtomicU64,
    latency: [AtomicU64; BUCKETS],
    /// The clock that numbers seconds (from 0 at `origin`), and the unix time it started at.
    origin: Instant,
    origin_unix_ms: u64,
    /// The second `recent` was last brought up to: a relaxed read tells the hot path whether a second ended.
    second: AtomicU64,
    recent: Mutex<Recent>,
}

/// What was answered in an interval (or, for `TransferRates::counts`, since the start).
#[derive(Clone, Copy, Default, PartialEq, Debug)]
struct Counts {
    committed: u64,
    aborted: u64,
    latency: [u64; BUCKETS],
}

impl Counts {
    fn since(&self, earlier: &Counts) -> Counts {
        let mut latency = [0; BUCKETS];
        for (bucket, (now, then)) in latency.iter_mut().zip(self.latency.iter().zip(&earlier.latency)) {
            *bucket = now.saturating_sub(*then);
        }
        Counts {
            committed: self.committed.saturating_sub(earlier.committed),
            aborted: self.aborted.saturating_sub(earlier.aborted),
            latency,
        }
    }

    fn is_empty(&self) -> bool {
        *self == Counts::default()
    }
}

struct Recent {
    /// The second in progress, and the counters when it started.
    second: u64,
    at_second_start: Counts,
    /// The seconds before it in which a transfer was answered, oldest first, within the last `RECENT_SECONDS`.
    busy: VecDeque<(u64, Counts)>,
}

impl Default for TransferRates {
    fn default() -> Self {
        TransferRates {
            committed: AtomicU64::default(),
            aborted: AtomicU64::default(),
            latency: Default::default(),
            origin: Instant::now(),
            origin_unix_ms: common::http::now_unix_ms(),
            second: AtomicU64::default(),
            recent: Mutex::new(Recent { second: 0, at_second_start: Counts::default(), busy: VecDeque::new() }),
        }
    }
}

impl TransferRates {
    pub fn record(&self, committed: bool, took: Duration) {
        self.record_in(self.origin.elapsed().as_secs(), committed, took);
    }

    fn record_in(&self, second: u64, committed: bool, took: Duration) {
        if second != self.second.load(Relaxed) {
            self.close_seconds_before(second);
        }
        let counter = if committed { &self.committed } else { &self.aborted };
        counter.fetch_add(1, Relaxed);
        let micros = took.as_micros() as u64;
        let bucket = LATENCY_BOUNDS_MICROS.iter().position(|bound| micros <= *bound).unwrap_or(BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Relaxed);
    }

    fn counts(&self) -> Counts {
        let mut latency = [0; BUCKETS];
        for (to, from) in latency.iter_mut().zip(&self.latency) {
            *to = from.load(Relaxed);
        }
        Counts { committed: self.committed.load(Relaxed), aborted: self.aborted.load(Relaxed), latency }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        // Nothing panics while holding it; if something did, its counts are still counts.
        self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ends the second in progress if `second` is a later one: what was answered in it is kept if anything was.
    fn close_seconds_before(&self, second: u64) {
        let mut recent = self.recent();
        if second <= recent.second {
            return;
        }
        let now = self.counts();
        let answered = now.since(&recent.at_second_start);
        if !answered.is_empty() {
            let closed = recent.second;
            recent.busy.push_back((closed, answered));
        }
        recent.second = second;
        recent.at_second_start = now;
        while recent.busy.front().is_some_and(|(s, _)| s + RECENT_SECONDS <= second) {
            recent.busy.pop_front();
        }
        self.second.store(second, Relaxed);
    }

    pub fn to_json(&self) -> Value {
        let elapsed = self.origin.elapsed();
        self.to_json_at(elapsed.as_secs(), elapsed.as_millis() as u64)
    }

    /// The counters, and `recent`: the seconds of the last `RECENT_SECONDS` (from `from_unix_ms`) in which a
    /// transfer was answered, each with what was answered in it, the one in progress (up to `now_unix_ms`) last.
    fn to_json_at(&self, second: u64, elapsed_ms: u64) -> Value {
        self.close_seconds_before(second);
        let recent = self.recent();
        let counts = self.counts();
        let first = second.saturating_sub(RECENT_SECONDS - 1);
        let in_progress = (recent.second, counts.since(&recent.at_second_start));
        let busy = recent.busy.iter().filter(|(s, _)| *s >= first).chain(std::iter::once(&in_progress));
        let seconds: Vec<Value> = busy
            .filter(|(_, answered)| !answered.is_empty())
            .map(|(s, answered)| {
                json!({
                    "at_unix_ms": self.origin_unix_ms + s * 1_000,
                    "committed": answered.committed,
                    "aborted": answered.aborted,
                    "latency_buckets": answered.latency,
                })
            })
            .collect();
        json!({
            "committed": counts.committed,
            "aborted": counts.aborted,
            "latency_bounds_micros": LATENCY_BOUNDS_MICROS,
            "latency_buckets": counts.latency,
            "recent": {
                "from_unix_ms": self.origin_unix_ms + first * 1_000,
                "now_unix_ms": self.origin_unix_ms + elapsed_ms,
                "busy_seconds": seconds,
            },
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

    #[test]
    fn the_recent_seconds_hold_what_was_answered_in_each() {
        let rates = TransferRates::default();
        let origin = rates.origin_unix_ms;
        let ms = Duration::from_millis;
        rates.record_in(0, true, ms(1));
        rates.record_in(0, true, ms(1));
        rates.record_in(3, false, ms(400));
        rates.record_in(5, true, ms(2));
        let v = rates.to_json_at(5, 5_500);
        assert_eq!(v["recent"]["from_unix_ms"], origin, "the start, less than three minutes ago");
        assert_eq!(v["recent"]["now_unix_ms"], origin + 5_500);
        let seconds = v["recent"]["busy_seconds"].as_array().expect("busy seconds");
        let at: Vec<u64> = seconds.iter().filter_map(|s| s["at_unix_ms"].as_u64()).collect();
        assert_eq!(at, [origin, origin + 3_000, origin + 5_000], "idle seconds are left out; the current one is last");
        assert_eq!((seconds[0]["committed"].as_u64(), seconds[0]["aborted"].as_u64()), (Some(2), Some(0)));
        assert_eq!(seconds[0]["latency_buckets"][5], 2, "1 ms is in the 750..=1000 bucket");
        assert_eq!((seconds[1]["committed"].as_u64(), seconds[1]["aborted"].as_u64()), (Some(0), Some(1)));
        assert_eq!(seconds[2]["committed"], 1, "the second in progress");

        // Three minutes later only the seconds inside the window remain.
        rates.record_in(RECENT_SECONDS + 3, true, ms(1));
        let v = rates.to_json_at(RECENT_SECONDS + 4, (RECENT_SECONDS + 4) * 1_000);
        assert_eq!(v["recent"]["from_unix_ms"], origin + 5_000, "the window starts three minutes back");
        let seconds = v["recent"]["busy_seconds"].as_array().expect("busy seconds");
        let at: Vec<u64> = seconds.iter().filter_map(|s| s["at_unix_ms"].as_u64()).collect();
        assert_eq!(at, [origin + 5_000, origin + (RECENT_SECONDS + 3) * 1_000]);
        assert_eq!(v["committed"], 4, "the counters still count everything");
    }
}
