//! Which broker node to connect to next.
//!
//! outboxd keeps one connection, to one node of `rabbitmq.urls`. When it
//! is lost, the next attempt goes to the node after it (round-robin), so a
//! stopped node is not the first one asked again. A failed attempt moves
//! on to the next node at once; only when every node has failed once in a
//! row does the supervisor wait (the usual reconnect backoff). With one
//! node this is exactly the old behaviour: back off after each failure.

/// The rotation over `count` nodes (pure: the supervisor does the I/O).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    count: usize,
    next: usize,
    /// Failed attempts since the last connection or the last backoff.
    failed_in_round: usize,
}

impl Rotation {
    /// Starts at the first node of the config. `count` is at least 1 (the
    /// config refuses an empty list); 0 is treated as 1.
    pub fn new(count: usize) -> Self {
        Self {
            count: count.max(1),
            next: 0,
            failed_in_round: 0,
        }
    }

    /// The index of the node to try now.
    pub fn node(&self) -> usize {
        self.next
    }

    /// The attempt on [`Rotation::node`] succeeded.
    pub fn connected(&mut self) {
        self.failed_in_round = 0;
    }

    /// The connection to [`Rotation::node`] was lost: start after it.
    pub fn lost(&mut self) {
        self.next = (self.next + 1) % self.count;
        self.failed_in_round = 0;
    }

    /// The attempt on [`Rotation::node`] failed: move to the next node.
    /// `true` when every node has now failed once since the last
    /// connection or backoff, so the caller should back off before trying.
    pub fn failed(&mut self) -> bool {
        self.next = (self.next + 1) % self.count;
        self.failed_in_round += 1;
        if self.failed_in_round >= self.count {
            self.failed_in_round = 0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug)]
    enum Step {
        Ok,
        Lost,
        /// A failed attempt; `true` if the rotation must say "back off".
        Fail(bool),
    }
    use Step::*;

    #[test]
    fn the_rotation_tries_each_node_in_turn_starting_after_the_lost_one() {
        // (nodes, steps, the node tried before each step and at the end)
        let cases: [(usize, &[Step], &[usize]); 6] = [
            // one node: every failure backs off, and it stays the node
            (1, &[Fail(true), Fail(true), Ok, Lost], &[0, 0, 0, 0, 0]),
            // starts at the first node of the config
            (3, &[Ok], &[0, 0]),
            // losing node 0 goes to node 1 first, not back to node 0
            (3, &[Ok, Lost, Ok], &[0, 0, 1, 1]),
            // node 1 does not answer: node 2 is tried at once, no backoff
            (3, &[Ok, Lost, Fail(false), Ok], &[0, 0, 1, 2, 2]),
            // all three refuse: back off after the third, then go round again
            (
                3,
                &[Fail(false), Fail(false), Fail(true), Fail(false)],
                &[0, 1, 2, 0, 1],
            ),
            // a connection in between starts a new round of failures
            (
                2,
                &[Fail(false), Ok, Lost, Fail(false), Fail(true)],
                &[0, 1, 1, 0, 1, 0],
            ),
        ];
        for (count, steps, nodes) in cases {
            let mut r = Rotation::new(count);
            for (i, step) in steps.iter().enumerate() {
                assert_eq!(
                    r.node(),
                    nodes[i],
                    "{count} nodes, before step {i} {step:?}"
                );
                match *step {
                    Ok => r.connected(),
                    Lost => r.lost(),
                    Fail(back_off) => {
                        assert_eq!(r.failed(), back_off, "{count} nodes, step {i}")
                    }
                }
            }
            assert_eq!(r.node(), nodes[steps.len()], "{count} nodes, at the end");
        }
    }
}
