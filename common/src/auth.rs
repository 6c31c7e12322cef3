//! Who may call what. Internal calls (coordinator ↔ participants) carry the cluster secret and the cluster id;
//! client calls may carry an API token naming a role. Parsing and checking live here, free of HTTP types, so both
//! servers and their tests share one definition.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

/// Shortest cluster secret accepted: long enough that guessing it over the network is hopeless.
pub const CLUSTER_TOKEN_LEN_MIN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cluster token in {0} is shorter than {CLUSTER_TOKEN_LEN_MIN} characters")]
    ShortClusterToken(String),
    #[error("{path}:{line}: expected `<name> <admin|client> <token>`")]
    BadTokenLine { path: String, line: usize },
    #[error("{path}:{line}: token for {name} is shorter than {CLUSTER_TOKEN_LEN_MIN} characters")]
    ShortApiToken { path: String, line: usize, name: String },
    #[error("{path}: token names must be unique ({0} repeats)", path = .1)]
    DuplicateName(String, String),
    #[error(
        "refusing to listen on {0} without a cluster token: anyone who can reach it could move money. \
         Pass --cluster-token-file (or LEDGER_CLUSTER_TOKEN_FILE), or listen on a loopback address"
    )]
    InsecureListen(SocketAddr),
}

/// The shared secret of a cluster, read from a file (surrounding whitespace ignored).
#[derive(Clone)]
pub struct ClusterToken(String);

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterToken(<redacted>)")
    }
}

impl ClusterToken {
    pub fn read(path: &Path) -> Result<Self, AuthConfigError> {
        let text = read(path)?;
        let token = text.trim();
        if token.len() < CLUSTER_TOKEN_LEN_MIN {
            return Err(AuthConfigError::ShortClusterToken(path.display().to_string()));
        }
        Ok(ClusterToken(token.to_owned()))
    }

    pub fn new(token: impl Into<String>) -> Self {
        ClusterToken(token.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(self.0.as_bytes(), presented)
    }
}

/// Refuses to serve internal routes to the network without a secret; loopback alone is trusted.
pub fn check_listen(addr: SocketAddr, token: Option<&ClusterToken>) -> Result<(), AuthConfigError> {
    if token.is_none() && !addr.ip().is_loopback() {
        return Err(AuthConfigError::InsecureListen(addr));
    }
    Ok(())
}

/// Compares without an early exit, so the time taken does not reveal how much of a guess was right.
pub fn constant_time_eq(expected: &[u8], presented: &[u8]) -> bool {
    let mut diff = expected.len() ^ presented.len();
    for (i, &e) in expected.iter().enumerate() {
        diff |= usize::from(e ^ presented.get(i).copied().unwrap_or(!e));
    }
    diff == 0
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Moves money and reads.
    Client,
    /// Everything a client may do, plus creating accounts and operator actions.
    Admin,
}

/// A client's identity: the token's name (logged and recorded; the token itself never is) and its role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// The API tokens file: one `<name> <admin|client> <token>` per line; `#` starts a comment.
#[derive(Clone, Default)]
pub struct ApiTokens {
    tokens: Vec<(String, Caller)>,
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tokens.iter().map(|(_, c)| &c.name)).finish()
    }
}

impl ApiTokens {
    pub fn read(path: &Path) -> Result<Self, AuthConfigError> {
        Self::parse(&read(path)?, &path.display().to_string())
    }

    pub fn parse(text: &str, path: &str) -> Result<Self, AuthConfigError> {
        let mut tokens = Vec::new();
        let mut names: HashMap<String, ()> = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = || AuthConfigError::BadTokenLine { path: path.to_owned(), line: i + 1 };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, role, token] = fields[..] else { return Err(bad()) };
            let role = match role {
                "admin" => Role::Admin,
                "client" => Role::Client,
                _ => return Err(bad()),
            };
            if token.len() < CLUSTER_TOKEN_LEN_MIN {
                return Err(AuthConfigError::ShortApiToken { path: path.to_owned(), line: i + 1, name: name.into() });
            }
            if names.insert(name.to_owned(), ()).is_some() {
                return Err(AuthConfigError::DuplicateName(name.to_owned(), path.to_owned()));
            }
            tokens.push((token.to_owned(), Caller { name: name.to_owned(), role }));
        }
        Ok(ApiTokens { tokens })
    }

    /// The caller a bearer token belongs to. Every token is compared, in constant time, whatever matches.
    pub fn caller(&self, presented: &str) -> Option<Caller> {
        let mut found = None;
        for (token, caller) in &self.tokens {
            if constant_time_eq(token.as_bytes(), presented.as_bytes()) {
                found = Some(caller.clone());
            }
        }
        found
    }
}

fn read(path: &Path) -> Result<String, AuthConfigError> {
    std::fs::read_to_string(path).map_err(|source| AuthConfigError::Read { path: path.display().to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_exactly() {
        assert!(constant_time_eq(b"secret-secret-16", b"secret-secret-16"));
        assert!(!constant_time_eq(b"secret-secret-16", b"secret-secret-17"));
        assert!(!constant_time_eq(b"secret-secret-16", b"secret-secret-1"));
        assert!(!constant_time_eq(b"secret-secret-16", b"secret-secret-166"));
        assert!(!constant_time_eq(b"abc", b""));
    }

    #[test]
    fn token_files_parse_with_roles_and_comments() {
        let text = "# ops\nalice admin aaaaaaaaaaaaaaaa\n\nshop client bbbbbbbbbbbbbbbb # the web shop\n";
        let tokens = ApiTokens::parse(text, "t").expect("parses");
        assert_eq!(tokens.caller("aaaaaaaaaaaaaaaa"), Some(Caller { name: "alice".into(), role: Role::Admin }));
        assert_eq!(tokens.caller("bbbbbbbbbbbbbbbb").map(|c| c.role), Some(Role::Client));
        assert_eq!(tokens.caller("cccccccccccccccc"), None);
        assert!(format!("{tokens:?}").contains("alice") && !format!("{tokens:?}").contains("aaaa"));
    }

    #[test]
    fn bad_token_files_are_refused() {
        assert!(matches!(ApiTokens::parse("x root aaaaaaaaaaaaaaaa", "t"), Err(AuthConfigError::BadTokenLine { .. })));
        assert!(matches!(ApiTokens::parse("x admin short", "t"), Err(AuthConfigError::ShortApiToken { .. })));
        assert!(matches!(ApiTokens::parse("x admin", "t"), Err(AuthConfigError::BadTokenLine { .. })));
        let dup = "x admin aaaaaaaaaaaaaaaa\nx client bbbbbbbbbbbbbbbb";
        assert!(matches!(ApiTokens::parse(dup, "t"), Err(AuthConfigError::DuplicateName(..))));
    }

    #[test]
    fn only_loopback_may_go_without_a_cluster_token() {
        let loopback: SocketAddr = "127.0.0.1:7100".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:7100".parse().expect("addr");
        assert!(check_listen(loopback, None).is_ok());
        assert!(matches!(check_listen(any, None), Err(AuthConfigError::InsecureListen(_))));
        assert!(check_listen(any, Some(&ClusterToken::new("x".repeat(16)))).is_ok());
    }
}
