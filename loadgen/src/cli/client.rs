//! `ledger account ...`, `ledger transfer`, `ledger transfers` and `ledger audit`: a client of the public HTTP API.
//! Each command sends one request (or, for `account list`, one per page) and prints the answer as an aligned
//! plain-text block, or with `--json` the server's JSON body. The server validates what it validates: the client
//! only parses integers and UUIDs, so a rule lives in one place. A refusal prints `ledger: <status> <code>:
//! <message>` to stderr and exits 1; a coordinator that cannot be reached exits 2 with one clear line.

use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;
use uuid::Uuid;

/// Where `ledger cluster up` and `scripts/cluster.sh up` put the coordinator unless LEDGER_BASE_PORT says
/// otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7100";

/// The help of `--url`, for the client commands and the demo.
pub const URL_HELP: &str = "The coordinator's base URL. Default: the local cluster's (`ledger cluster`), at the port \
                            kept in ./data/cluster.json (or $LEDGER_CLUSTER_DIR/cluster.json), else LEDGER_BASE_PORT, \
                            else http://127.0.0.1:7100";

/// Longest wait for one answer. Longer than the coordinator's default `--request-timeout-ms` (30 s), so a slow
/// request ends with the server's own 408 rather than with the client guessing.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(35);

/// Longest wait for a connection. A reachable coordinator accepts at once; a wait means a host that drops packets.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Accounts asked for per request by `account list`: the server's longest page, so a listing takes few requests.
const ACCOUNT_PAGE_DEFAULT: usize = 1_000;

/// Pages `account list` follows at most: a million accounts at the default page size. A bound, so that a server
/// that kept answering with a cursor could not keep the client looping.
const ACCOUNT_PAGES_MAX: usize = 1_000;

/// Exit status of a command the server refused, a transfer that aborted, or an audit that found a violation.
const EXIT_REFUSED: u8 = 1;
/// Exit status when no answer came (also clap's status for bad arguments): nothing is known about the request.
const EXIT_NO_ANSWER: u8 = 2;

/// An API token. Its `Debug` form hides it, so a debug print of the parsed command line never shows it.
#[derive(Clone)]
pub struct Token(String);

impl From<String> for Token {
    fn from(token: String) -> Self {
        Token(token)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// The `Authorization` header carrying this token; `None` for an empty token (an unset-but-exported
    /// `LEDGER_TOKEN`), which means no token, as in `scripts/demo.sh`.
    pub fn header(&self) -> Result<Option<HeaderValue>, ClientError> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let mut value = HeaderValue::from_str(&format!("Bearer {}", self.0)).map_err(|_| ClientError::BadToken)?;
        value.set_sensitive(true);
        Ok(Some(value))
    }
}

/// The flags every client command takes: which coordinator, with which token, and how to print its answers.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    #[arg(long, env = "LEDGER_URL", value_name = "URL", help = URL_HELP)]
    pub url: Option<Url>,
    /// An API token, sent as `Authorization: Bearer <token>` (needed when the coordinator runs with
    /// --api-tokens-file; creating accounts needs an admin token). Never printed.
    #[arg(long, env = "LEDGER_TOKEN", hide_env_values = true)]
    pub token: Option<Token>,
    /// Print the server's JSON body (pretty) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The flags of `Connection` in a usage line: all optional. Each command spells its usage out, because clap's
/// own puts a flag given on the command line or by its variable in the usage of an error, as if it were
/// required (`Usage: ledger account show --url <URL> <ID>`).
macro_rules! usage {
    ($($text:literal),+) => {
        concat!($($text),+, " [--url URL] [--token TOKEN] [--json]")
    };
}

#[derive(clap::Subcommand, Debug)]
pub enum ClientCommand {
    /// Accounts: create one, show one, or list them all.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Move money from one account to another (a two-phase commit when they sit on different shards), or several
    /// amounts at once, all or nothing (--leg), or hold an amount to capture or release later (--hold). Exits 1
    /// if the transfer aborted, and says why.
    #[command(
        override_usage = concat!(
            usage!("ledger transfer <FROM> <TO> <AMOUNT> [--hold [--expires-in-s N]] [--id UUID]"),
            "\n       ",
            usage!("ledger transfer --leg FROM:TO:AMOUNT [--leg FROM:TO:AMOUNT ...] [--id UUID]")
        ),
        allow_negative_numbers = true
    )]
    Transfer(TransferArgs),
    /// Capture a hold: move all of it, or --amount of it and release the rest.
    #[command(override_usage = usage!("ledger capture <ID> [--amount N]"), allow_negative_numbers = true)]
    Capture(CaptureArgs),
    /// Release a hold: nothing moves, and the amount is available again.
    #[command(override_usage = usage!("ledger release <ID>"))]
    Release(ReleaseArgs),
    /// The active holds, soonest expiry first, of one account (debited by them) or of the whole ledger.
    #[command(override_usage = usage!("ledger holds [--account ID] [--limit N]"), allow_negative_numbers = true)]
    Holds(ListArgs),
    /// The newest transfers (pending first, then decided, newest first), of one account or of the whole ledger.
    #[command(override_usage = usage!("ledger transfers [--account ID] [--limit N]"), allow_negative_numbers = true)]
    Transfers(ListArgs),
    /// Prove the books: every balance adds up to the money created, none is negative, every hold is explained.
    /// Exits 1 if the audit finds a violation.
    #[command(override_usage = usage!("ledger audit"))]
    Audit(AuditArgs),
}

#[derive(clap::Subcommand, Debug)]
pub enum AccountCommand {
    /// Open an account (with API tokens on, this needs an admin token).
    #[command(
        override_usage = usage!("ledger account create <ID> [--balance N] [--overdraft-limit N]"),
        allow_negative_numbers = true
    )]
    Create(CreateAccountArgs),
    /// An account's balance, the part of it held by undecided transfers, what is available, and its shard.
    #[command(override_usage = usage!("ledger account show <ID>"))]
    Show(ShowAccountArgs),
    /// Every account in id order, following the server's pages.
    #[command(
        override_usage = usage!("ledger account list [--limit N] [--page-size N]"),
        allow_negative_numbers = true
    )]
    List(ListAccountsArgs),
}

#[derive(clap::Args, Debug)]
pub struct CreateAccountArgs {
    /// The account id: 1 to 64 characters of A-Z a-z 0-9 _ -.
    pub id: String,
    /// The opening balance in minor units (e.g. cents); the server's default is 0.
    #[arg(long, value_name = "N", value_parser = parse_balance)]
    pub balance: Option<u64>,
    /// How far below zero the balance may go, in minor units (for a bank's own accounts: cash, settlement);
    /// the server's default is 0.
    #[arg(long, value_name = "N", value_parser = parse_balance)]
    pub overdraft_limit: Option<u64>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(clap::Args, Debug)]
pub struct ShowAccountArgs {
    /// The account id.
    pub id: String,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(clap::Args, Debug)]
pub struct ListAccountsArgs {
    /// List at most this many accounts (default: all of them).
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub limit: Option<usize>,
    /// Accounts asked for per request (the server accepts 1 to 1000).
    #[arg(long, value_name = "N", value_parser = parse_count, default_value_t = ACCOUNT_PAGE_DEFAULT)]
    pub page_size: usize,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(clap::Args, Debug)]
pub struct TransferArgs {
    /// The account debited.
    #[arg(required_unless_present = "legs")]
    pub from: Option<String>,
    /// The account credited.
    #[arg(required_unless_present = "legs")]
    pub to: Option<String>,
    /// The amount in minor units (e.g. cents): 1 or more.
    #[arg(required_unless_present = "legs", value_parser = parse_transfer_amount)]
    pub amount: Option<u64>,
    /// One leg of a multi-leg transfer, FROM:TO:AMOUNT, instead of the three arguments; repeat it (1 to 16
    /// legs, over any shards): every leg commits or none does.
    #[arg(long = "leg", value_name = "FROM:TO:AMOUNT", value_parser = parse_leg, conflicts_with_all = ["from", "to", "amount"])]
    pub legs: Vec<(String, String, u64)>,
    /// Hold the amount instead of moving it: it stays reserved on the debited account until `ledger capture`,
    /// `ledger release`, or its expiry.
    #[arg(long, conflicts_with = "legs")]
    pub hold: bool,
    /// Seconds until the hold expires by itself (1 to 2592000; the server's default is 86400).
    #[arg(long, requires = "hold", value_name = "N")]
    pub expires_in_s: Option<u64>,
    /// The transfer's id, its idempotency key: the same id with the same body never moves money twice. Default:
    /// a new random UUID, printed in the answer, to repeat the transfer safely if no answer came.
    #[arg(long)]
    pub id: Option<Uuid>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(clap::Args, Debug)]
pub struct CaptureArgs {
    /// The hold's id (the transfer id `ledger transfer --hold` printed).
    pub id: Uuid,
    /// Capture this much (1 up to the held amount) and release the rest; default: all of it.
    #[arg(long, value_name = "N", value_parser = parse_amount)]
    pub amount: Option<u64>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(clap::Args, Debug)]
pub struct ReleaseArgs {
    /// The hold's id.
    pub id: Uuid,
    #[command(flatten)]
    pub connection: Connection,
}

/// A leg as `FROM:TO:AMOUNT` (account ids hold no `:`).
fn parse_leg(text: &str) -> Result<(String, String, u64), String> {
    let parts: Vec<&str> = text.split(':').collect();
    let [from, to, amount] = parts.as_slice() else {
        return Err(format!("{text:?} is not FROM:TO:AMOUNT"));
    };
    let amount = parse_transfer_amount(amount)?;
    Ok(((*from).to_owned(), (*to).to_owned(), amount))
}

/// An amount of money to move or hold: a whole number of minor units, 1 or more (the server checks the rest,
/// such as the upper bound). A negative one is refused with the reason, rather than clap's advice to write it
/// after `--`, which only led to "invalid digit found in string".
fn parse_amount(text: &str) -> Result<u64, String> {
    if text.starts_with('-') {
        return Err("amounts are positive: a whole number of minor units, 1 or more".into());
    }
    text.parse().map_err(|_| "not a whole number of minor units (e.g. 250 for 2.50)".into())
}

/// A transfer's amount: as [`parse_amount`], and a negative one is told how to move money the other way.
fn parse_transfer_amount(text: &str) -> Result<u64, String> {
    parse_amount(text).map_err(|error| match text.starts_with('-') {
        true => format!("{error} (to move money the other way, swap FROM and TO)"),
        false => error,
    })
}

/// A number of items to list: a whole number (the server says which it accepts).
fn parse_count(text: &str) -> Result<usize, String> {
    if text.starts_with('-') {
        return Err("a count is 1 or more".into());
    }
    text.parse().map_err(|_| "not a whole number".into())
}

/// A balance or an overdraft limit: a whole number of minor units, 0 or more.
fn parse_balance(text: &str) -> Result<u64, String> {
    if text.starts_with('-') {
        return Err("balances and overdraft limits are 0 or more (an overdraft limit lets the balance go below \
                    zero)"
            .into());
    }
    text.parse().map_err(|_| "not a whole number of minor units (e.g. 250 for 2.50)".into())
}

/// `ledger transfers` and `ledger holds`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only this account's: its committed transfers (an aborted one moved nothing), or the holds debiting it.
    #[arg(long, value_name = "ID")]
    pub account: Option<String>,
    /// At most this many (the server accepts 1 to 1000; its default is 50).
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    #[command(flatten)]
    pub connection: Connection,
}

/// Why a client command did not succeed; each variant knows its exit status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the coordinator at {url} ({reason}); is the cluster up? (ledger cluster up, or set --url / \
         LEDGER_URL)"
    )]
    Unreachable { url: String, reason: String },
    #[error("the connection to the coordinator at {url} broke before it answered ({reason})")]
    AnswerLost { url: String, reason: String },
    #[error("no answer from the coordinator at {url} within {} s", REQUEST_TIMEOUT.as_secs())]
    TimedOut { url: String },
    /// The request may have reached the coordinator: the transfer may or may not have happened.
    #[error(
        "{cause}; the outcome of transfer {id} is unknown: repeat the same command with --id {id} (it never moves \
         money twice)"
    )]
    TransferOutcomeUnknown { id: Uuid, cause: Box<ClientError> },
    #[error("--url {0} cannot be the base of API paths (expected something like {DEFAULT_URL})")]
    BadUrl(String),
    #[error("--token / LEDGER_TOKEN must be printable ASCII")]
    BadToken,
    #[error("cannot set up an HTTP client: {0}")]
    HttpClient(String),
    /// The server's own `{"error":{"code","message"}}` answer.
    #[error("{status} {code}: {message}")]
    Refused { status: u16, code: String, message: String },
    #[error("{status} transfer {id} aborted{}: {reason}{}", at_leg(*leg), explain_abort(reason))]
    Aborted { status: u16, id: String, reason: String, leg: Option<u64> },
    #[error("{status}: not the answer expected: {body}")]
    UnexpectedAnswer { status: u16, body: String },
    #[error("the audit found {0} violation(s)")]
    AuditViolations(usize),
}

impl ClientError {
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            ClientError::Unreachable { .. }
            | ClientError::AnswerLost { .. }
            | ClientError::TimedOut { .. }
            | ClientError::TransferOutcomeUnknown { .. }
            | ClientError::BadUrl(_)
            | ClientError::BadToken
            | ClientError::HttpClient(_) => EXIT_NO_ANSWER,
            ClientError::Refused { .. }
            | ClientError::Aborted { .. }
            | ClientError::UnexpectedAnswer { .. }
            | ClientError::AuditViolations(_) => EXIT_REFUSED,
        }
    }

    /// True if a request may have reached the server although no answer came: a transfer's outcome is unknown.
    fn outcome_unknown(&self) -> bool {
        matches!(self, ClientError::AnswerLost { .. } | ClientError::TimedOut { .. })
    }
}

/// Which leg failed, for a multi-leg transfer's abort.
fn at_leg(leg: Option<u64>) -> String {
    leg.map_or_else(String::new, |leg| format!(" at leg {leg}"))
}

/// A sentence for the abort reasons of the README, so the reader need not look them up.
fn explain_abort(reason: &str) -> &'static str {
    match reason {
        "insufficient_funds" => " (the debited account's available balance is too small)",
        "account_not_found" => " (an account of the transfer does not exist)",
        "balance_overflow" => " (the credit would push the receiving balance past 2^63-1)",
        "participant_unavailable" => " (a shard the transfer needs did not answer; retry with a new id)",
        "coordinator_restarted" => " (the coordinator restarted while deciding it; retry with a new id)",
        _ => "",
    }
}

/// Runs one client command; prints its answer, or one line saying why not, and returns the exit status.
pub async fn run(command: ClientCommand) -> ExitCode {
    match execute(command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            write_stderr(&format!("ledger: {error}"));
            ExitCode::from(error.exit_code())
        }
    }
}

async fn execute(command: ClientCommand) -> Result<(), ClientError> {
    match command {
        ClientCommand::Account(AccountCommand::Create(args)) => create_account(args).await,
        ClientCommand::Account(AccountCommand::Show(args)) => show_account(args).await,
        ClientCommand::Account(AccountCommand::List(args)) => list_accounts(args).await,
        ClientCommand::Transfer(args) => transfer(args).await,
        ClientCommand::Capture(args) => {
            let body = args.amount.map(|amount| json!({"amount": amount}));
            end_hold(&args.connection, args.id, "capture", body).await
        }
        ClientCommand::Release(args) => end_hold(&args.connection, args.id, "release", None).await,
        ClientCommand::Holds(args) => list_by_account(&args.connection, Listing::Holds, args.account, args.limit).await,
        ClientCommand::Transfers(args) => {
            list_by_account(&args.connection, Listing::Transfers, args.account, args.limit).await
        }
        ClientCommand::Audit(args) => audit(args).await,
    }
}

async fn create_account(args: CreateAccountArgs) -> Result<(), ClientError> {
    let client = Client::new(&args.connection)?;
    let mut body = json!({"id": args.id});
    if let Some(balance) = args.balance {
        body["balance"] = json!(balance);
    }
    if let Some(limit) = args.overdraft_limit {
        body["overdraft_limit"] = json!(limit);
    }
    let answer = client.call(Method::POST, client.url(&["accounts"], &[])?, Some(&body)).await?.success()?;
    client.print(&answer, || key_values(&answer.json, &["id", "balance", "shard"], &[]));
    Ok(())
}

async fn show_account(args: ShowAccountArgs) -> Result<(), ClientError> {
    let client = Client::new(&args.connection)?;
    let url = client.url(&["accounts", &args.id], &[])?;
    let answer = client.call(Method::GET, url, None).await?.success()?;
    client.print(&answer, || key_values(&answer.json, &["id", "balance", "held", "available", "shard"], &[]));
    Ok(())
}

const ACCOUNT_COLUMNS: &[Column] = &[
    Column::text("ID", "id"),
    Column::number("BALANCE", "balance"),
    Column::number("HELD", "held"),
    Column::number("AVAILABLE", "available"),
    Column::number("SHARD", "shard"),
];

async fn list_accounts(args: ListAccountsArgs) -> Result<(), ClientError> {
    let client = Client::new(&args.connection)?;
    let mut accounts: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..ACCOUNT_PAGES_MAX {
        // With --limit 0 (or --page-size 0) this asks for 0, and the server says what it accepts.
        let wanted = match args.limit {
            Some(total) => total.saturating_sub(accounts.len()).min(args.page_size),
            None => args.page_size,
        };
        let mut query = vec![("limit", wanted.to_string())];
        if let Some(after) = &cursor {
            query.push(("after", after.clone()));
        }
        let answer = client.call(Method::GET, client.url(&["accounts"], &query)?, None).await?.success()?;
        let (Some(page), Some(next)) = (answer.json["accounts"].as_array(), answer.json.get("next")) else {
            return Err(answer.unexpected());
        };
        let next = next.as_str().map(str::to_owned);
        // Ids come in order, so a cursor that does not move forward is a server bug, not more accounts.
        if next.is_some() && (page.is_empty() || next <= cursor) {
            return Err(answer.unexpected());
        }
        accounts.extend(page.iter().cloned());
        cursor = next;
        if cursor.is_none() || args.limit.is_some_and(|total| accounts.len() >= total) {
            break;
        }
    }
    if args.connection.json {
        let merged = json!({"accounts": accounts, "next": cursor});
        write_stdout(&format!("{}\n", serde_json::to_string_pretty(&merged).unwrap_or_default()));
        return Ok(());
    }
    let mut text = if accounts.is_empty() { "no accounts\n".to_owned() } else { table(ACCOUNT_COLUMNS, &accounts) };
    if let Some(next) = cursor {
        let _ = writeln!(text, "(more accounts after {next}: raise --limit to list them)");
    }
    write_stdout(&text);
    Ok(())
}

const TRANSFER_FIELDS: &[&str] = &[
    "id",
    "status",
    "reason",
    "leg",
    "from",
    "to",
    "amount",
    "held_amount",
    "expires_at",
    "expires_at_unix_ms",
    "made_by",
];

const LEG_COLUMNS: &[Column] = &[
    Column::number("LEG", "leg"),
    Column::text("FROM", "from"),
    Column::text("TO", "to"),
    Column::number("AMOUNT", "amount"),
];

/// A transfer's answer as a key/value block, with its legs (if it has several) as a table under it. A hold's
/// expiry is shown as a time too, beside the server's number.
fn transfer_text(body: &Value) -> String {
    let mut shown = body.clone();
    if let Some(at) = body["expires_at_unix_ms"].as_u64() {
        shown["expires_at"] = json!(format!("{} (in {})", utc_time(at), until(at, now_unix_ms())));
    }
    let mut text = key_values(&shown, TRANSFER_FIELDS, &["legs"]);
    if let Some(legs) = body["legs"].as_array().filter(|legs| !legs.is_empty()) {
        let rows: Vec<Value> = legs
            .iter()
            .enumerate()
            .map(|(i, leg)| {
                let mut row = leg.clone();
                row["leg"] = json!(i);
                row
            })
            .collect();
        text.push_str("\nlegs:\n");
        text.push_str(&table(LEG_COLUMNS, &rows));
    }
    text
}

async fn transfer(args: TransferArgs) -> Result<(), ClientError> {
    let client = Client::new(&args.connection)?;
    // Chosen here rather than by the server, so that a transfer whose answer was lost can be repeated safely.
    let id = args.id.unwrap_or_else(Uuid::new_v4);
    let mut body = if args.legs.is_empty() {
        json!({"id": id, "from": args.from, "to": args.to, "amount": args.amount})
    } else {
        let legs: Vec<Value> =
            args.legs.iter().map(|(from, to, amount)| json!({"from": from, "to": to, "amount": amount})).collect();
        json!({"id": id, "legs": legs})
    };
    if args.hold {
        body["hold"] = json!(true);
        if let Some(seconds) = args.expires_in_s {
            body["expires_in_s"] = json!(seconds);
        }
    }
    let answer = match client.call(Method::POST, client.url(&["transfers"], &[])?, Some(&body)).await {
        Ok(answer) => answer,
        Err(error) if error.outcome_unknown() => {
            return Err(ClientError::TransferOutcomeUnknown { id, cause: Box::new(error) })
        }
        Err(error) => return Err(error),
    };
    // An aborted transfer is an outcome, with a body of its own: show it, then say why it aborted.
    if answer.json["status"] == "aborted" {
        client.print(&answer, || transfer_text(&answer.json));
        return Err(ClientError::Aborted {
            status: answer.status.as_u16(),
            id: cell(answer.json.get("id")),
            reason: cell(answer.json.get("reason")),
            leg: answer.json["leg"].as_u64(),
        });
    }
    let answer = answer.success()?;
    client.print(&answer, || transfer_text(&answer.json));
    Ok(())
}

/// `ledger capture` and `ledger release`: `POST /transfers/{id}/<action>`. Both are idempotent, so a request
/// whose answer was lost is simply repeated.
async fn end_hold(connection: &Connection, id: Uuid, action: &str, body: Option<Value>) -> Result<(), ClientError> {
    let client = Client::new(connection)?;
    let url = client.url(&["transfers", &id.to_string(), action], &[])?;
    let answer = client.call(Method::POST, url, Some(&body.unwrap_or_else(|| json!({})))).await?.success()?;
    client.print(&answer, || transfer_text(&answer.json));
    Ok(())
}

/// The expiry as a time (UTC) and as the time left, as the console shows it, rather than the server's
/// `expires_at_unix_ms` (still there with --json).
const HOLD_COLUMNS: &[Column] = &[
    Column::text("ID", "id"),
    Column::text("FROM", "from"),
    Column::text("TO", "to"),
    Column::number("AMOUNT", "amount"),
    Column::text("EXPIRES_AT", "expires_at"),
    Column::number("EXPIRES_IN", "expires_in"),
];

/// A transfer of several legs shows the accounts its legs debit and credit, the total and how many legs.
const TRANSFER_COLUMNS: &[Column] = &[
    Column::text("ID", "id"),
    Column::text("STATUS", "status"),
    Column::text("FROM", "from"),
    Column::text("TO", "to"),
    Column::number("AMOUNT", "amount"),
    Column::number("LEGS", "leg_count"),
    Column::text("REASON", "reason"),
];

/// What `ledger holds` and `ledger transfers` list.
#[derive(Clone, Copy)]
enum Listing {
    Holds,
    Transfers,
}

impl Listing {
    /// The route, and the field of its answer that holds the list.
    fn name(self) -> &'static str {
        match self {
            Listing::Holds => "holds",
            Listing::Transfers => "transfers",
        }
    }

    fn columns(self) -> &'static [Column] {
        match self {
            Listing::Holds => HOLD_COLUMNS,
            Listing::Transfers => TRANSFER_COLUMNS,
        }
    }

    fn empty(self) -> &'static str {
        match self {
            Listing::Holds => "no active holds",
            Listing::Transfers => "no transfers",
        }
    }

    /// A row as the table shows it: the server's fields, and the ones computed for reading.
    fn row(self, row: &Value, now_unix_ms: u64) -> Value {
        let mut row = row.clone();
        match self {
            Listing::Holds => {
                if let Some(at) = row["expires_at_unix_ms"].as_u64() {
                    row["expires_at"] = json!(utc_time(at));
                    row["expires_in"] = json!(until(at, now_unix_ms));
                }
            }
            Listing::Transfers => match row["legs"].as_array().cloned() {
                Some(legs) => {
                    let accounts = |field: &str| {
                        let mut names: Vec<&str> = Vec::new();
                        for name in legs.iter().filter_map(|leg| leg[field].as_str()) {
                            if !names.contains(&name) {
                                names.push(name);
                            }
                        }
                        names.join(",")
                    };
                    // Each leg is at most 2^63-1 and a transfer has at most 16: the total fits in a u128.
                    let total: u128 = legs.iter().filter_map(|leg| leg["amount"].as_u64()).map(u128::from).sum();
                    row["from"] = json!(accounts("from"));
                    row["to"] = json!(accounts("to"));
                    row["amount"] = json!(total.to_string());
                    row["leg_count"] = json!(legs.len());
                }
                None => row["leg_count"] = json!(1),
            },
        }
        row
    }
}

/// A listing by account (`GET /holds` or `/transfers`, `?account=&limit=`) as a table, or a line saying it is
/// empty. An account that does not exist is a 404 for both, as `GET /transfers?account=` answers it: the
/// holds of a missing account are checked with `GET /accounts/{id}` when there are none.
async fn list_by_account(
    connection: &Connection,
    listing: Listing,
    account: Option<String>,
    limit: Option<usize>,
) -> Result<(), ClientError> {
    let client = Client::new(connection)?;
    let what = listing.name();
    let query: Vec<(&str, String)> = account
        .iter()
        .map(|account| ("account", account.clone()))
        .chain(limit.map(|limit| ("limit", limit.to_string())))
        .collect();
    let answer = client.call(Method::GET, client.url(&[what], &query)?, None).await?.success()?;
    let Some(rows) = answer.json[what].as_array() else {
        return Err(answer.unexpected());
    };
    if let (Listing::Holds, Some(account), true) = (listing, &account, rows.is_empty()) {
        let found = client.call(Method::GET, client.url(&["accounts", account], &[])?, None).await?;
        if found.status == StatusCode::NOT_FOUND {
            found.success()?;
        }
    }
    let now = now_unix_ms();
    client.print(&answer, || {
        if rows.is_empty() {
            return format!("{}\n", listing.empty());
        }
        let rows: Vec<Value> = rows.iter().map(|row| listing.row(row, now)).collect();
        table(listing.columns(), &rows)
    });
    Ok(())
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `2026-12-08T03:40:12Z`.
fn utc_time(unix_ms: u64) -> String {
    super::utc_timestamp(std::time::UNIX_EPOCH + Duration::from_millis(unix_ms))
}

/// The time left until `at`, in whole units as the console shows it: "2 h 5 min", "9 min 59 s", "12 s".
fn until(at_unix_ms: u64, now_unix_ms: u64) -> String {
    let s = at_unix_ms.saturating_sub(now_unix_ms) / 1_000;
    match s {
        3_600.. => format!("{} h {} min", s / 3_600, s % 3_600 / 60),
        60.. => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{s} s"),
    }
}

const SHARD_COLUMNS: &[Column] = &[
    Column::number("SHARD", "shard"),
    Column::number("ACCOUNTS", "accounts"),
    Column::number("BALANCE_TOTAL", "balance_total"),
    Column::number("HELD_TOTAL", "held_total"),
    Column::number("INCOMING_TOTAL", "incoming_total"),
    Column::number("CREATED_TOTAL", "created_total"),
    Column::number("PREPARED", "prepared"),
    Column::count("HEURISTICS", "heuristics"),
];

const IN_FLIGHT_COLUMNS: &[Column] = &[
    Column::text("ID", "id"),
    Column::number("AMOUNT", "amount"),
    Column::text("APPLIED_ON", "applied_on"),
    Column::text("PENDING_ON", "pending_on"),
];

async fn audit(args: AuditArgs) -> Result<(), ClientError> {
    let client = Client::new(&args.connection)?;
    let answer = client.call(Method::GET, client.url(&["audit"], &[])?, None).await?.success()?;
    let Some(ok) = answer.json["ok"].as_bool() else {
        return Err(answer.unexpected());
    };
    let violations = answer.json["violations"].as_array().map(Vec::as_slice).unwrap_or_default();
    client.print(&answer, || {
        let body = &answer.json;
        let sections = [("shards", SHARD_COLUMNS), ("in_flight", IN_FLIGHT_COLUMNS)];
        let totals = ["ok", "balance_total", "created_total", "in_flight_total"];
        let mut text = key_values(body, &totals, &["shards", "in_flight", "violations"]);
        for (field, columns) in sections {
            let rows = body[field].as_array().map(Vec::as_slice).unwrap_or_default();
            let _ = write!(text, "\n{field}:");
            if rows.is_empty() {
                text.push_str(" none\n");
            } else {
                text.push('\n');
                text.push_str(&table(columns, rows));
            }
        }
        text.push_str("\nviolations:");
        if violations.is_empty() {
            text.push_str(" none\n");
        } else {
            text.push('\n');
            for violation in violations {
                let _ = writeln!(text, "  {}", cell(Some(violation)));
            }
        }
        text
    });
    if !ok {
        return Err(ClientError::AuditViolations(violations.len()));
    }
    Ok(())
}

/// One coordinator, and how to talk to it.
struct Client {
    http: reqwest::Client,
    base: Url,
    authorization: Option<HeaderValue>,
    json: bool,
}

/// An answer of any status, with its body as text (to print as it came) and parsed (to read fields from).
struct Answer {
    status: StatusCode,
    text: String,
    /// `Value::Null` when the body is not JSON.
    json: Value,
}

impl Answer {
    /// The answer itself if it is a success; otherwise the server's error, as it described it.
    fn success(self) -> Result<Answer, ClientError> {
        if self.status.is_success() {
            return if self.json.is_null() { Err(self.unexpected()) } else { Ok(self) };
        }
        match (self.json["error"]["code"].as_str(), self.json["error"]["message"].as_str()) {
            (Some(code), Some(message)) => Err(ClientError::Refused {
                status: self.status.as_u16(),
                code: code.to_owned(),
                message: message.to_owned(),
            }),
            _ => Err(self.unexpected()),
        }
    }

    fn unexpected(&self) -> ClientError {
        let reason = self.status.canonical_reason().unwrap_or("");
        let body = if self.text.trim().is_empty() { reason.to_owned() } else { self.text.trim().to_owned() };
        ClientError::UnexpectedAnswer { status: self.status.as_u16(), body }
    }
}

impl Client {
    fn new(connection: &Connection) -> Result<Client, ClientError> {
        let base = coordinator_url(connection.url.as_ref())?;
        if base.cannot_be_a_base() {
            return Err(ClientError::BadUrl(base.to_string()));
        }
        let authorization = match &connection.token {
            Some(token) => token.header()?,
            None => None,
        };
        Ok(Client { http: http_client()?, base, authorization, json: connection.json })
    }

    /// The coordinator's URL as the user would write it, for messages.
    fn shown_url(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_owned()
    }

    /// The base URL with `segments` appended (each percent-encoded, so an id cannot change the route) and `query`.
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Url, ClientError> {
        let mut url = self.base.clone();
        url.path_segments_mut().map_err(|()| ClientError::BadUrl(self.shown_url()))?.pop_if_empty().extend(segments);
        url.set_query(None);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    async fn call(&self, method: Method, url: Url, body: Option<&Value>) -> Result<Answer, ClientError> {
        let mut request = self.http.request(method, url);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let lost = |error: reqwest::Error| self.no_answer(&error);
        let response = request.send().await.map_err(lost)?;
        let status = response.status();
        let text = response.text().await.map_err(lost)?;
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Answer { status, text, json })
    }

    /// Why no answer came, in the user's terms: no connection at all, no answer in time, or a broken one.
    fn no_answer(&self, error: &reqwest::Error) -> ClientError {
        let url = self.shown_url();
        if error.is_timeout() {
            ClientError::TimedOut { url }
        } else if error.is_connect() {
            ClientError::Unreachable { url, reason: root_cause(error) }
        } else {
            ClientError::AnswerLost { url, reason: root_cause(error) }
        }
    }

    /// Prints the body as it came (pretty) with `--json`, else the readable rendering.
    fn print(&self, answer: &Answer, readable: impl FnOnce() -> String) {
        if self.json {
            let text = pretty_json(&answer.text).unwrap_or_else(|| answer.text.clone());
            write_stdout(&format!("{}\n", text.trim_end()));
        } else {
            write_stdout(&readable());
        }
    }
}

/// `--url` (or LEDGER_URL) if given, else the local cluster's coordinator.
pub(crate) fn coordinator_url(given: Option<&Url>) -> Result<Url, ClientError> {
    match given {
        Some(url) => Ok(url.clone()),
        None => {
            let local = super::local::local_coordinator_url();
            Url::parse(&local).map_err(|_| ClientError::BadUrl(local))
        }
    }
}

/// The HTTP client of the `ledger` commands: every request is bounded by [`REQUEST_TIMEOUT`].
pub(crate) fn http_client() -> Result<reqwest::Client, ClientError> {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
        .map_err(|error| ClientError::HttpClient(root_cause(&error)))
}

/// The innermost cause of a failed request, short: "connection refused" rather than a chain of wrappers.
pub(crate) fn root_cause(error: &reqwest::Error) -> String {
    use std::io::ErrorKind;
    let mut innermost: &dyn std::error::Error = error;
    while let Some(source) = innermost.source() {
        if let Some(io) = source.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                kind @ (ErrorKind::ConnectionRefused
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::NotConnected
                | ErrorKind::AddrNotAvailable
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
                | ErrorKind::BrokenPipe
                | ErrorKind::TimedOut
                | ErrorKind::UnexpectedEof) => kind.to_string(),
                _ => io.to_string(),
            };
        }
        innermost = source;
    }
    innermost.to_string()
}

/// One column of a table: its title, the JSON field it shows, and how.
struct Column {
    title: &'static str,
    field: &'static str,
    kind: ColumnKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    /// Left-aligned.
    Text,
    /// Right-aligned, so digits line up.
    Number,
    /// The length of an array field, right-aligned.
    Count,
}

impl Column {
    const fn text(title: &'static str, field: &'static str) -> Column {
        Column { title, field, kind: ColumnKind::Text }
    }

    const fn number(title: &'static str, field: &'static str) -> Column {
        Column { title, field, kind: ColumnKind::Number }
    }

    const fn count(title: &'static str, field: &'static str) -> Column {
        Column { title, field, kind: ColumnKind::Count }
    }

    fn cell(&self, row: &Value) -> String {
        match (self.kind, row.get(self.field)) {
            (ColumnKind::Count, Some(Value::Array(items))) => items.len().to_string(),
            (_, value) => cell(value),
        }
    }
}

/// A table with a title row, columns two spaces apart, every line ending without trailing blanks.
fn table(columns: &[Column], rows: &[Value]) -> String {
    let cells: Vec<Vec<String>> = rows.iter().map(|row| columns.iter().map(|c| c.cell(row)).collect()).collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| cells.iter().map(|r| r[i].chars().count()).chain([c.title.len()]).max().unwrap_or(0))
        .collect();
    let titles: Vec<String> = columns.iter().map(|c| c.title.to_owned()).collect();
    let mut text = String::new();
    for line in std::iter::once(&titles).chain(&cells) {
        let mut out = String::new();
        for ((value, column), width) in line.iter().zip(columns).zip(&widths) {
            match column.kind {
                ColumnKind::Text => {
                    let _ = write!(out, "{value:<width$}  ");
                }
                ColumnKind::Number | ColumnKind::Count => {
                    let _ = write!(out, "{value:>width$}  ");
                }
            }
        }
        text.push_str(out.trim_end());
        text.push('\n');
    }
    text
}

/// `key  value` lines, aligned: the fields in `order` first (those present), then any others the server added
/// but those in `shown_apart` (printed as tables of their own).
fn key_values(body: &Value, order: &[&str], shown_apart: &[&str]) -> String {
    let Some(object) = body.as_object() else {
        return format!("{}\n", cell(Some(body)));
    };
    let known = order.iter().copied().filter(|key| object.contains_key(*key));
    let extra = object.keys().map(String::as_str).filter(|key| !order.contains(key) && !shown_apart.contains(key));
    let keys: Vec<&str> = known.chain(extra).collect();
    let width = keys.iter().map(|key| key.len()).max().unwrap_or(0);
    let mut text = String::new();
    for key in keys {
        let _ = writeln!(text, "{key:<width$}  {}", cell(object.get(key)));
    }
    text
}

/// A JSON value as plain text: strings without quotes, lists comma-separated, `-` for nothing.
fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(items)) if items.is_empty() => "-".to_owned(),
        Some(Value::Array(items)) if items.iter().all(|item| !item.is_object() && !item.is_array()) => {
            items.iter().map(|item| cell(Some(item))).collect::<Vec<_>>().join(",")
        }
        Some(other) => other.to_string(),
    }
}

/// Indents a JSON text the way `jq .` does (two spaces, `"key": value`), keeping the server's key order, which
/// parsing into a `serde_json::Value` would sort. `None` if the text is not JSON.
pub(crate) fn pretty_json(text: &str) -> Option<String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = text.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    };
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.next_if(|next| next.is_whitespace()).is_some() {}
                // An empty object or list stays on one line, as jq prints it.
                match chars.next_if(|next| matches!(next, '}' | ']')) {
                    Some(close) => out.push(close),
                    None => {
                        depth += 1;
                        newline(&mut out, depth);
                    }
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    Some(out)
}

/// Writes to stdout; a closed pipe (`ledger account list | head`) is not an error worth a panic.
pub(crate) fn write_stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Writes one line to stderr, ignoring a closed stderr for the same reason.
pub(crate) fn write_stderr(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_json_indents_like_jq_and_keeps_the_key_order() {
        let text = r#"{"id":"a,b:{","balance":1000,"held":[],"x":{},"list":[1,{"q":"\"}"}]}"#;
        let expected =
            "{\n  \"id\": \"a,b:{\",\n  \"balance\": 1000,\n  \"held\": [],\n  \"x\": {},\n  \"list\": [\n    \
                        1,\n    {\n      \"q\": \"\\\"}\"\n    }\n  ]\n}";
        assert_eq!(pretty_json(text).as_deref(), Some(expected));
        assert_eq!(pretty_json("not json"), None);
    }

    #[test]
    fn tables_align_text_left_and_numbers_right() {
        let rows = [json!({"id": "alice", "balance": 5}), json!({"id": "bo", "balance": 1000})];
        let columns = [Column::text("ID", "id"), Column::number("BALANCE", "balance")];
        assert_eq!(table(&columns, &rows), "ID     BALANCE\nalice        5\nbo        1000\n");
    }

    #[test]
    fn a_transfer_of_several_legs_is_listed_with_its_accounts_total_and_leg_count() {
        let big = i64::MAX as u64;
        let row = json!({"id": "t", "status": "committed", "legs": [
            {"from": "alice", "to": "bob", "amount": big}, {"from": "alice", "to": "fees", "amount": big},
        ]});
        let shown = Listing::Transfers.row(&row, 0);
        assert_eq!((shown["from"].as_str(), shown["to"].as_str()), (Some("alice"), Some("bob,fees")));
        assert_eq!(shown["amount"], json!("18446744073709551614"), "the exact total, past 2^64 even");
        assert_eq!(shown["leg_count"], 2);
        let single = Listing::Transfers.row(&json!({"from": "a", "to": "b", "amount": 5}), 0);
        assert_eq!((single["amount"].clone(), single["leg_count"].clone()), (json!(5), json!(1)));
    }

    #[test]
    fn a_holds_expiry_is_shown_as_a_time_and_the_time_left() {
        let row = Listing::Holds.row(&json!({"expires_at_unix_ms": 1_796_354_339_000u64}), 1_796_354_339_000 - 599_500);
        assert_eq!(
            (row["expires_at"].as_str(), row["expires_in"].as_str()),
            (Some("2026-12-04T03:18:59Z"), Some("9 min 59 s"))
        );
        assert_eq!(until(10_000_000, 0), "2 h 46 min");
        assert_eq!(until(5_000, 0), "5 s");
        assert_eq!(until(0, 5_000), "0 s", "an expiry in the past");
    }

    #[test]
    fn negative_amounts_are_refused_with_the_reason() {
        assert!(parse_transfer_amount("-5").is_err_and(|e| e.starts_with("amounts are positive") && e.contains("swap")));
        assert!(
            parse_amount("-5").is_err_and(|e| e == "amounts are positive: a whole number of minor units, 1 or more")
        );
        assert_eq!(parse_amount("250"), Ok(250));
        assert!(parse_leg("a:b:-1").is_err_and(|e| e.starts_with("amounts are positive")));
        assert!(parse_balance("-1").is_err_and(|e| e.contains("0 or more")));
    }

    #[test]
    fn key_values_put_known_fields_first_and_keep_unknown_ones() {
        let body = json!({"shard": 1, "id": "alice", "zeta": null});
        assert_eq!(key_values(&body, &["id", "balance", "shard"], &[]), "id     alice\nshard  1\nzeta   -\n");
    }
}
