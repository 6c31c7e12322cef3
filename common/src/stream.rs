//! The persistent binary stream from the coordinator to each participant, which carries the protocol's hot
//! path (prepares, decisions, reads) in place of JSON over HTTP.
//!
//! It opens as an HTTP/1.1 Upgrade on the participant's own port (`GET` [`PATH_STREAM`], `Upgrade:`
//! [`UPGRADE_PROTOCOL`]), so the participant's middleware checks the cluster token and cluster id before the
//! connection switches protocols, and no new port or flag is needed. After the `101 Switching Protocols`, both
//! directions carry length-delimited frames (tokio-util's `LengthDelimitedCodec`, a 4-byte big-endian length)
//! of one version byte and a bincode body. A frame carries a batch of items, handled in order. A frame longer
//! than [`FRAME_BYTES_MAX`], one of another version, or one that does not decode closes the connection, and
//! nothing of it is applied.
//!
//! Either side sends a heartbeat when it has been quiet for [`HEARTBEAT_INTERVAL`], and drops a connection
//! that has been silent for [`SILENCE_TIMEOUT`]: a peer cut off by a partition sends no RST, so silence is the
//! only sign of it.

use crate::wire::{HEADER_CLUSTER_ID, HEADER_CLUSTER_TOKEN};
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use protocol::msg::{FromShard, ToShard};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

pub const PATH_STREAM: &str = "/internal/stream";
/// The token of the `Upgrade` header; its suffix is the stream's version.
pub const UPGRADE_PROTOCOL: &str = "ledger-stream/1";
/// The version byte in front of every frame's body. 2: a vote may refuse an id prepared for another body
/// (`RefusalReason::IdInUse`), which a version-1 peer cannot decode. 3: an account read carries its overdraft
/// limit. 4: a refusal names the posting it refused. 5: the coordinator may send `Capture`.
pub const FRAME_VERSION: u8 = 5;
/// Longest frame either side accepts. A frame holds at most `FRAME_ITEMS_MAX` items of a few hundred bytes.
pub const FRAME_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Items in one frame (the coordinator's batching limit; a participant refuses more).
pub use protocol::msg::FRAME_ITEMS_MAX;
/// Longest a prepare item can be: two account ids, a coordinator URL and a token name, with room to spare.
const ITEM_BYTES_MAX: usize = 2 * 1024;
const _: () = assert!(FRAME_ITEMS_MAX * ITEM_BYTES_MAX <= FRAME_BYTES_MAX);
/// A side that has sent nothing for this long sends a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// A connection silent this long is dead (a partition, a paused or hung peer), and is closed.
pub const SILENCE_TIMEOUT: Duration = Duration::from_millis(1_500);
const _: () = assert!(SILENCE_TIMEOUT.as_millis() >= 4 * HEARTBEAT_INTERVAL.as_millis());
/// Longest HTTP response head the client reads before the switch.
const RESPONSE_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Connecting and upgrading must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Coordinator → participant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Up {
    Items(Vec<ToShard>),
    Heartbeat,
}

/// Participant → coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Down {
    Replies(Vec<FromShard>),
    Heartbeat,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame has version {0}, this binary speaks {FRAME_VERSION}")]
    Version(u8),
    #[error("empty frame")]
    Empty,
    #[error("frame does not decode: {0}")]
    Decode(#[from] bincode::Error),
    #[error("frame of {0} items; at most {FRAME_ITEMS_MAX}")]
    TooManyItems(usize),
    #[error("the participant refused the stream: {0}")]
    Refused(String),
    #[error("connection closed")]
    Closed,
    #[error("timed out")]
    Timeout,
}

pub type FramedStream<S> = Framed<S, LengthDelimitedCodec>;

pub fn framed<S: AsyncRead + AsyncWrite>(io: S) -> FramedStream<S> {
    LengthDelimitedCodec::builder().max_frame_length(FRAME_BYTES_MAX).new_framed(io)
}

pub fn encode<T: Serialize>(body: &T) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.push(FRAME_VERSION);
    bincode::serialize_into(&mut out, body).expect("bincode into a Vec is infallible");
    Bytes::from(out)
}

pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, StreamError> {
    match frame.split_first() {
        None => Err(StreamError::Empty),
        Some((&FRAME_VERSION, body)) => {
            // Bounded by the frame, and refusing trailing bytes: a frame decodes exactly or not at all.
            use bincode::Options;
            let options = bincode::DefaultOptions::new()
                .with_fixint_encoding()
                .with_limit(FRAME_BYTES_MAX as u64)
                .reject_trailing_bytes();
            Ok(options.deserialize(body)?)
        }
        Some((&other, _)) => Err(StreamError::Version(other)),
    }
}

/// The next frame, decoded; `Closed` at the end of the stream.
pub async fn next<S, T>(stream: &mut FramedStream<S>) -> Result<T, StreamError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: DeserializeOwned,
{
    match stream.next().await {
        None => Err(StreamError::Closed),
        Some(Err(e)) => Err(StreamError::Io(e)),
        Some(Ok(frame)) => decode(&frame),
    }
}

pub async fn send<S, T>(stream: &mut FramedStream<S>, body: &T) -> Result<(), StreamError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: Serialize,
{
    stream.send(encode(body)).await?;
    Ok(())
}

/// Client side of the upgrade: connects to `addr` (host:port), asks to switch, and returns the framed stream
/// once the participant has answered 101.
pub async fn connect(
    addr: &str,
    cluster_id: &str,
    cluster_token: Option<&str>,
) -> Result<FramedStream<tokio::net::TcpStream>, StreamError> {
    let attempt = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut head = format!(
            "GET {PATH_STREAM} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE_PROTOCOL}\r\n{HEADER_CLUSTER_ID}: {cluster_id}\r\n"
        );
        if let Some(token) = cluster_token {
            head.push_str(&format!("{HEADER_CLUSTER_TOKEN}: {token}\r\n"));
        }
        head.push_str("\r\n");
        tcp.write_all(head.as_bytes()).await?;
        let response = read_head(&mut tcp).await?;
        let status_line = response.lines().next().unwrap_or_default();
        if !status_line.starts_with("HTTP/1.1 101") {
            let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().trim().to_owned();
            return Err(StreamError::Refused(format!("{status_line} {body}").trim().to_owned()));
        }
        Ok(framed(tcp))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt).await.map_err(|_| StreamError::Timeout)?
}

/// Reads the HTTP response head byte by byte (so no frame byte after it is consumed), and a short error body
/// if the participant refused.
async fn read_head(tcp: &mut tokio::net::TcpStream) -> Result<String, StreamError> {
    let mut buf = BytesMut::with_capacity(512);
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() >= RESPONSE_HEAD_BYTES_MAX || tcp.read(&mut byte).await? == 0 {
            return Err(StreamError::Closed);
        }
        buf.extend_from_slice(&byte);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    if head.starts_with("HTTP/1.1 101") {
        return Ok(head);
    }
    // A refusal: read what body there is (bounded, briefly) for the error message.
    let mut body = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut body)).await.ok().and_then(Result::ok);
    body.truncate(n.unwrap_or(0));
    Ok(format!("{head}{}", String::from_utf8_lossy(&body)))
}

/// Checks a frame from the coordinator before anything of it is applied.
pub fn check_up(up: &Up) -> Result<(), StreamError> {
    match up {
        Up::Items(items) if items.len() > FRAME_ITEMS_MAX => Err(StreamError::TooManyItems(items.len())),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_refuse_other_versions_and_garbage() {
        let up = Up::Items(vec![]);
        let bytes = encode(&up);
        assert_eq!(bytes[0], FRAME_VERSION);
        assert_eq!(decode::<Up>(&bytes).expect("decodes"), up);
        let mut other = bytes.to_vec();
        other[0] = FRAME_VERSION + 1;
        assert!(matches!(decode::<Up>(&other), Err(StreamError::Version(_))));
        assert!(matches!(decode::<Up>(&[]), Err(StreamError::Empty)));
        let mut trailing = bytes.to_vec();
        trailing.push(0);
        assert!(decode::<Up>(&trailing).is_err(), "trailing bytes are refused");
        // A length prefix claiming a huge vector must fail without allocating it.
        let mut huge = vec![FRAME_VERSION, 0, 0, 0, 0];
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Up>(&huge).is_err());
    }

    #[test]
    fn every_item_kind_round_trips() {
        use protocol::ledger::{AccountId, Amount, Posting, Transfer};
        use protocol::msg::{DecideAck, Decision, PrepareItem, RefusalReason, Vote};
        use protocol::msg::{FromShard, ToShard};
        let id = uuid::Uuid::from_u128(7);
        let a = AccountId::new("a").expect("valid");
        let b = AccountId::new("b").expect("valid");
        let transfer = Transfer::one(a.clone(), b, Amount::new(5).expect("positive"));
        let item = PrepareItem {
            id,
            transfer,
            postings: vec![Posting { account: a.clone(), delta: -5 }],
            coordinator_url: "http://c".into(),
        };
        let up = Up::Items(vec![
            ToShard::Prepare { item, made_by: Some("ops".into()) },
            ToShard::Decide { id, decision: Decision::Commit },
            ToShard::Read { read: 3, account: a },
        ]);
        assert_eq!(decode::<Up>(&encode(&up)).expect("decodes"), up);
        let down = Down::Replies(vec![
            FromShard::Vote { id, vote: Vote::Yes },
            FromShard::Vote { id, vote: Vote::no_at(RefusalReason::InsufficientFunds, 1) },
            FromShard::Ack { id, decision: Decision::Abort, ack: DecideAck::Done },
            FromShard::Account { read: 3, account: None },
        ]);
        assert_eq!(decode::<Down>(&encode(&down)).expect("decodes"), down);
    }
}
