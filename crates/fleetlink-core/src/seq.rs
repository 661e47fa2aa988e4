//! Per-device telemetry sequence numbers: exactly-once storage from at-least-once delivery.
//!
//! A device numbers its batches 1, 2, 3, ... across connections. The server accepts a batch whose
//! number is above every batch it accepted before, drops one at or below that (a resend after a
//! reconnect), and refuses one that is not above the previous batch *of the same session*: on a
//! reliable ordered stream that can only be a broken client.

/// What to do with an offered batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// New: store it.
    Accept,
    /// Already accepted before (a resend): drop it, it is or will be acked.
    Duplicate,
}

/// A batch number that does not increase within a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "batch sequence {seq} is not above the previous batch {previous} on this stream; sequence numbers must increase"
)]
pub struct SeqRegression {
    /// The offered number.
    pub seq: u64,
    /// The previous number in this session.
    pub previous: u64,
}

/// The sequence state of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqWindow {
    accepted: u64,
    durable: u64,
    session_last: Option<u64>,
}

impl SeqWindow {
    /// A window whose highest durably stored batch is `durable` (0 = none).
    pub fn new(durable: u64) -> Self {
        Self {
            accepted: durable,
            durable,
            session_last: None,
        }
    }

    /// A new session starts: the in-session ordering check starts over.
    pub fn start_session(&mut self) {
        self.session_last = None;
    }

    /// Classifies an incoming batch number without recording it (see [`SeqWindow::offer`]).
    pub fn classify(&self, seq: u64) -> Result<SeqVerdict, SeqRegression> {
        if let Some(previous) = self.session_last
            && seq <= previous
        {
            return Err(SeqRegression { seq, previous });
        }
        Ok(if seq <= self.accepted {
            SeqVerdict::Duplicate
        } else {
            SeqVerdict::Accept
        })
    }

    /// Classifies an incoming batch number and records it.
    pub fn offer(&mut self, seq: u64) -> Result<SeqVerdict, SeqRegression> {
        let verdict = self.classify(seq)?;
        self.session_last = Some(seq);
        if verdict == SeqVerdict::Accept {
            self.accepted = seq;
        }
        Ok(verdict)
    }

    /// Storage reports every batch up to `seq` durable.
    pub fn mark_durable(&mut self, seq: u64) {
        self.durable = self.durable.max(seq);
        self.accepted = self.accepted.max(self.durable);
    }

    /// Storage failed: batches accepted but not durable must be accepted again when resent.
    pub fn rollback_to_durable(&mut self) {
        self.accepted = self.durable;
        self.session_last = None;
    }

    /// Highest batch handed to storage.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// Highest batch durably stored.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// Whether batches are handed to storage but not yet durable.
    pub fn in_flight(&self) -> bool {
        self.accepted > self.durable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn regression_within_a_session_is_an_error() {
        let mut w = SeqWindow::new(0);
        assert_eq!(w.offer(1), Ok(SeqVerdict::Accept));
        assert_eq!(w.offer(2), Ok(SeqVerdict::Accept));
        assert_eq!(
            w.offer(2),
            Err(SeqRegression {
                seq: 2,
                previous: 2
            })
        );
        assert_eq!(
            w.offer(1),
            Err(SeqRegression {
                seq: 1,
                previous: 2
            })
        );
    }

    #[test]
    fn resend_after_reconnect_is_a_duplicate_not_an_error() {
        let mut w = SeqWindow::new(5);
        w.start_session();
        assert_eq!(w.offer(4), Ok(SeqVerdict::Duplicate));
        assert_eq!(w.offer(5), Ok(SeqVerdict::Duplicate));
        assert_eq!(w.offer(6), Ok(SeqVerdict::Accept));
    }

    #[test]
    fn rollback_accepts_the_resend_of_what_was_lost() {
        let mut w = SeqWindow::new(0);
        w.offer(1).unwrap();
        w.offer(2).unwrap();
        w.mark_durable(1);
        w.rollback_to_durable();
        w.start_session();
        assert_eq!(w.offer(2), Ok(SeqVerdict::Accept));
    }

    proptest! {
        /// A device that resends, after each reconnect, every batch above the durable watermark (and,
        /// sometimes, a few below it) gets every batch number accepted exactly once.
        #[test]
        fn every_batch_is_accepted_exactly_once(
            sessions in proptest::collection::vec((0u64..4, 1u64..8, 0u64..6), 1..20)
        ) {
            let mut w = SeqWindow::new(0);
            let mut accepted = BTreeSet::new();
            let mut next = 1u64;
            for (rewind, sent, made_durable) in sessions {
                w.start_session();
                // the device resends from a little below the watermark it was told
                let from = (w.durable() + 1).saturating_sub(rewind).max(1);
                for seq in from..next + sent {
                    match w.offer(seq).unwrap() {
                        SeqVerdict::Accept => prop_assert!(accepted.insert(seq), "accepted {} twice", seq),
                        SeqVerdict::Duplicate => prop_assert!(accepted.contains(&seq)),
                    }
                }
                next += sent;
                let durable = (w.durable() + made_durable).min(w.accepted());
                w.mark_durable(durable);
            }
            prop_assert_eq!(accepted.len() as u64, next - 1);
            prop_assert_eq!(accepted.iter().copied().collect::<Vec<_>>(), (1..next).collect::<Vec<_>>());
        }
    }
}
