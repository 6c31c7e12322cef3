//! The drill as a test: a short run (LEDGER_DRILL_SECONDS, default 20) with kills and pauses must find no
//! violation. The seed is printed; LEDGER_DRILL_SEED replays its schedule.

use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn drill_with_kills_and_pauses_keeps_every_transfer_and_the_books_right() {
    let seconds: u64 = std::env::var("LEDGER_DRILL_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let seed: u64 = std::env::var("LEDGER_DRILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let config = loadgen::drill::Config {
        duration: Duration::from_secs(seconds),
        seed,
        nemesis_interval: Duration::from_secs(2),
        ..Default::default()
    };
    let report = loadgen::drill::run(config).await;
    let summary = report.summary(seed);
    eprintln!("{summary}");
    assert!(
        report.violations.is_empty(),
        "{summary}\n{}\nreplay: LEDGER_DRILL_SEED={seed}",
        report.violations.join("\n")
    );
    assert!(report.kills + report.pauses > 0, "the nemesis acted: {summary}");
    assert!(report.committed > 0, "transfers committed: {summary}");
    assert!(report.holds > 0, "holds were granted: {summary}");
    assert_eq!(report.committed + report.holds + report.aborted + report.unknown, report.transfers);
}
