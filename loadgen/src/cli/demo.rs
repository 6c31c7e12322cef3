//! `ledger demo`: a tour of the public API against a running cluster, the Rust port of `scripts/demo.sh`. It
//! prints every request and response and checks each status (and a few answers) against what the README
//! promises; it exits 1 if any differs. Account names get a date-and-random suffix, so the demo can run again on
//! the same data.

use crate::cli::client::{self, Token};
use common::ledger::{shard_of, AccountId, LedgerError};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};
use uuid::Uuid;

/// Longest wait for any answer of the tour, as `demo.sh`'s `curl --max-time 15`.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest wait for the first `/health`, as `demo.sh`'s `curl --max-time 5`: a cluster that is up answers at once.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Names tried for bob before settling for one on alice's shard. With two shards, each name has an even chance,
/// so the bound is never reached; it only keeps the loop finite.
const BOB_NAME_ATTEMPTS_MAX: u32 = 1_000;

/// Money alice and bob start with, and the amounts the tour moves (minor units).
const ALICE_OPENING: i64 = 1_000;
const BOB_OPENING: i64 = 100;
const TRANSFERRED: i64 = 250;
const TOO_MUCH: i64 = 1_000_000;
const CONFLICTING_AMOUNT: i64 = 999;
/// The bank's cash account may go this far below zero: what it can pay out before money comes back.
const CASH_OVERDRAFT_LIMIT: i64 = 1_000_000_000;
const DEPOSITED: i64 = 500;
/// A payment of this much from alice to bob, with a fee to the bank of `FEE`.
const PAID: i64 = 100;
const FEE: i64 = 2;
/// A card payment: this much is held on alice's account for bob, and `CAPTURED` of it captured.
const HELD: i64 = 60;
const CAPTURED: i64 = 45;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[arg(long, env = "LEDGER_URL", value_name = "URL", help = client::URL_HELP)]
    pub url: Option<Url>,
    /// An admin API token, if the coordinator runs with --api-tokens-file (the tour creates accounts). Sent as
    /// `Authorization: Bearer <token>`; never printed.
    #[arg(long, env = "LEDGER_TOKEN", hide_env_values = true)]
    pub token: Option<Token>,
}

/// Why the tour could not run at all (an unexpected answer is counted, not an error).
#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error(
        "no answer from {url}/health ({reason}). Start a cluster with `ledger cluster up` (or scripts/cluster.sh \
         up), or set --url / LEDGER_URL."
    )]
    NoHealth { url: String, reason: String },
    #[error("a generated account name is not a valid id: {0}")]
    AccountName(#[from] LedgerError),
}

/// Exit status when the coordinator cannot be reached (as the client commands): the tour did not run.
const EXIT_NO_ANSWER: u8 = 2;

pub async fn run(args: DemoArgs) -> ExitCode {
    match tour(args).await {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failures) => {
            client::write_stderr(&format!("Demo finished with {failures} unexpected answer(s)."));
            ExitCode::FAILURE
        }
        Err(error) => {
            client::write_stderr(&format!("ledger demo: {error}"));
            match error {
                DemoError::Client(error) => ExitCode::from(error.exit_code()),
                DemoError::NoHealth { .. } => ExitCode::from(EXIT_NO_ANSWER),
                DemoError::AccountName(_) => ExitCode::FAILURE,
            }
        }
    }
}

/// One exchange: the status (`None` when no answer came) and the body as text.
struct Exchange {
    status: Option<StatusCode>,
    body: String,
}

impl Exchange {
    /// A top-level field of the body as text (a string or a number), empty if absent, as `demo.sh`'s `field`.
    fn field(&self, name: &str) -> String {
        let body: Value = serde_json::from_str(&self.body).unwrap_or(Value::Null);
        match body.get(name) {
            Some(Value::String(text)) => text.clone(),
            None | Some(Value::Null) | Some(Value::Bool(false)) => String::new(),
            Some(other) => other.to_string(),
        }
    }
}

/// The tour's connection and its running count of unexpected answers.
struct Tour {
    http: reqwest::Client,
    /// The coordinator's URL without a trailing slash; paths are appended to it as they are printed.
    url: String,
    authorization: Option<HeaderValue>,
    step: u32,
    failures: u32,
}

impl Tour {
    fn say(&self, line: &str) {
        client::write_stdout(&format!("{line}\n"));
    }

    fn section(&mut self, title: &str) {
        self.step += 1;
        self.say(&format!("\n== {}. {title}", self.step));
    }

    /// Prints the exchange and whether its status is the expected one.
    async fn call(&mut self, method: Method, path: &str, expected: u16, body: Option<String>) -> Exchange {
        self.say(&format!("\n  > {method} {path}"));
        let mut request = self.http.request(method, format!("{}{path}", self.url)).timeout(CALL_TIMEOUT);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        if let Some(body) = body {
            print_pretty(&body);
            request = request.header(CONTENT_TYPE, "application/json").body(body);
        }
        let exchange = match request.send().await {
            Ok(response) => {
                let status = response.status();
                // A body cut short is shown as what arrived, as curl would have written it.
                let body = response.text().await.unwrap_or_default();
                Exchange { status: Some(status), body: body.trim_end_matches('\n').to_owned() }
            }
            Err(_) => Exchange { status: None, body: String::new() },
        };
        let (code, reason) = match exchange.status {
            Some(status) => (status.as_str().to_owned(), status.canonical_reason().unwrap_or("")),
            None => ("000".to_owned(), "no answer"),
        };
        let verdict = if exchange.status.map(|s| s.as_u16()) == Some(expected) {
            "ok"
        } else {
            self.failures += 1;
            "UNEXPECTED"
        };
        self.say(&format!("  < {code} {reason}   (expected {expected}: {verdict})"));
        if !exchange.body.is_empty() {
            print_pretty(&exchange.body);
        }
        exchange
    }

    /// Reports a check on an answer itself (not only its status).
    fn check(&mut self, actual: &str, expected: &str, label: &str) {
        if actual == expected {
            self.say(&format!("  check: {label} = {expected}: ok"));
        } else {
            let actual = if actual.is_empty() { "<missing>" } else { actual };
            self.say(&format!("  check: {label} is {actual}, expected {expected}: UNEXPECTED"));
            self.failures += 1;
        }
    }
}

/// A JSON text indented by four spaces, pretty as `jq .` prints it; anything else on one indented line.
fn print_pretty(text: &str) {
    let pretty = client::pretty_json(text).unwrap_or_else(|| text.to_owned());
    let indented: String = pretty.lines().map(|line| format!("    {line}\n")).collect();
    client::write_stdout(&indented);
}

/// Runs the tour; returns the number of unexpected answers.
async fn tour(args: DemoArgs) -> Result<u32, DemoError> {
    let authorization = match &args.token {
        Some(token) => token.header()?,
        None => None,
    };
    let url = client::coordinator_url(args.url.as_ref())?.as_str().trim_end_matches('/').to_owned();
    let mut tour = Tour { http: client::http_client()?, url, authorization, step: 0, failures: 0 };

    tour.say(&format!("Ledger demo against {}", tour.url));
    let health = tour.http.get(format!("{}/health", tour.url)).timeout(HEALTH_TIMEOUT).send().await;
    let health: Value = match health {
        Ok(response) => response.json().await.unwrap_or(Value::Null),
        Err(error) => return Err(DemoError::NoHealth { url: tour.url, reason: client::root_cause(&error) }),
    };
    let shards = health["participants"].as_array().map_or(0, Vec::len).max(1) as u32;

    let suffix = format!("{}-{}", utc_timestamp(SystemTime::now()), random_number());
    let alice = format!("alice-{suffix}");
    let mut bob = format!("bob-{suffix}");
    if shards >= 2 {
        // Bob's name is picked so the transfer crosses shards (a two-phase commit with two participants).
        let alice_shard = shard_of(&AccountId::new(alice.as_str())?, shards);
        for n in 1..=BOB_NAME_ATTEMPTS_MAX {
            if shard_of(&AccountId::new(bob.as_str())?, shards) != alice_shard {
                break;
            }
            bob = format!("bob-{suffix}-{n}");
        }
    }

    tour.section("Create two accounts (admin route): alice with 1000, bob with 100 (minor units, e.g. cents)");
    let create = |id: &str, balance: i64| format!(r#"{{"id":"{id}","balance":{balance}}}"#);
    tour.call(Method::POST, "/accounts", 201, Some(create(&alice, ALICE_OPENING))).await;
    tour.call(Method::POST, "/accounts", 201, Some(create(&bob, BOB_OPENING))).await;

    tour.section("Read them back: each lives on the shard its id hashes to");
    let alice_shard = tour.call(Method::GET, &format!("/accounts/{alice}"), 200, None).await.field("shard");
    let bob_shard = tour.call(Method::GET, &format!("/accounts/{bob}"), 200, None).await.field("shard");
    if !alice_shard.is_empty() && alice_shard != bob_shard {
        tour.say(&format!(
            "  alice is on shard {alice_shard}, bob on shard {bob_shard}: transfers between them are cross-shard."
        ));
    } else {
        let alice_shard = if alice_shard.is_empty() { "?" } else { alice_shard.as_str() };
        tour.say(&format!(
            "  alice and bob share shard {alice_shard} (the cluster has {shards} shard(s)): the transfer involves \
             one participant."
        ));
    }

    let transfer_id = Uuid::new_v4();
    let transfer = |id: Option<Uuid>, from: &str, to: &str, amount: i64| match id {
        Some(id) => format!(r#"{{"id":"{id}","from":"{from}","to":"{to}","amount":{amount}}}"#),
        None => format!(r#"{{"from":"{from}","to":"{to}","amount":{amount}}}"#),
    };
    tour.section("A cross-shard transfer of 250 from alice to bob, with a client-chosen id (the idempotency key)");
    let first_body = transfer(Some(transfer_id), &alice, &bob, TRANSFERRED);
    let first = tour.call(Method::POST, "/transfers", 200, Some(first_body.clone())).await;
    tour.check(&first.field("status"), "committed", "status");

    tour.section("Insufficient funds: bob tries to send 1000000; aborted, nothing moves");
    let refused = tour.call(Method::POST, "/transfers", 422, Some(transfer(None, &bob, &alice, TOO_MUCH))).await;
    tour.check(&refused.field("reason"), "insufficient_funds", "reason");

    tour.section("Retry the first transfer with the same id and body (as a client would after a timeout)");
    let again = tour.call(Method::POST, "/transfers", 200, Some(first_body)).await;
    if again.body == first.body {
        tour.say("  check: the answer is the same as the first time: ok");
    } else {
        tour.say("  check: the answer differs from the first one: UNEXPECTED");
        tour.failures += 1;
    }
    tour.say("  Balances: the 250 moved exactly once.");
    let alice_now = tour.call(Method::GET, &format!("/accounts/{alice}"), 200, None).await;
    tour.check(&alice_now.field("balance"), &(ALICE_OPENING - TRANSFERRED).to_string(), "alice's balance");
    let bob_now = tour.call(Method::GET, &format!("/accounts/{bob}"), 200, None).await;
    tour.check(&bob_now.field("balance"), &(BOB_OPENING + TRANSFERRED).to_string(), "bob's balance");

    tour.section("Idempotency conflict: the same id with a different body");
    let conflicting = transfer(Some(transfer_id), &alice, &bob, CONFLICTING_AMOUNT);
    tour.call(Method::POST, "/transfers", 409, Some(conflicting)).await;

    tour.section("Bad request: an amount of zero");
    tour.call(Method::POST, "/transfers", 400, Some(transfer(None, &alice, &bob, 0))).await;

    let cash = format!("cash-{suffix}");
    tour.section("A deposit: the bank's cash account, which may go below zero, pays 500 into alice's");
    let cash_body = format!(r#"{{"id":"{cash}","overdraft_limit":{CASH_OVERDRAFT_LIMIT}}}"#);
    tour.call(Method::POST, "/accounts", 201, Some(cash_body)).await;
    let deposit = tour.call(Method::POST, "/transfers", 200, Some(transfer(None, &cash, &alice, DEPOSITED))).await;
    tour.check(&deposit.field("status"), "committed", "status");
    let cash_now = tour.call(Method::GET, &format!("/accounts/{cash}"), 200, None).await;
    tour.check(&cash_now.field("balance"), &(-DEPOSITED).to_string(), "cash's balance");
    tour.check(&cash_now.field("available"), &(CASH_OVERDRAFT_LIMIT - DEPOSITED).to_string(), "cash's available");

    let fees = format!("fees-{suffix}");
    tour.section("A payment with a fee: alice pays bob 100 and the bank's fees account 2, in one transfer of two legs");
    tour.call(Method::POST, "/accounts", 201, Some(create(&fees, 0))).await;
    let legs = |paid: i64| {
        format!(
            r#"{{"legs":[{{"from":"{alice}","to":"{bob}","amount":{paid}}},{{"from":"{alice}","to":"{fees}","amount":{FEE}}}]}}"#
        )
    };
    let payment = tour.call(Method::POST, "/transfers", 200, Some(legs(PAID))).await;
    tour.check(&payment.field("status"), "committed", "status");
    let alice_after = ALICE_OPENING - TRANSFERRED + DEPOSITED - PAID - FEE;
    let alice_now = tour.call(Method::GET, &format!("/accounts/{alice}"), 200, None).await;
    tour.check(&alice_now.field("balance"), &alice_after.to_string(), "alice's balance");
    tour.say("  A payment whose fee alice cannot cover as well: the fee leg (index 1) fails, so neither leg moves.");
    let refused = tour.call(Method::POST, "/transfers", 422, Some(legs(alice_after - FEE + 1))).await;
    tour.check(&refused.field("leg"), "1", "the failing leg");
    let fees_now = tour.call(Method::GET, &format!("/accounts/{fees}"), 200, None).await;
    tour.check(&fees_now.field("balance"), &FEE.to_string(), "fees' balance");

    tour.section(
        "A card payment: hold 60 of alice's for bob (authorised now), then capture 45 of it (the rest is released)",
    );
    let hold_body = format!(r#"{{"from":"{alice}","to":"{bob}","amount":{HELD},"hold":true,"expires_in_s":600}}"#);
    let hold = tour.call(Method::POST, "/transfers", 200, Some(hold_body)).await;
    tour.check(&hold.field("status"), "held", "status");
    let alice_now = tour.call(Method::GET, &format!("/accounts/{alice}"), 200, None).await;
    tour.check(&alice_now.field("held"), &HELD.to_string(), "alice's held");
    let hold_id = hold.field("id");
    let capture = format!(r#"{{"amount":{CAPTURED}}}"#);
    let captured = tour.call(Method::POST, &format!("/transfers/{hold_id}/capture"), 200, Some(capture)).await;
    tour.check(&captured.field("status"), "captured", "status");
    let alice_now = tour.call(Method::GET, &format!("/accounts/{alice}"), 200, None).await;
    tour.check(&alice_now.field("balance"), &(alice_after - CAPTURED).to_string(), "alice's balance");
    tour.check(&alice_now.field("held"), "0", "alice's held");

    tour.section("Look the transfer up by id");
    let looked_up = tour.call(Method::GET, &format!("/transfers/{transfer_id}"), 200, None).await;
    tour.check(&looked_up.field("status"), "committed", "status");

    tour.section("Decisions some shard has not acknowledged yet (normally none)");
    tour.call(Method::GET, "/transactions?status=unacknowledged", 200, None).await;

    tour.section("Health: the coordinator and every participant it can reach");
    tour.call(Method::GET, "/health", 200, None).await;

    tour.say("");
    if tour.failures == 0 {
        tour.say("Demo finished: every answer was as expected.");
    }
    Ok(tour.failures)
}

/// `YYYYMMDD-HHMMSS` in UTC, as `date -u +%Y%m%d-%H%M%S` prints it: the suffix only has to differ between runs.
fn utc_timestamp(now: SystemTime) -> String {
    let (year, month, day, hour, minute, second) = super::utc_fields(now);
    format!("{year:04}{month:02}{day:02}-{hour:02}{minute:02}{second:02}")
}

/// A number from 0 to 32767, as bash's `$RANDOM`; the low bits of a v4 UUID are random.
fn random_number() -> u16 {
    (Uuid::new_v4().as_u128() & 0x7fff) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "19700101-000000");
        // 2024-02-29 23:59:59 UTC, a leap day.
        assert_eq!(utc_timestamp(UNIX_EPOCH + Duration::from_secs(1_709_251_199)), "20240229-235959");
        // 2026-03-01 00:00:00 UTC.
        assert_eq!(utc_timestamp(UNIX_EPOCH + Duration::from_secs(1_772_323_200)), "20260301-000000");
    }
}
