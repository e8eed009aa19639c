//! Following the stream: its events into the queue, and up to two
//! batches on the publisher's ordered lane (see `send.rs`).

use super::*;

impl<P: Publisher> WalRelay<P> {
    /// Follows the stream: takes in its events, and keeps up to two
    /// batches on the publisher's ordered lane (see `send.rs`).
    pub(super) async fn follow<S: WalStream>(
        &self,
        st: &mut State,
        stream: &mut S,
        drain: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<End, SessionError> {
        let mut tick = tokio::time::interval(self.config.poll_interval.min(STATUS_INTERVAL));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cap = 2 * self.config.batch_size;
        let mut paused = self.health.paused_changes();
        // The batch whose confirms are awaited, and the one written after
        // it: how many queued items each holds.
        let mut front: Option<(usize, Finishing<'_>)> = None;
        let mut second: Option<(usize, P::Begun)> = None;
        // The publisher was unavailable: no batch before the next tick, or
        // before the batch in flight is finished.
        let mut hold = false;
        loop {
            self.health.beat();
            let in_flight = front.as_ref().map_or(0, |f| f.0) + second.as_ref().map_or(0, |s| s.0);
            let stopping = drain.is_cancelled() || *paused.borrow_and_update();
            if stopping && in_flight == 0 {
                return Ok(if drain.is_cancelled() {
                    End::Drained
                } else {
                    End::Paused
                });
            }
            // Take in what is ready, up to two batches.
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
                && second.is_none()
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
                    Ok(b) if front.is_none() => {
                        front = Some((n, Box::pin(self.publisher.finish(b))));
                    }
                    Ok(b) => second = Some((n, b)),
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
                match front.as_mut() {
                    Some((_, f)) => f.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = abort.cancelled() => return Ok(End::Aborted(in_flight)),
                outcomes = finished => {
                    front = None;
                    hold = false;
                    let failed = outcomes.iter().any(|o| matches!(o, Outcome::Failed(_)));
                    let later = match second.take() {
                        // Its messages all go again after the failed one:
                        // its answers only tell the order breaks.
                        Some((_, b)) if failed => tokio::select! {
                            biased;
                            _ = abort.cancelled() => return Ok(End::Aborted(in_flight)),
                            later = self.publisher.finish(b) => later,
                        },
                        Some((m, b)) => {
                            front = Some((m, Box::pin(self.publisher.finish(b))));
                            Vec::new()
                        }
                        None => Vec::new(),
                    };
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
