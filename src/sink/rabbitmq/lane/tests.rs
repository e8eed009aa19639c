use super::*;
use crate::sink::{Failure, FailureReason};
use tokio::sync::oneshot;

/// A returned message that names a row.
struct Back(i64);

impl Returned for Back {
    fn identity(&self) -> Identity {
        Identity {
            row_id: Some(self.0),
            message_id: None,
        }
    }

    fn outcome(&self) -> Outcome {
        Outcome::Failed(Failure::new(
            FailureReason::Returned,
            format!("row {}", self.0),
        ))
    }
}

/// A confirm the test answers when it likes.
struct Scripted(oneshot::Receiver<Answer<Back>>);

impl Future for Scripted {
    type Output = Answer<Back>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(std::io::Error::other("the test dropped it").into())))
    }
}

type Senders = Vec<oneshot::Sender<Answer<Back>>>;

/// A batch of the given row ids in the window; its number and the
/// senders that answer its confirms.
fn begin(w: &Window<Scripted, Back>, rows: &[i64]) -> (u64, Senders) {
    let (mut slots, mut senders) = (Vec::new(), Vec::new());
    for (index, row) in rows.iter().enumerate() {
        let (tx, rx) = oneshot::channel();
        senders.push(tx);
        let sent = Sent {
            index,
            key: Key::Row(*row),
        };
        slots.push((sent, Scripted(rx)));
    }
    (w.add(slots), senders)
}

fn ack(tx: oneshot::Sender<Answer<Back>>, carrying: Option<i64>) {
    let _ = tx.send(Ok((Outcome::Delivered, carrying.map(Back))));
}

/// What `finish` does, without the broker round trip.
async fn finish(w: &Window<Scripted, Back>, batch: u64) -> Taken {
    w.answered(batch).await;
    w.sweep_later(batch);
    w.take(batch)
}

fn delivered(t: &Taken) -> Vec<usize> {
    t.answers
        .iter()
        .filter(|(_, a)| matches!(a, Some(Ok(Outcome::Delivered))))
        .map(|(i, _)| *i)
        .collect()
}

#[tokio::test]
async fn a_return_on_a_confirm_of_the_later_batch_goes_to_its_own_row() {
    let w = Window::default();
    let (a, ta) = begin(&w, &[10, 11]);
    let (b, tb) = begin(&w, &[20]);
    let mut ta = ta.into_iter();
    let mut tb = tb.into_iter();
    // One ack frame covers rows 10, 11 and 20; lapin hands row 11's
    // returned message to the confirm of row 20, in the later batch.
    ack(ta.next().unwrap(), None);
    ack(ta.next().unwrap(), None);
    ack(tb.next().unwrap(), Some(11));
    let first = finish(&w, a).await;
    assert_eq!(first.returned.len(), 1, "row 11 is returned");
    assert_eq!(first.returned[0].0, 1);
    assert!(!first.unplaced);
    let second = finish(&w, b).await;
    assert_eq!(delivered(&second), [0]);
    assert!(second.returned.is_empty() && !second.unplaced);
}

#[tokio::test]
async fn a_return_on_a_confirm_of_the_earlier_batch_waits_for_its_own() {
    let w = Window::default();
    let (a, ta) = begin(&w, &[10]);
    let (b, tb) = begin(&w, &[20, 21]);
    let mut tb = tb.into_iter();
    ack(ta.into_iter().next().unwrap(), Some(21));
    let first = finish(&w, a).await;
    assert_eq!(delivered(&first), [0]);
    assert!(first.returned.is_empty() && !first.unplaced);
    ack(tb.next().unwrap(), None);
    ack(tb.next().unwrap(), None);
    let second = finish(&w, b).await;
    assert_eq!(second.returned.len(), 1);
    assert_eq!(second.returned[0].0, 1, "row 21 is returned");
}

#[tokio::test]
async fn a_return_naming_nothing_in_flight_fails_the_batches_then_in_flight() {
    let w = Window::default();
    let (a, ta) = begin(&w, &[10]);
    let (b, tb) = begin(&w, &[20]);
    ack(ta.into_iter().next().unwrap(), Some(99));
    assert!(finish(&w, a).await.unplaced);
    let (c, tc) = begin(&w, &[30]);
    ack(tb.into_iter().next().unwrap(), None);
    ack(tc.into_iter().next().unwrap(), None);
    assert!(
        finish(&w, b).await.unplaced,
        "in flight when the stray came"
    );
    assert!(!finish(&w, c).await.unplaced, "begun after it");
}

#[tokio::test]
async fn a_batch_given_up_leaves_the_window_and_retires_the_channel() {
    let w = Window::default();
    let (a, _ta) = begin(&w, &[10]);
    assert!(!w.is_empty() && !w.retired());
    w.forget(a);
    assert!(w.is_empty() && w.retired());
}

fn sent(row_id: i64, message_id: &str) -> Sent {
    Sent {
        index: 0,
        key: Key::new(row_id, Some(&message_id.into())),
    }
}

#[test]
fn a_returned_row_is_named_by_its_row_id_and_a_message_by_its_message_id() {
    let row = Identity {
        row_id: Some(7),
        message_id: Some("k".into()),
    };
    assert!(row.names(&sent(7, "other")));
    // Same message id, another row: not it (two rows may share a key).
    assert!(!row.names(&sent(8, "k")));
    assert!(!row.names(&sent(0, "k")));
    let message = Identity {
        row_id: None,
        message_id: Some("0/16B3748-2".into()),
    };
    assert!(message.names(&sent(0, "0/16B3748-2")));
    assert!(!message.names(&sent(0, "0/16B3748-3")));
    // A row's message always carries its id: without one it is not a row.
    assert!(!message.names(&sent(5, "0/16B3748-2")));
    let nameless = Identity {
        row_id: None,
        message_id: None,
    };
    assert!(!nameless.names(&Sent {
        index: 0,
        key: Key::new(0, None),
    }));
}
