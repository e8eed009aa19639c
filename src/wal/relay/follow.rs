//! Following the stream: its events into the queue, and up to
//! [`LANE_DEPTH`] batches on the publisher's ordered lane (see `send.rs`).

use super::*;

impl<P: Publisher> WalRelay<P> {
    /// Follows the stream: takes in its events, and keeps up to
    /// [`LANE_DEPTH`] batches on the publisher's ordered lane (see `send.rs`).
    pub(super) async fn follow<S: WalStream>(
        &self,
        st: &mut State,
        stream: &mut S,
        drain: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<End, SessionError> {
        let mut tick = tokio::time::interval(self.config.poll_interval.min(STATUS_INTERVAL));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cap = LANE_DEPTH * self.config.batch_size;
        let mut paused = self.health.paused_changes();
        // The batches on the lane, in the order they were written, with
        // how many queued items each holds: the front one's confirms are
        // awaited, the others' once it is settled.
        let mut lane: VecDeque<(usize, Finishing<'_>)> = VecDeque::with_capacity(LANE_DEPTH);
        // The publisher was unavailable: no batch before the next tick, or
        // before the batch in flight is finished.
        let mut hold = false;
        loop {
            self.health.beat();
            let in_flight: usize = lane.iter().map(|b| b.0).sum();
            let stopping = drain.is_cancelled() || *paused.borrow_and_update();
            if stopping && in_flight == 0 {
                return Ok(if drain.is_cancelled() {
                    End::Drained
                } else {
                    End::Paused
                });
            }
            // Take in what is ready, up to a full lane of batches.
            while st.pending.len() < cap {
                match now_or_never(stream.recv()) {
                    Some(event) => self.handle(st, stream, event?)?,
                    None => break,
                }
            }
            // After a failure the front message may have to wait (nothing
            // is in flight then).
            let front_waits = st
                .pending
                .front()
                .and_then(|i| i.retry_at)
                .filter(|at| in_flight == 0 && *at > Instant::now());
            if !stopping
                && !hold
                && lane.len() < LANE_DEPTH
                && st.pending.len() > in_flight
                && front_waits.is_none()
                && self.publisher.can_publish()
            {
                let messages = self.next_batch(st, in_flight);
                let n = messages.len();
                let begun = tokio::select! {
                    biased;
                    _ = abort.cancelled() => return Ok(End::Aborted(in_flight + n)),
                    begun = self.publisher.begin(messages) => begun,
                };
                match begun {
                    Ok(b) => lane.push_back((n, Box::pin(self.publisher.finish(b)))),
                    Err(unavailable) => {
                        // With a batch in flight, it is finished first.
                        if in_flight == 0 {
                            self.publisher.report_failure();
                            debug!(source = %self.config.name, error = %unavailable, "broker unavailable; waiting");
                        }
                        hold = true;
                    }
                }
                continue;
            }
            let retry = async {
                match front_waits {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let finished = async {
                match lane.front_mut() {
                    Some((_, f)) => f.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = abort.cancelled() => return Ok(End::Aborted(in_flight)),
                outcomes = finished => {
                    lane.pop_front();
                    hold = false;
                    let failed = outcomes.iter().any(|o| matches!(o, Outcome::Failed(_)));
                    // After a failure the batches written after it are
                    // finished first: their messages all go again after the
                    // failed one, and their answers only tell the order
                    // breaks.
                    let mut later = Vec::new();
                    while failed && let Some((_, rest)) = lane.pop_front() {
                        tokio::select! {
                            biased;
                            _ = abort.cancelled() => return Ok(End::Aborted(in_flight)),
                            answers = rest => later.extend(answers),
                        }
                    }
                    self.settle(st, stream, &outcomes, &later).await;
                }
                _ = drain.cancelled(), if !drain.is_cancelled() => {}
                event = stream.recv(), if st.pending.len() < cap => self.handle(st, stream, event?)?,
                _ = retry => {}
                _ = self.publisher.publishable(drain), if in_flight == 0 && !self.publisher.can_publish() => {}
                _ = tick.tick() => hold = false,
                Ok(()) = paused.changed() => {}
            }
        }
    }
}

/// A begun batch's confirms, being awaited.
type Finishing<'a> = Pin<Box<dyn Future<Output = Vec<Outcome>> + Send + 'a>>;

/// Polls `f` once: its output if it is ready now.
fn now_or_never<F: Future>(f: F) -> Option<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}
