//! Admission of connection attempts in a reconnect storm.
//!
//! At most `max_handshakes` QUIC handshakes run at once (each holds a [`HandshakePermit`]);
//! further attempts wait, oldest first, in a queue of up to `handshake_queue` attempts for at
//! most `handshake_queue_ms`. An attempt that cannot be queued, or that waited too long to be
//! worth starting (its client is about to give up on it), is refused at once with QUIC's
//! `CONNECTION_REFUSED`, which costs no cryptography, and the client retries after its backoff.
//!
//! Why a queue rather than refusing beyond the limit: a refused client backs off exponentially,
//! so a fleet of 10k refused again and again came back at a fraction of the rate the server can
//! handshake (65 s for 10k devices). A waiting attempt costs the server nothing but its first
//! packet, and the client keeps retransmitting its Initial while it waits, so it starts the moment
//! a permit frees. Why bounded: handshakes that all run at once share the CPU and all finish late,
//! after their clients gave up (with 4096 at once, no device came back for 30 s).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Held for the duration of one QUIC handshake.
pub(crate) type HandshakePermit = OwnedSemaphorePermit;

/// The handshake slots and the queue of attempts waiting for one. Owned by the accept loop.
pub(crate) struct Admission {
    slots: Arc<Semaphore>,
    queue: VecDeque<(Instant, quinn::Incoming)>,
    max_queue: usize,
    max_wait: Duration,
}

impl Admission {
    pub(crate) fn new(max_handshakes: usize, max_queue: usize, max_wait: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_handshakes)),
            queue: VecDeque::new(),
            max_queue,
            max_wait,
        }
    }

    /// A new attempt: returned with its permit if it may start now; otherwise queued, or refused
    /// when the queue is full.
    pub(crate) fn arrive(
        &mut self,
        incoming: quinn::Incoming,
        now: Instant,
    ) -> Option<(quinn::Incoming, HandshakePermit)> {
        if self.queue.is_empty()
            && let Ok(permit) = self.slots.clone().try_acquire_owned()
        {
            return Some((incoming, permit));
        }
        self.expire(now);
        if self.queue.len() < self.max_queue {
            self.queue.push_back((now, incoming));
        } else {
            tracing::debug!(remote = %incoming.remote_address(), "handshake queue full; connection refused");
            incoming.refuse();
        }
        None
    }

    /// Whether attempts are waiting for a permit.
    pub(crate) fn waiting(&self) -> bool {
        !self.queue.is_empty()
    }

    /// When the oldest waiting attempt will have waited too long (then call [`Self::expire`]).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.queue.front().map(|(since, _)| *since + self.max_wait)
    }

    /// The semaphore whose permit the next waiting attempt needs.
    pub(crate) fn slots(&self) -> Arc<Semaphore> {
        self.slots.clone()
    }

    /// The oldest waiting attempt still worth starting, for a permit just acquired.
    pub(crate) fn next(&mut self, now: Instant) -> Option<quinn::Incoming> {
        self.expire(now);
        self.queue.pop_front().map(|(_, incoming)| incoming)
    }

    /// Refuses the attempts that waited `max_wait` (they sit at the front), so their clients retry
    /// at once rather than wait for their own timeout.
    pub(crate) fn expire(&mut self, now: Instant) {
        while let Some((since, _)) = self.queue.front() {
            if now.saturating_duration_since(*since) < self.max_wait {
                break;
            }
            if let Some((_, incoming)) = self.queue.pop_front() {
                tracing::debug!(remote = %incoming.remote_address(), "waited too long for a handshake slot; connection refused");
                incoming.refuse();
            }
        }
    }

    /// Drops every waiting attempt without an answer (the server is stopping): their clients
    /// keep retransmitting, and a server restarted on the same port answers them.
    pub(crate) fn ignore_all(&mut self) {
        for (_, incoming) in self.queue.drain(..) {
            incoming.ignore();
        }
    }
}
