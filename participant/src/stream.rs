//! The participant's end of the coordinator's binary stream (`common::stream`): the upgrade route, and the
//! loop that hands each frame to the participant's core, applies the core's writes as one store batch under
//! one lock, syncs, and sends the replies the core releases once they are durable.
//!
//! Frames are pipelined: while one frame's fsync is under way the next is already applied in memory, and the
//! group commit lets one fsync cover several frames. Replies leave in frame order, each only after every write
//! before it is durable (the core's rule), so a YES vote or an ack is never sent for a write that a crash could
//! still lose, and a read never shows what a crash could take back.

use crate::apply::{metric, persist, sync};
use crate::{storage, Node};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use common::crash;
use common::http::{error_response, now_unix_ms};
use common::stream::{self, Down, StreamError, Up};
use futures::{FutureExt, StreamExt};
use protocol::msg::{DecideAck, FromShard, ToShard, Vote};
use protocol::participant_core::frame_is_well_formed;
use std::sync::atomic::Ordering;
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

/// A group of frames applied in memory, waiting to be answered.
struct Applied {
    /// The barrier their replies wait for, if they wait at all (the core says).
    barrier: Option<u64>,
    prepared: bool,
    decided: bool,
}

async fn serve<S>(node: Arc<Node>, io: S) -> Result<(), StreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let link = node.next_link.fetch_add(1, Ordering::Relaxed);
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
            // Every group applied meanwhile shares this sync (group commit across frames).
            while ready.len() < PIPELINE_FRAMES_MAX {
                match applied_rx.try_recv() {
                    Ok(next) => ready.push(next),
                    Err(_) => break,
                }
            }
            if let Some(barrier) = ready.iter().filter_map(|a| a.barrier).max() {
                sync(&writer_node, Some(barrier)).await.map_err(|e| StreamError::Io(std::io::Error::other(e)))?;
            }
            if ready.iter().any(|a| a.prepared) {
                crash::point(crash::PARTICIPANT_PREPARE_FLUSHED);
            }
            if ready.iter().any(|a| a.decided) {
                crash::point(crash::PARTICIPANT_DECIDE_APPLIED);
            }
            ready.clear();
            let replies: Vec<Vec<FromShard>> = {
                let mut core = writer_node.core();
                std::iter::from_fn(|| core.poll_reply(link)).collect()
            };
            for replies in replies {
                count(&replies);
                sink.feed(stream::encode(&Down::Replies(replies))).await?;
            }
            sink.flush().await?;
        }
    });
    let result = read_loop(&node, link, &mut source, &applied_tx).await;
    drop(applied_tx);
    // Let the replies of frames already applied go out (they are durable-then-sent, never sent early).
    let _ = writer.await;
    node.core().drop_link(link);
    result
}

async fn read_loop<S>(
    node: &Node,
    link: u64,
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
        if !frames.is_empty() && applied.send(apply(node, link, frames)).await.is_err() {
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

/// Hands frames to the core in order, and applies its writes as one atomic store batch.
fn apply(node: &Node, link: u64, frames: Vec<Vec<ToShard>>) -> Applied {
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
    let mut core = node.core();
    for items in frames {
        core.handle_frame(now, link, items, &storage::Decisions(&node.store));
    }
    let barrier = persist(node, &mut core);
    if prepared || decided {
        metrics::gauge!(metric::PREPARED).set(core.machine().prepared().count() as f64);
    }
    Applied { barrier, prepared, decided }
}

/// The metrics and debug lines of replies on their way out.
fn count(replies: &[FromShard]) {
    for reply in replies {
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
