//! A device session's queue of frames for its control stream (the session's own answers and what
//! the bridge hands over) and the slot of its latest twin delta ([`latest`]), both written by the
//! session's writer.
//!
//! A bounded queue with one receiver, like tokio's `mpsc::channel`, but small: every connected
//! device holds one, and tokio's channel allocates ~800 bytes up front (its shared state is
//! cache-padded to 512 bytes, and its first block has 32 slots). This one is a mutex-guarded
//! `VecDeque` and two `Notify`s, ~150 bytes, with room allocated as frames arrive.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use fleetlink_proto::v1::{ServerControl, TwinDelta};
use tokio::sync::Notify;
pub(crate) use tokio::sync::mpsc::error::TrySendError;

type Frame = Box<ServerControl>;

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the receiver: a frame was queued, or the last sender is gone.
    filled: Notify,
    /// Wakes a sender waiting for room: a frame was taken, or the receiver is gone.
    drained: Notify,
}

#[derive(Debug)]
struct State {
    frames: VecDeque<Frame>,
    capacity: usize,
    senders: usize,
    receiver: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

// The register-check-wait loops below (and `actor::DurableWatch`'s) are written out on purpose:
// a shared generic helper made the session writer's select! state 72 bytes larger, which took
// each connected device's task from 1,280 to 1,408 bytes (`-Zprint-type-sizes`).

/// Locks `m`. Nothing here panics while holding a lock, so a poisoned one still holds
/// consistent state.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A queue of at most `capacity` frames.
pub(crate) fn channel(capacity: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            frames: VecDeque::new(),
            capacity: capacity.max(1),
            senders: 1,
            receiver: true,
        }),
        filled: Notify::new(),
        drained: Notify::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

/// Queues frames; the queue closes once every sender is dropped (and it is drained).
#[derive(Debug)]
pub(crate) struct Sender(Arc<Shared>);

impl Sender {
    /// Queues `frame` if there is room and the receiver is still there.
    pub(crate) fn try_send(&self, frame: Frame) -> Result<(), TrySendError<Frame>> {
        let mut s = self.0.lock();
        if !s.receiver {
            return Err(TrySendError::Closed(frame));
        }
        if s.frames.len() >= s.capacity {
            return Err(TrySendError::Full(frame));
        }
        s.frames.push_back(frame);
        drop(s);
        // one receiver: a permit is kept if it is not waiting yet
        self.0.filled.notify_one();
        Ok(())
    }

    /// Queues `frame`, waiting for room; gives it back if the receiver is gone.
    pub(crate) async fn send(&self, mut frame: Frame) -> Result<(), Frame> {
        loop {
            let drained = self.0.drained.notified();
            tokio::pin!(drained);
            // registered before the check, so that room made after it wakes us
            drained.as_mut().enable();
            match self.try_send(frame) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(f)) => return Err(f),
                Err(TrySendError::Full(f)) => frame = f,
            }
            drained.await;
        }
    }
}

impl Clone for Sender {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.senders -= 1;
        let last = s.senders == 0;
        drop(s);
        if last {
            self.0.filled.notify_one();
        }
    }
}

/// Takes frames in the order they were queued.
#[derive(Debug)]
pub(crate) struct Receiver(Arc<Shared>);

impl Receiver {
    /// The next frame; `None` once every sender is gone and the queue is empty. Cancel safe: a
    /// frame is taken only by the call that returns it.
    pub(crate) async fn recv(&mut self) -> Option<Frame> {
        loop {
            let filled = self.0.filled.notified();
            {
                let mut s = self.0.lock();
                if let Some(frame) = s.frames.pop_front() {
                    if s.frames.is_empty() && s.frames.capacity() > 32 {
                        // a burst is over: give its room back
                        s.frames.shrink_to_fit();
                    }
                    drop(s);
                    self.0.drained.notify_one();
                    return Some(frame);
                }
                if s.senders == 0 {
                    return None;
                }
            }
            // Senders notify after queueing, and a notification without a waiter is kept: one
            // that comes between the check above and this wait is not lost.
            filled.await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.receiver = false;
        s.frames = VecDeque::new();
        drop(s);
        self.0.drained.notify_waiters();
    }
}

/// The latest twin delta for a session's control stream: the actor replaces it, the session's
/// writer sends each one it sees. A delta replaced before the writer got to it is not sent: the
/// next one carries the whole desired state. A mutex and a `Notify` (~100 bytes), where a tokio
/// `watch` channel is ~390 bytes per connected device.
#[derive(Debug, Default)]
struct Latest {
    /// (version, delta): the version counts replacements.
    slot: Mutex<(u64, Option<TwinDelta>)>,
    changed: Notify,
}

/// A delta slot: the actor's end and the session's.
pub(crate) fn latest() -> (DeltaSender, DeltaReceiver) {
    let shared = Arc::new(Latest::default());
    (
        DeltaSender(shared.clone()),
        DeltaReceiver { shared, seen: 0 },
    )
}

/// Replaces the latest delta.
#[derive(Debug)]
pub(crate) struct DeltaSender(Arc<Latest>);

impl DeltaSender {
    pub(crate) fn send_replace(&self, delta: TwinDelta) {
        let mut slot = lock(&self.0.slot);
        slot.0 += 1;
        slot.1 = Some(delta);
        drop(slot);
        self.0.changed.notify_waiters();
    }
}

/// Waits for deltas it has not seen.
#[derive(Debug)]
pub(crate) struct DeltaReceiver {
    shared: Arc<Latest>,
    seen: u64,
}

impl DeltaReceiver {
    /// The latest delta, once there is one this receiver has not returned yet. Cancel safe.
    pub(crate) async fn changed(&mut self) -> TwinDelta {
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            // registered before the check: a replacement after it wakes us
            changed.as_mut().enable();
            {
                let slot = lock(&self.shared.slot);
                if slot.0 > self.seen
                    && let Some(delta) = &slot.1
                {
                    self.seen = slot.0;
                    return delta.clone();
                }
            }
            changed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlink_proto::v1::{Heartbeat, server_control};
    use std::time::Duration;

    fn frame(n: i64) -> Frame {
        Box::new(ServerControl {
            msg: Some(server_control::Msg::Heartbeat(Heartbeat {
                time_us: n,
                ..Default::default()
            })),
        })
    }

    fn number(f: &Frame) -> i64 {
        match &f.msg {
            Some(server_control::Msg::Heartbeat(h)) => h.time_us,
            other => panic!("not a test frame: {other:?}"),
        }
    }

    #[tokio::test]
    async fn frames_come_out_in_order_and_a_full_queue_refuses() {
        let (tx, mut rx) = channel(3);
        let other = tx.clone();
        tx.try_send(frame(1)).unwrap();
        other.try_send(frame(2)).unwrap();
        tx.send(frame(3)).await.unwrap();
        match tx.try_send(frame(4)) {
            Err(TrySendError::Full(f)) => assert_eq!(number(&f), 4),
            other => panic!("expected Full, got {other:?}"),
        }
        for n in 1..=3 {
            assert_eq!(number(&rx.recv().await.unwrap()), n);
        }
        tx.try_send(frame(5)).unwrap();
        assert_eq!(number(&rx.recv().await.unwrap()), 5);
    }

    #[tokio::test]
    async fn the_queue_ends_once_every_sender_is_gone_and_it_is_drained() {
        let (tx, mut rx) = channel(8);
        let other = tx.clone();
        tx.try_send(frame(1)).unwrap();
        drop(tx);
        other.try_send(frame(2)).unwrap();
        let waiting = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(f) = rx.recv().await {
                got.push(number(&f));
            }
            got
        });
        drop(other);
        assert_eq!(waiting.await.unwrap(), vec![1, 2]);
    }

    #[tokio::test]
    async fn a_waiting_sender_gets_room_or_its_frame_back() {
        let (tx, mut rx) = channel(1);
        tx.try_send(frame(1)).unwrap();
        let tx2 = tx.clone();
        let blocked = tokio::spawn(async move { tx2.send(frame(2)).await.map_err(|f| number(&f)) });
        // the sender waits until the receiver takes the first frame
        assert_eq!(number(&rx.recv().await.unwrap()), 1);
        blocked.await.unwrap().unwrap();
        assert_eq!(number(&rx.recv().await.unwrap()), 2);

        tx.try_send(frame(3)).unwrap();
        let tx3 = tx.clone();
        let blocked = tokio::spawn(async move { tx3.send(frame(4)).await.map_err(|f| number(&f)) });
        // (one thread) the sender runs, finds the queue full and waits; then its receiver goes
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished(), "the sender should wait for room");
        drop(rx);
        assert_eq!(blocked.await.unwrap(), Err(4));
        assert!(matches!(
            tx.try_send(frame(5)),
            Err(TrySendError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn a_cancelled_receive_loses_no_frame_and_no_wake_up() {
        let (tx, mut rx) = channel(8);
        // a receive abandoned while waiting (as a select! branch that lost)
        let abandoned = tokio::time::timeout(Duration::from_millis(1), rx.recv()).await;
        assert!(abandoned.is_err());
        let sender = tokio::spawn(async move {
            tx.try_send(frame(7)).unwrap();
            tx
        });
        let got = rx.recv().await.unwrap();
        assert_eq!(number(&got), 7);
        drop(sender.await.unwrap());
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_delta_receiver_gets_the_latest_it_has_not_seen() {
        let delta = |v: u64| TwinDelta {
            desired_version: v,
            ..Default::default()
        };
        let (tx, mut rx) = latest();
        // nothing yet: a wait (abandoned, as a select! branch that lost) does not complete
        let abandoned = tokio::time::timeout(Duration::from_millis(1), rx.changed()).await;
        assert!(abandoned.is_err());
        tx.send_replace(delta(1));
        tx.send_replace(delta(2));
        assert_eq!(rx.changed().await.desired_version, 2);
        // seen: the next wait is for a newer one, from another task
        let waiter = tokio::spawn(async move { rx.changed().await.desired_version });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "delta 2 was seen already");
        tx.send_replace(delta(3));
        assert_eq!(waiter.await.unwrap(), 3);
    }
}
