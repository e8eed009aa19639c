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
use lapin::types::ShortString;
use lapin::{Channel, Connection};

use super::confirm;
use crate::message::Outbound;
use crate::sink::{Failure, FailureReason, Outcome};
use crate::telemetry::ErrorChain;

/// More suspects than this means something else is wrong (every message
/// refused, say); the list starts over rather than grow without bound.
const MAX_SUSPECTS: usize = 100_000;

/// Which message a suspect is, stable across its retries: its row id
/// when it has a row; else (an `outbox_emit()` message, whose row id is 0)
/// its `message_id`, which is the same on every redelivery. Keyed by row id
/// alone, one suspect message would make every emitted message a suspect,
/// each then sent alone, a confirm at a time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Row(i64),
    Message(ShortString),
}

impl Key {
    pub fn of(m: &Outbound) -> Self {
        Key::new(m.row_id, m.properties.message_id().as_ref())
    }

    /// From a row id (0 for a message without a row) and a `message_id`.
    pub fn new(row_id: i64, message_id: Option<&ShortString>) -> Self {
        match message_id {
            Some(id) if row_id == 0 => Key::Message(id.clone()),
            _ => Key::Row(row_id),
        }
    }

    /// The row id, for a message that has a row.
    pub fn row_id(&self) -> Option<i64> {
        match self {
            Key::Row(id) if *id != 0 => Some(*id),
            _ => None,
        }
    }
}

/// Messages to publish alone.
#[derive(Default)]
pub struct Suspects(Mutex<HashSet<Key>>);

impl Suspects {
    pub fn contains(&self, m: &Outbound) -> bool {
        let set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        !set.is_empty() && set.contains(&Key::of(m))
    }

    pub fn insert(&self, key: Key) {
        let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if set.len() >= MAX_SUSPECTS {
            set.clear();
        }
        set.insert(key);
    }

    fn remove(&self, key: &Key) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
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
        let key = Key::of(&m);
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
                suspects.remove(&key);
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

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;

    use super::*;

    fn message(row_id: i64, message_id: &str) -> Outbound {
        Outbound {
            row_id,
            exchange: "x".into(),
            routing_key: "k".into(),
            body: Vec::new(),
            properties: BasicProperties::default().with_message_id(message_id.into()),
        }
    }

    #[test]
    fn a_row_is_a_suspect_by_its_id_an_emitted_message_by_its_message_id() {
        let suspects = Suspects::default();
        suspects.insert(Key::of(&message(7, "d-7")));
        suspects.insert(Key::of(&message(0, "lsn-1-0")));
        assert!(suspects.contains(&message(7, "another key after a replay")));
        assert!(!suspects.contains(&message(8, "d-7")), "rows go by id");
        assert!(suspects.contains(&message(0, "lsn-1-0")));
        // Every emitted message has row id 0: only the suspect one goes
        // alone, not all of them.
        assert!(!suspects.contains(&message(0, "lsn-1-1")));
        suspects.remove(&Key::of(&message(0, "lsn-1-0")));
        assert!(!suspects.contains(&message(0, "lsn-1-0")));
        assert_eq!(Key::of(&message(0, "m")).row_id(), None);
        assert_eq!(Key::of(&message(5, "m")).row_id(), Some(5));
    }
}
