//! The participant's end of the coordinator's binary stream (`common::stream`): the upgrade route, and the
//! loop that applies each frame's items in order, as one store batch under one lock, then answers once that
//! batch is durable.
//!
//! Frames are pipelined: while one frame's fsync is under way the next is already applied in memory, and the
//! group commit lets one fsync cover several frames. Replies leave in frame order, each only after every write
//! before it is durable, so a YES vote or an ack is never sent for a write that a crash could still lose, and
//! a read never shows what a crash could take back.

use crate::server::{journal_decision, journal_holds, metric, persist};
use crate::{journal, storage, Node};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use common::crash;
use common::http::{error_response, now_unix_ms};
use common::stream::{self, Down, StreamError, Up};
use futures::{FutureExt, StreamExt};
use protocol::msg::{DecideAck, Vote};
use protocol::msg::{FromShard, ToShard};
use protocol::participant_core::{apply_frame, frame_is_well_formed, FrameApplied};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::Instrument;

/// Frames applied in memory but not yet answered, per connection. Past it the loop stops reading, so a
/// coordinator that sends faster than the disk syncs is slowed down rather than buffered without end.
const PIPELINE_FRAMES_MAX: usize = 64;
/// Frames already received that are applied together, as one store batch.
const COALESCE_FRAMES_MAX: usize = 64;

/// `GET /internal/stream` with `Upgrade: ledger-stream/1`. The cluster token and id were checked by the
/// middleware before this runs.
pub async fn upgrade(State(node): State<Arc<Node>>, mut req: Request) -> Response {
    let asked = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok());
    if asked != Some(stream::UPGRADE_PROTOCOL) {
        let message = format!("this route upgrades to {}", stream::UPGRADE_PROTOCOL);
        return error_response(StatusCode::BAD_REQUEST, "bad_upgrade", message);
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let span = tracing::info_span!("stream", shard = node.shard);
    tokio::spawn(
        async move {
            match on_upgrade.await {
                Ok(upgraded) => match serve(node, hyper_util::rt::TokioIo::new(upgraded)).await {
                    Ok(()) | Err(StreamError::Closed) => tracing::debug!("stream closed"),
                    Err(error) => tracing::warn!(%error, "stream closed"),
                },
                Err(error) => tracing::warn!(%error, "stream upgrade failed"),
            }
        }
        .instrument(span),
    );
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(stream::UPGRADE_PROTOCOL));
    response
}

/// A frame applied in memory, waiting to be answered.
struct Applied {
    /// Whether the frame wrote anything (or may repeat an answer for a write not yet durable).
    needs_sync: bool,
    prepared: bool,
    decided: bool,
    /// Per frame, in order: each frame gets its own reply frame.
    replies: Vec<Vec<FromShard>>,
}

async fn serve<S>(node: Arc<Node>, io: S) -> Result<(), StreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut source) = stream::framed(io).split();
    let (applied_tx, mut applied_rx) = mpsc::channel::<Applied>(PIPELINE_FRAMES_MAX);
    let writer_node = node.clone();
    let writer = tokio::spawn(async move {
        use futures::SinkExt;
        let mut ready = Vec::with_capacity(PIPELINE_FRAMES_MAX);
        loop {
            match tokio::time::timeout(stream::HEARTBEAT_INTERVAL, applied_rx.recv()).await {
                Err(_) => {
                    sink.send(stream::encode(&Down::Heartbeat)).await?;
                    continue;
                }
                Ok(None) => return Ok::<(), StreamError>(()),
                Ok(Some(first)) => ready.push(first),
            }
            // Every frame applied meanwhile shares this sync (group commit across frames).
            while ready.len() < PIPELINE_FRAMES_MAX {
                match applied_rx.try_recv() {
                    Ok(next) => ready.push(next),
                    Err(_) => break,
                }
            }
            if ready.iter().any(|a| a.needs_sync) {
                writer_node.store.sync().await.map_err(|e| StreamError::Io(std::io::Error::other(e)))?;
            }
            if ready.iter().any(|a| a.prepared) {
                crash::point(crash::PARTICIPANT_PREPARE_FLUSHED);
            }
            if ready.iter().any(|a| a.decided) {
                crash::point(crash::PARTICIPANT_DECIDE_APPLIED);
            }
            for replies in ready.drain(..).flat_map(|a| a.replies) {
                sink.feed(stream::encode(&Down::Replies(replies))).await?;
            }
            sink.flush().await?;
        }
    });
    let result = read_loop(&node, &mut source, &applied_tx).await;
    drop(applied_tx);
    // Let the replies of frames already applied go out (they are durable-then-sent, never sent early).
    let _ = writer.await;
    result
}

async fn read_loop<S>(
    node: &Node,
    source: &mut futures::stream::SplitStream<stream::FramedStream<S>>,
    applied: &mpsc::Sender<Applied>,
) -> Result<(), StreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let first = match tokio::time::timeout(stream::SILENCE_TIMEOUT, source.next()).await {
            Err(_) => return Err(StreamError::Timeout),
            Ok(None) => return Err(StreamError::Closed),
            Ok(Some(frame)) => frame?,
        };
        // Every frame already here joins one store batch: each sled batch costs a log write of its own.
        let mut frames = Vec::new();
        let mut failed = checked(&first).map(|items| frames.extend(items)).err();
        while failed.is_none() && frames.len() < COALESCE_FRAMES_MAX {
            match source.next().now_or_never() {
                None => break,
                Some(None) => failed = Some(StreamError::Closed),
                Some(Some(Err(e))) => failed = Some(StreamError::Io(e)),
                Some(Some(Ok(frame))) => match checked(&frame) {
                    Ok(items) => frames.extend(items),
                    Err(e) => failed = Some(e),
                },
            }
        }
        // The frames before a bad one are whole and valid: they are applied and answered; the bad one is not.
        if !frames.is_empty() && applied.send(apply(node, frames)).await.is_err() {
            return Err(StreamError::Closed);
        }
        if let Some(error) = failed {
            return Err(error);
        }
    }
}

/// A frame decoded and checked, or why the connection must close: `None` for a heartbeat.
fn checked(frame: &[u8]) -> Result<Option<Vec<ToShard>>, StreamError> {
    let up: Up = stream::decode(frame)?;
    stream::check_up(&up)?;
    let Up::Items(items) = up else { return Ok(None) };
    crash::point(crash::PARTICIPANT_FRAME_RECEIVED);
    if !frame_is_well_formed(&items) {
        return Err(StreamError::Refused("a prepare item without postings".into()));
    }
    Ok(Some(items))
}

/// Applies frames in order, each with `apply_frame`, as one atomic store batch, and journals what they settled.
fn apply(node: &Node, frames: Vec<Vec<ToShard>>) -> Applied {
    let all = || frames.iter().flatten();
    let prepared = all().any(|i| matches!(i, ToShard::Prepare { .. }));
    let decided = all().any(|i| matches!(i, ToShard::Decide { .. } | ToShard::Capture { .. }));
    if prepared {
        crash::point(crash::PARTICIPANT_PREPARE_RECEIVED);
    }
    if decided {
        crash::point(crash::PARTICIPANT_DECIDE_RECEIVED);
    }
    let now = now_unix_ms();
    let mut state = node.machine();
    let mut writes = Vec::with_capacity(all().count() * 3);
    let mut extra = journal::Inserts::default();
    let mut needs_sync = false;
    let mut replies = Vec::with_capacity(frames.len());
    for items in frames {
        let before = writes.len();
        let frame = apply_frame(&mut state, items, now, &storage::Decisions(&node.store), &mut writes);
        journal_holds(&mut state, &writes[before..], now, &mut extra);
        journal(&mut state, &frame, now, &mut extra);
        needs_sync |= frame.needs_sync;
        replies.push(frame.replies);
    }
    persist(node, &mut state, &writes, &extra);
    if needs_sync {
        metrics::gauge!(metric::PREPARED).set(state.prepared().count() as f64);
    }
    Applied { needs_sync, prepared, decided, replies }
}

/// The journal's side of one applied frame, and its metrics.
fn journal(state: &mut crate::ShardState, frame: &FrameApplied, now: u64, extra: &mut journal::Inserts) {
    for (id, decision, record) in &frame.settled {
        journal_decision(state, *id, *decision, record, None, now, extra);
    }
    for reply in &frame.replies {
        match reply {
            FromShard::Vote { id, vote } => {
                let label = if *vote == Vote::Yes { "yes" } else { "no" };
                metrics::counter!(metric::VOTES, "vote" => label).increment(1);
                tracing::debug_span!("transfer", transfer_id = %id).in_scope(|| tracing::debug!(?vote, "prepare"));
            }
            FromShard::Ack { id, decision, ack } => {
                let span = tracing::debug_span!("transfer", transfer_id = %id);
                if *ack == DecideAck::Refused {
                    span.in_scope(|| tracing::error!(?decision, "decision contradicts this shard's state: refused"));
                } else {
                    span.in_scope(|| tracing::debug!(?decision, "decided"));
                    let label = if *decision == protocol::msg::Decision::Commit { "commit" } else { "abort" };
                    metrics::counter!(metric::DECISIONS, "decision" => label).increment(1);
                }
            }
            FromShard::Account { .. } => {}
        }
    }
}
