//! The `ledger` command's subcommands that are not the benchmark or the drill: the local cluster under
//! `./data` (`local`), the client of the public API (`client`) and the guided tour (`demo`).

pub mod client;
pub mod demo;
pub mod local;

/// `time` in UTC as (year, month, day, hour, minute, second): a calendar for log lines and account names,
/// which needs no time zone database.
pub(crate) fn utc_fields(time: std::time::SystemTime) -> (u64, u64, u64, u64, u64, u64) {
    let seconds = time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    // The Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day, of_day / 3_600, of_day % 3_600 / 60, of_day % 60)
}

/// `2026-12-04T03:18:59Z`.
pub(crate) fn utc_timestamp(time: std::time::SystemTime) -> String {
    let (year, month, day, hour, minute, second) = utc_fields(time);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}
