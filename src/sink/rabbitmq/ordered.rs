//! A [`RabbitPublisher`]'s ordered lane: [`Publisher::begin`] writes a
//! batch on the lane's channel and returns, [`Publisher::finish`] collects
//! its confirms (see `lane.rs` for how a returned message finds its batch).
//!
//! [`Publisher::begin`]: crate::sink::Publisher::begin
//! [`Publisher::finish`]: crate::sink::Publisher::finish

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};

use lapin::options::BasicQosOptions;
use lapin::{Channel, Connection};
use tokio::time::Instant;

use super::confirm::{self, ChannelEnd};
use super::isolate::Key;
use super::lane::{LapinConfirm, LapinWindow, Sent};
use super::publish::{PublishFailed, RabbitPublisher};
use crate::message::Outbound;
use crate::sink::{Failure, FailureReason, Outcome, Unavailable};
use crate::telemetry::ErrorChain;

/// The lane's channel and the window of its batches in flight.
pub struct Lane {
    pub(super) channel: Channel,
    window: Arc<LapinWindow>,
}

/// A batch written on the lane, waiting for its confirms.
pub struct Begun {
    place: Place,
    channel: Channel,
    conn: Arc<Connection>,
    outcomes: Vec<Outcome>,
    sent: Vec<(usize, Key)>,
    broken: Option<PublishFailed>,
    deadline: Instant,
}

/// A batch's place in its window; dropped unfinished, it leaves the window.
struct Place {
    batch: u64,
    window: Arc<LapinWindow>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.window.forget(self.batch);
    }
}

impl RabbitPublisher {
    /// The lane's channel and window: the ones in use, or new ones when the
    /// channel closed or was retired and nothing is in flight on it. While
    /// batches are in flight on a channel that is no longer fit, no batch
    /// may begin: on a new channel it could reach the broker before the
    /// failed ones are sent again.
    async fn lane(&self, conn: &Connection) -> Result<(Channel, Arc<LapinWindow>), Unavailable> {
        {
            let lane = self.lane.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(l) = lane.as_ref() {
                let fit = !l.window.retired() && l.channel.status().connected();
                if fit {
                    return Ok((l.channel.clone(), l.window.clone()));
                }
                if !l.window.is_empty() {
                    return Err(Unavailable(
                        "the ordered channel failed with batches in flight; they are finished first"
                            .to_owned(),
                    ));
                }
            }
        }
        let channel = self.channel(conn).await?;
        let window = Arc::new(LapinWindow::default());
        let old = self
            .lane
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(Lane {
                channel: channel.clone(),
                window: window.clone(),
            });
        // Dropping the last handle of a channel closes it.
        drop(old);
        Ok((channel, window))
    }

    pub(super) async fn begin_ordered(
        &self,
        messages: Vec<Result<Outbound, Failure>>,
    ) -> Result<Begun, Unavailable> {
        let conn = self.connected()?;
        let setup = async {
            let missing = self.missing_exchanges(&conn, &messages).await?;
            Ok((missing, self.lane(&conn).await?))
        };
        let (missing, (channel, window)) = self.answered(&conn, "opening a channel", setup).await?;
        // A suspect goes alone on a channel of its own: with a batch still
        // in flight on the lane it could reach the queue before it.
        let suspect = messages.iter().flatten().any(|m| self.suspects.contains(m));
        if suspect && !window.is_empty() {
            return Err(Unavailable(
                "a suspect of an earlier refusal waits until nothing is in flight".to_owned(),
            ));
        }
        let (mut outcomes, to_send) = self.prepare(&conn, messages, &missing).await;
        let sent: Vec<(usize, Key)> = to_send.iter().map(|(i, m)| (*i, Key::of(m))).collect();
        let mut who: HashMap<usize, Sent> = sent
            .iter()
            .map(|(index, key)| {
                let sent = Sent {
                    index: *index,
                    key: key.clone(),
                };
                (*index, sent)
            })
            .collect();
        let (pending, broken) = match self.written(&conn, &channel, to_send, &mut outcomes).await {
            Some(written) => written,
            None => {
                // The writes stalled: every message of the batch stays "not
                // confirmed" and is sent again. No later batch may follow on
                // this channel; the batches before it fail with the
                // connection, which was given up on.
                window.retire();
                (Vec::new(), Some(PublishFailed::without_reason()))
            }
        };
        let published = pending
            .into_iter()
            .filter_map(|(index, c)| who.remove(&index).map(|s| (s, LapinConfirm(c))))
            .collect();
        let batch = window.add(published);
        Ok(Begun {
            place: Place { batch, window },
            channel,
            conn,
            outcomes,
            sent,
            broken,
            deadline: confirm::deadline_after(self.confirm_timeout),
        })
    }

    pub(super) async fn finish_ordered(&self, begun: Begun) -> Vec<Outcome> {
        let Begun {
            place,
            channel,
            conn,
            mut outcomes,
            sent,
            broken,
            deadline,
        } = begun;
        let (batch, window) = (place.batch, place.window.clone());
        // Unanswered confirms are failures, filled in below.
        let _ = tokio::time::timeout_at(deadline, window.answered(batch)).await;
        // A returned message of this batch may sit on a confirm of a later
        // one: the round trip makes sure lapin has handled every ack frame
        // so far, so every such confirm is resolved (`lane.rs`).
        let mut unsure = None;
        if window.has_later(batch) {
            let barrier = confirm::deadline_after(self.confirm_timeout);
            match tokio::time::timeout_at(barrier, channel.basic_qos(0, BasicQosOptions::default()))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(err)) => unsure = Some(ErrorChain(&err).to_string()),
                Err(_) => unsure = Some(format!("no answer within {:?}", self.confirm_timeout)),
            }
        }
        window.sweep_later(batch);
        let taken = window.take(batch);
        drop(place);
        let mut end = ChannelEnd::Healthy;
        for (index, answer) in taken.answers {
            outcomes[index] = match answer {
                Some(Ok(outcome)) => outcome,
                Some(Err(err)) => confirm::channel_failed(&err, &mut end),
                None => confirm::unanswered(self.confirm_timeout, &mut end),
            };
        }
        for (index, outcome) in taken.returned {
            outcomes[index] = outcome;
        }
        let doubt = match (taken.unplaced, unsure) {
            (_, Some(why)) => {
                end = ChannelEnd::Broken;
                Some(Failure::new(
                    FailureReason::Connection,
                    format!(
                        "the channel failed before this batch could be checked for returned messages ({why}); every acked message of it is sent again"
                    ),
                ))
            }
            (true, None) => Some(Failure::new(
                FailureReason::Returned,
                "the broker returned a message that names no message in flight; every acked message of the batches then in flight is sent again",
            )),
            (false, None) => None,
        };
        if let Some(failure) = doubt {
            for (index, _) in &sent {
                if outcomes[*index] == Outcome::Delivered {
                    outcomes[*index] = Outcome::Failed(failure.clone());
                }
            }
        }
        let end = PublishFailed::worsen(broken, end);
        if !self.after_batch(&conn, &channel, end, &sent, &mut outcomes) {
            window.retire();
        }
        outcomes
    }
}
