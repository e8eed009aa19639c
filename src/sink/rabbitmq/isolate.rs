//! Finding the message the broker refuses.
//!
//! Some messages make RabbitMQ close the channel they were published on
//! (403 ACCESS_REFUSED for an internal exchange or one the user may not
//! write to, 406 PRECONDITION_FAILED for a message over the broker's
//! `max_message_size`, a 404 for an exchange deleted a moment ago). On a
//! pipelined channel every message without an answer yet fails with it, so
//! the culprit cannot be told from its neighbours. Those messages become
//! suspects: each is published on its own the next time, waiting for its
//! confirm before the next one, so a refusal lands on the row that caused
//! it (reason `refused`, counted toward its `max_attempts`) and the others
//! are delivered. A suspect leaves the list when the broker answers it.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Connection};

use super::confirm;
use crate::message::Outbound;
use crate::sink::{Failure, FailureReason, Outcome};
use crate::telemetry::ErrorChain;

/// More suspects than this means something else is wrong (every message
/// refused, say); the list starts over rather than grow without bound.
const MAX_SUSPECTS: usize = 100_000;

/// Row ids to publish alone.
#[derive(Default)]
pub struct Suspects(Mutex<HashSet<i64>>);

impl Suspects {
    pub fn contains(&self, row_id: i64) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&row_id)
    }

    pub fn insert(&self, row_id: i64) {
        let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if set.len() >= MAX_SUSPECTS {
            set.clear();
        }
        set.insert(row_id);
    }

    fn remove(&self, row_id: i64) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&row_id);
    }
}

/// Publishes each message on its own and waits for its answer before the
/// next, writing each result into `outcomes[index]`. A refusal closes the
/// channel; the next message gets a new one.
pub(super) async fn send_alone(
    conn: &Connection,
    messages: Vec<(usize, Outbound)>,
    timeout: Duration,
    outcomes: &mut [Outcome],
    suspects: &Suspects,
) {
    let mut channel: Option<Channel> = None;
    let mut gone: Option<String> = None;
    for (index, m) in messages {
        if let Some(why) = &gone {
            outcomes[index] = failed(FailureReason::Connection, why.clone());
            continue;
        }
        let ch = match channel.take().filter(|c| c.status().connected()) {
            Some(ch) => ch,
            None => match open(conn).await {
                Ok(ch) => ch,
                Err(err) => {
                    let why = format!("cannot open a channel: {}", ErrorChain(&err));
                    outcomes[index] = failed(FailureReason::Connection, why.clone());
                    gone = Some(why);
                    continue;
                }
            },
        };
        let row_id = m.row_id;
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let answer = tokio::time::timeout(timeout, async {
            ch.basic_publish(m.exchange, m.routing_key, options, &m.body, m.properties)
                .await?
                .await
        })
        .await;
        outcomes[index] = match answer {
            Ok(Ok(confirmation)) => {
                suspects.remove(row_id);
                channel = Some(ch);
                confirm::classify(confirmation)
            }
            Ok(Err(err)) => match confirm::refusal(&err) {
                // The row stays a suspect: it goes alone again next time.
                Some(reason) => failed(
                    FailureReason::Refused,
                    format!("refused by the broker, which closed the channel: {reason}"),
                ),
                None => {
                    let why = format!("publish failed: {}", ErrorChain(&err));
                    gone = Some(why.clone());
                    failed(FailureReason::Connection, why)
                }
            },
            Err(_) => failed(
                FailureReason::Timeout,
                format!("no confirm from the broker within {timeout:?}"),
            ),
        };
    }
    if let Some(ch) = channel
        && ch.status().connected()
    {
        let _ = ch.close(200, "done".into()).await;
    }
}

async fn open(conn: &Connection) -> Result<Channel, lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

fn failed(reason: FailureReason, detail: String) -> Outcome {
    Outcome::Failed(Failure::new(reason, detail))
}
