//! The ordered lane: batches published one after another on one channel
//! kept for them, the next one written while the broker still confirms
//! the one before, so the channel does not wait on the relay between
//! batches. One channel keeps the order: the broker takes a channel's
//! messages in the order they were published.
//!
//! The catch is the returned message. With `mandatory`, an unroutable
//! message comes back before its ack, and lapin hands it to whichever
//! confirm of the channel the next ack frame resolves first: with two
//! batches in flight, possibly a confirm of the later batch. A batch whose
//! answers were settled without it would count the returned message as
//! delivered. So the confirms of every batch in flight on the lane sit in
//! one [`Window`], and a batch's answers are final only after:
//!
//! 1. every confirm of the batch is answered;
//! 2. if a later batch is in flight, a round trip on the channel (a
//!    `basic.qos`, which changes nothing on a channel without consumers):
//!    lapin handles a channel's frames in order, so once its answer is in,
//!    every ack frame before it has been handled whole, and every confirm
//!    such a frame resolved is resolved;
//! 3. a look, without waiting, at the later batches' confirms, taking the
//!    returned message off any that carries one.
//!
//! Each returned message goes to its own message, found by `x-outbox-id`
//! or else `message_id`, in whichever batch of the window holds it. One
//! that names no message in flight fails every acked message of every
//! batch then in flight: it may have been any of them.

use std::collections::BTreeMap;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use lapin::PublisherConfirm;
use lapin::message::BasicReturnMessage;
use lapin::types::ShortString;

use super::confirm;
use super::isolate::Key;
use crate::sink::Outcome;

/// Who a published message is: its place in its batch's outcomes, and
/// which message it is (the key its suspects are kept by, too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Sent {
    pub index: usize,
    pub key: Key,
}

/// A confirm the window waits on: its outcome apart from any returned
/// message it carried, and that message. lapin's ([`LapinConfirm`]), or
/// a scripted one in the unit tests.
pub(super) type Answer<R> = Result<(Outcome, Option<R>), lapin::Error>;

/// A returned message: who it names, and what it makes of that message.
pub(super) trait Returned {
    fn identity(&self) -> Identity;
    fn outcome(&self) -> Outcome;
}

impl Returned for BasicReturnMessage {
    fn identity(&self) -> Identity {
        Identity::of(self)
    }

    fn outcome(&self) -> Outcome {
        confirm::returned(self)
    }
}

/// lapin's confirm, answering as the window wants.
pub(super) struct LapinConfirm(pub PublisherConfirm);

impl Future for LapinConfirm {
    type Output = Answer<BasicReturnMessage>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map(confirm::split))
    }
}

/// The window of a lane on lapin.
pub(super) type LapinWindow = Window<LapinConfirm, BasicReturnMessage>;

/// The confirms of the batches in flight on one lane channel.
pub(super) struct Window<C, R>(Mutex<Inner<C, R>>);

impl<C, R> Default for Window<C, R> {
    fn default() -> Self {
        Window(Mutex::new(Inner {
            retired: false,
            next: 0,
            batches: BTreeMap::new(),
            returns: Vec::new(),
            unplaced_until: None,
        }))
    }
}

struct Inner<C, R> {
    /// A batch on the channel failed so that it is unfit for more, or was
    /// given up unfinished: the next batch begun once nothing is in flight
    /// gets a new channel.
    retired: bool,
    next: u64,
    batches: BTreeMap<u64, Vec<Slot<C>>>,
    /// Returned messages taken off confirms, not yet given to their batch.
    returns: Vec<R>,
    /// A returned message named no message in flight: the batches up to
    /// this one fail their acked messages.
    unplaced_until: Option<u64>,
}

struct Slot<C> {
    sent: Sent,
    state: State<C>,
}

enum State<C> {
    Waiting(C),
    /// The confirm's outcome apart from any returned message it carried
    /// (that one went to `returns`), or the error that ended it.
    Answered(Result<Outcome, lapin::Error>),
}

/// A batch taken out of the window with its answers.
pub(super) struct Taken {
    /// Per message published, in order: its answer, `None` if it had none.
    pub answers: Vec<(usize, Option<Result<Outcome, lapin::Error>>)>,
    /// The returned messages that are this batch's: the index each names.
    pub returned: Vec<(usize, Outcome)>,
    /// A returned message named no message in flight while this batch was.
    pub unplaced: bool,
}

impl<C, R> Window<C, R>
where
    C: Future<Output = Answer<R>> + Unpin,
    R: Returned,
{
    fn lock(&self) -> MutexGuard<'_, Inner<C, R>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a batch's published messages; returns the batch's number.
    pub fn add(&self, published: Vec<(Sent, C)>) -> u64 {
        let mut inner = self.lock();
        let batch = inner.next;
        inner.next += 1;
        let slots = published
            .into_iter()
            .map(|(sent, c)| Slot {
                sent,
                state: State::Waiting(c),
            })
            .collect();
        inner.batches.insert(batch, slots);
        batch
    }

    /// Resolves once every confirm of `batch` has its answer.
    pub fn answered(&self, batch: u64) -> impl Future<Output = ()> + '_ {
        // The slots before `from` have their answers (an answer is never
        // taken back), so each wake-up starts at the first one without
        // (from the start, every wake-up looked at every answered slot of
        // the batch again: thousands per ack frame in a large batch).
        let mut from = 0;
        poll_fn(move |cx| {
            let mut inner = self.lock();
            let Inner {
                batches, returns, ..
            } = &mut *inner;
            let Some(slots) = batches.get_mut(&batch) else {
                return Poll::Ready(());
            };
            // Confirms mostly come in order: wait on the first one without
            // an answer (its waker is the one registered), not on all.
            for slot in slots.iter_mut().skip(from) {
                if !poll_slot(slot, returns, cx) {
                    return Poll::Pending;
                }
                from += 1;
            }
            Poll::Ready(())
        })
    }

    /// Whether no batch is in flight.
    pub fn is_empty(&self) -> bool {
        self.lock().batches.is_empty()
    }

    pub fn retire(&self) {
        self.lock().retired = true;
    }

    pub fn retired(&self) -> bool {
        self.lock().retired
    }

    /// A batch given up before it was finished (its caller stopped): out
    /// of the window, and the channel is retired, since its confirms will
    /// still come.
    pub fn forget(&self, batch: u64) {
        let mut inner = self.lock();
        if inner.batches.remove(&batch).is_some() {
            inner.retired = true;
        }
    }

    /// Whether a batch begun after `batch` is still in the window.
    pub fn has_later(&self, batch: u64) -> bool {
        self.lock().batches.range(batch + 1..).next().is_some()
    }

    /// Takes the answers the later batches' confirms already have, without
    /// waiting for the others (their own batch waits for them later).
    pub fn sweep_later(&self, batch: u64) {
        let mut cx = Context::from_waker(Waker::noop());
        let mut inner = self.lock();
        let Inner {
            batches, returns, ..
        } = &mut *inner;
        for (_, slots) in batches.range_mut(batch + 1..) {
            for slot in slots {
                poll_slot(slot, returns, &mut cx);
            }
        }
    }

    /// Removes `batch` with its answers and the returned messages that
    /// are its own.
    pub fn take(&self, batch: u64) -> Taken {
        let mut inner = self.lock();
        let slots = inner.batches.remove(&batch).unwrap_or_default();
        let mut returned = Vec::new();
        let mut kept = Vec::new();
        let mut unplaced = false;
        for message in std::mem::take(&mut inner.returns) {
            let who = message.identity();
            let mine: Vec<usize> = slots
                .iter()
                .filter(|s| who.names(&s.sent))
                .map(|s| s.sent.index)
                .collect();
            let later = inner.batches.values().flatten().any(|s| who.names(&s.sent));
            if !mine.is_empty() {
                let outcome = message.outcome();
                returned.extend(mine.iter().map(|i| (*i, outcome.clone())));
            }
            if later {
                kept.push(message);
            } else if mine.is_empty() {
                unplaced = true;
            }
        }
        if unplaced {
            // Every batch in the window when the stray was found.
            inner.unplaced_until = Some(inner.next.saturating_sub(1));
        }
        inner.returns = kept;
        let unplaced = inner.unplaced_until.is_some_and(|until| batch <= until);
        let answers = slots
            .into_iter()
            .map(|s| match s.state {
                State::Answered(a) => (s.sent.index, Some(a)),
                State::Waiting(_) => (s.sent.index, None),
            })
            .collect();
        Taken {
            answers,
            returned,
            unplaced,
        }
    }
}

/// Polls a waiting confirm once; whether it has its answer now.
fn poll_slot<C, R>(slot: &mut Slot<C>, returns: &mut Vec<R>, cx: &mut Context<'_>) -> bool
where
    C: Future<Output = Answer<R>> + Unpin,
{
    let State::Waiting(confirm) = &mut slot.state else {
        return true;
    };
    let answer = match Pin::new(confirm).poll(cx) {
        Poll::Pending => return false,
        Poll::Ready(Ok((outcome, back))) => {
            returns.extend(back);
            Ok(outcome)
        }
        Poll::Ready(Err(err)) => Err(err),
    };
    slot.state = State::Answered(answer);
    true
}

/// What a returned message says it is: its `x-outbox-id` header and its
/// `message_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Identity {
    row_id: Option<i64>,
    message_id: Option<ShortString>,
}

impl Identity {
    fn of(message: &BasicReturnMessage) -> Self {
        Identity {
            row_id: confirm::returned_row_id(message),
            message_id: message.delivery.properties.message_id().clone(),
        }
    }

    /// Whether this is the message `sent`: by row id when it has one (a
    /// table row), else by `message_id` (an `outbox_emit()` message).
    fn names(&self, sent: &Sent) -> bool {
        match &sent.key {
            Key::Row(id) => self.row_id == Some(*id),
            Key::Message(id) => self.row_id.is_none() && self.message_id.as_ref() == Some(id),
        }
    }
}

#[cfg(test)]
mod tests;
