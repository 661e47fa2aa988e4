//! Commands sent to devices: the state machine every command follows, and the per-device outbox
//! that decides which commands to write to the device and when.

use crate::TimeUs;

/// Where a command is in its life. Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandState {
    /// Accepted, not yet written to the device.
    Queued,
    /// Written to the device, no result yet.
    Delivered,
    /// The device's handler returned a result.
    Succeeded,
    /// The device's handler returned an error.
    Failed,
    /// Its deadline passed before a result arrived.
    Expired,
    /// The device (or the server, before delivery) refused it.
    Rejected,
    /// An operator cancelled it.
    Cancelled,
}

impl CommandState {
    /// Every state, in the order of the enum.
    pub const ALL: [CommandState; 7] = [
        CommandState::Queued,
        CommandState::Delivered,
        CommandState::Succeeded,
        CommandState::Failed,
        CommandState::Expired,
        CommandState::Rejected,
        CommandState::Cancelled,
    ];

    /// Whether the command is finished: no event changes a terminal state.
    pub fn is_terminal(self) -> bool {
        !matches!(self, CommandState::Queued | CommandState::Delivered)
    }

    /// Lower-case name for storage, logs and APIs.
    pub fn name(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Delivered => "delivered",
            CommandState::Succeeded => "succeeded",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
            CommandState::Rejected => "rejected",
            CommandState::Cancelled => "cancelled",
        }
    }

    /// Inverse of [`CommandState::name`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.name() == s)
    }
}

/// What can happen to a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandEvent {
    /// Written to the device's command stream (again, after a reconnect or a restart: redelivery).
    Deliver,
    /// The device's handler returned a result.
    Succeed,
    /// The device's handler returned an error.
    Fail,
    /// The device refused it (no handler for that name, invalid arguments, busy), or the server
    /// did before delivery (policy).
    Reject,
    /// Its deadline passed before a result arrived.
    Expire,
    /// An operator cancelled it.
    Cancel,
}

impl CommandEvent {
    /// Every event, in the order of the enum.
    pub const ALL: [CommandEvent; 6] = [
        CommandEvent::Deliver,
        CommandEvent::Succeed,
        CommandEvent::Fail,
        CommandEvent::Reject,
        CommandEvent::Expire,
        CommandEvent::Cancel,
    ];

    /// The past tense, for messages: "delivered", "succeeded", ...
    pub fn past_tense(self) -> &'static str {
        match self {
            CommandEvent::Deliver => "delivered",
            CommandEvent::Succeed => "succeeded",
            CommandEvent::Fail => "failed",
            CommandEvent::Reject => "rejected",
            CommandEvent::Expire => "expired",
            CommandEvent::Cancel => "cancelled",
        }
    }

    /// "cannot {this}": the event as a verb phrase for [`InvalidTransition`]'s message.
    fn cannot(self) -> &'static str {
        match self {
            CommandEvent::Deliver => "be delivered",
            CommandEvent::Succeed => "succeed",
            CommandEvent::Fail => "fail",
            CommandEvent::Reject => "be rejected",
            CommandEvent::Expire => "expire",
            CommandEvent::Cancel => "be cancelled",
        }
    }
}

/// An event that the command's state does not allow, e.g. "a succeeded command cannot be
/// cancelled".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe(*from, *event))]
pub struct InvalidTransition {
    /// The command's state.
    pub from: CommandState,
    /// What was refused.
    pub event: CommandEvent,
}

fn describe(from: CommandState, event: CommandEvent) -> String {
    let article = if from.name().starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    let why = match (from, event) {
        (CommandState::Queued, CommandEvent::Succeed | CommandEvent::Fail) => {
            ": it was never delivered to the device"
        }
        _ => "",
    };
    format!(
        "{article} {} command cannot {}{why}",
        from.name(),
        event.cannot()
    )
}

/// The one rule for every state change.
///
/// Queued commands can be delivered, expire, be cancelled or be rejected (by the server, e.g. by
/// policy). Delivered commands can be delivered again (redelivery), succeed, fail, be rejected
/// (by the device), expire or be cancelled. Terminal states allow nothing.
pub fn transition(
    from: CommandState,
    event: CommandEvent,
) -> Result<CommandState, InvalidTransition> {
    use CommandEvent as E;
    use CommandState as S;
    Ok(match (from, event) {
        (S::Queued | S::Delivered, E::Deliver) => S::Delivered,
        (S::Delivered, E::Succeed) => S::Succeeded,
        (S::Delivered, E::Fail) => S::Failed,
        (S::Queued | S::Delivered, E::Reject) => S::Rejected,
        (S::Queued | S::Delivered, E::Expire) => S::Expired,
        (S::Queued | S::Delivered, E::Cancel) => S::Cancelled,
        _ => return Err(InvalidTransition { from, event }),
    })
}

/// Identifies a command; ids grow in creation order.
pub type CommandId = u64;

/// One unfinished command in a [`CommandOutbox`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The command.
    pub id: CommandId,
    /// Dispatched as soon as queued, next to anything else (instead of one at a time).
    pub concurrent: bool,
    /// When it expires.
    pub deadline_us: TimeUs,
    /// Written to the device on the current connection, no result yet.
    pub in_flight: bool,
}

/// Limits on a device's queue of unfinished commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Most unfinished commands per device.
    pub max_pending: usize,
    /// Longest allowed `deadline - now`, in microseconds.
    pub max_deadline_us: i64,
}

/// Why a new command was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboxError {
    /// The device already has as many unfinished commands as allowed.
    #[error(
        "device has {pending} unfinished commands, the limit is {max}; wait for some to finish or raise commands.max_pending_per_device"
    )]
    Full {
        /// Unfinished commands now.
        pending: usize,
        /// The limit.
        max: usize,
    },
    /// The deadline is further away than allowed.
    #[error("deadline is {asked_s} s away, the maximum is {max_s} s (commands.max_deadline_s)")]
    DeadlineTooFar {
        /// How far away the deadline is, in seconds (rounded up).
        asked_s: u64,
        /// The limit, in seconds (rounded down).
        max_s: u64,
    },
    /// The deadline is now or earlier.
    #[error("deadline is in the past")]
    DeadlineInPast,
}

/// Unfinished commands of one device, oldest first. Serial commands (the default) run one at a
/// time in creation order; concurrent commands are dispatched as soon as they are queued.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandOutbox {
    /// Sorted by id.
    entries: Vec<OutboxEntry>,
}

impl CommandOutbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks limits for a new command at `now_us` (before it is stored). A deadline at `now_us`
    /// counts as in the past.
    pub fn admit(
        &self,
        deadline_us: TimeUs,
        now_us: TimeUs,
        limits: &OutboxLimits,
    ) -> Result<(), OutboxError> {
        let away_us = deadline_us.saturating_sub(now_us);
        if away_us <= 0 {
            return Err(OutboxError::DeadlineInPast);
        }
        if away_us > limits.max_deadline_us {
            const US_PER_S: u64 = 1_000_000;
            let away_us = away_us.unsigned_abs();
            return Err(OutboxError::DeadlineTooFar {
                asked_s: away_us.div_ceil(US_PER_S),
                max_s: u64::try_from(limits.max_deadline_us).unwrap_or(0) / US_PER_S,
            });
        }
        if self.entries.len() >= limits.max_pending {
            return Err(OutboxError::Full {
                pending: self.entries.len(),
                max: limits.max_pending,
            });
        }
        Ok(())
    }

    /// Adds a command (new, or loaded from storage), not in flight. Keeps creation order by id
    /// (ids grow; an older id loaded late is put in its place). An id already present is ignored.
    pub fn push(&mut self, id: CommandId, concurrent: bool, deadline_us: TimeUs) {
        let entry = OutboxEntry {
            id,
            concurrent,
            deadline_us,
            in_flight: false,
        };
        match self.entries.last() {
            None => self.entries.push(entry),
            Some(last) if last.id < id => self.entries.push(entry),
            Some(_) => {
                if let Err(at) = self.entries.binary_search_by_key(&id, |e| e.id) {
                    self.entries.insert(at, entry);
                }
            }
        }
    }

    /// Commands to write to the device now, in id order; marks them in flight. That is every
    /// concurrent command not in flight, and the oldest serial command if no serial command is in
    /// flight. Never returns a command whose deadline <= `now_us`: an expired serial command
    /// does not hold up the ones behind it (call [`CommandOutbox::take_expired`] to finish it).
    pub fn dispatch(&mut self, now_us: TimeUs) -> Vec<CommandId> {
        let mut serial_busy = self.entries.iter().any(|e| e.in_flight && !e.concurrent);
        let mut out = Vec::new();
        for entry in &mut self.entries {
            if entry.in_flight || entry.deadline_us <= now_us {
                continue;
            }
            if !entry.concurrent {
                if serial_busy {
                    continue;
                }
                serial_busy = true;
            }
            entry.in_flight = true;
            out.push(entry.id);
        }
        out
    }

    /// The connection is gone: nothing is in flight any more (they will be redelivered).
    pub fn connection_lost(&mut self) {
        for entry in &mut self.entries {
            entry.in_flight = false;
        }
    }

    /// The command reached a terminal state: forget it. Returns whether it was there.
    pub fn remove(&mut self, id: CommandId) -> bool {
        match self.entries.binary_search_by_key(&id, |e| e.id) {
            Ok(at) => {
                self.entries.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    /// Removes and returns the commands whose deadline <= `now_us`, in id order.
    pub fn take_expired(&mut self, now_us: TimeUs) -> Vec<CommandId> {
        let mut expired = Vec::new();
        self.entries.retain(|e| {
            let keep = e.deadline_us > now_us;
            if !keep {
                expired.push(e.id);
            }
            keep
        });
        expired
    }

    /// Earliest deadline, for a timer.
    pub fn next_deadline(&self) -> Option<TimeUs> {
        self.entries.iter().map(|e| e.deadline_us).min()
    }

    /// Number of unfinished commands.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no unfinished commands.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the command is here (unfinished).
    pub fn contains(&self, id: CommandId) -> bool {
        self.get(id).is_some()
    }

    /// The entry of a command.
    pub fn get(&self, id: CommandId) -> Option<&OutboxEntry> {
        let at = self.entries.binary_search_by_key(&id, |e| e.id).ok()?;
        self.entries.get(at)
    }

    /// Every unfinished command, oldest first.
    pub fn entries(&self) -> &[OutboxEntry] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CommandEvent as E;
    use CommandState as S;
    use proptest::prelude::*;

    /// Every allowed transition, written out independently of `transition`.
    const ALLOWED: &[(CommandState, CommandEvent, CommandState)] = &[
        (S::Queued, E::Deliver, S::Delivered),
        (S::Queued, E::Expire, S::Expired),
        (S::Queued, E::Cancel, S::Cancelled),
        (S::Queued, E::Reject, S::Rejected),
        (S::Delivered, E::Deliver, S::Delivered),
        (S::Delivered, E::Succeed, S::Succeeded),
        (S::Delivered, E::Fail, S::Failed),
        (S::Delivered, E::Reject, S::Rejected),
        (S::Delivered, E::Expire, S::Expired),
        (S::Delivered, E::Cancel, S::Cancelled),
    ];

    fn expected(from: CommandState, event: CommandEvent) -> Option<CommandState> {
        ALLOWED
            .iter()
            .find(|(f, e, _)| *f == from && *e == event)
            .map(|(_, _, to)| *to)
    }

    #[test]
    fn names_round_trip() {
        for state in CommandState::ALL {
            assert_eq!(CommandState::parse(state.name()), Some(state));
        }
        assert_eq!(CommandState::parse("Queued"), None);
        assert_eq!(CommandState::parse(""), None);
        let terminal: Vec<_> = CommandState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                S::Succeeded,
                S::Failed,
                S::Expired,
                S::Rejected,
                S::Cancelled
            ]
        );
    }

    #[test]
    fn transition_matches_the_table() {
        for from in CommandState::ALL {
            for event in CommandEvent::ALL {
                assert_eq!(
                    transition(from, event).ok(),
                    expected(from, event),
                    "{from:?} {event:?}"
                );
            }
        }
    }

    #[test]
    fn invalid_transitions_say_what_was_refused() {
        let message = |from, event| transition(from, event).unwrap_err().to_string();
        assert_eq!(
            message(S::Succeeded, E::Cancel),
            "a succeeded command cannot be cancelled"
        );
        assert_eq!(
            message(S::Expired, E::Deliver),
            "an expired command cannot be delivered"
        );
        assert_eq!(
            message(S::Queued, E::Succeed),
            "a queued command cannot succeed: it was never delivered to the device"
        );
        assert_eq!(E::Cancel.past_tense(), "cancelled");
    }

    fn limits() -> OutboxLimits {
        OutboxLimits {
            max_pending: 2,
            max_deadline_us: 3_600_000_000,
        }
    }

    #[test]
    fn admit_checks_deadline_and_room() {
        let mut outbox = CommandOutbox::new();
        let now = 1_000_000;
        assert_eq!(outbox.admit(now + 1, now, &limits()), Ok(()));
        assert_eq!(
            outbox.admit(now, now, &limits()),
            Err(OutboxError::DeadlineInPast)
        );
        assert_eq!(
            outbox.admit(now - 5, now, &limits()),
            Err(OutboxError::DeadlineInPast)
        );
        assert_eq!(outbox.admit(now + 3_600_000_000, now, &limits()), Ok(()));
        let err = outbox
            .admit(now + 3_600_000_001, now, &limits())
            .unwrap_err();
        assert_eq!(
            err,
            OutboxError::DeadlineTooFar {
                asked_s: 3601,
                max_s: 3600
            }
        );
        assert_eq!(
            err.to_string(),
            "deadline is 3601 s away, the maximum is 3600 s (commands.max_deadline_s)"
        );
        assert_eq!(
            outbox.admit(i64::MAX, i64::MIN, &limits()),
            Err(OutboxError::DeadlineTooFar {
                asked_s: (i64::MAX as u64).div_ceil(1_000_000),
                max_s: 3600
            })
        );
        outbox.push(1, false, now + 10);
        outbox.push(2, true, now + 10);
        let err = outbox.admit(now + 1, now, &limits()).unwrap_err();
        assert_eq!(err, OutboxError::Full { pending: 2, max: 2 });
        assert!(err.to_string().contains("commands.max_pending_per_device"));
    }

    #[test]
    fn serial_commands_run_one_at_a_time_and_are_redelivered() {
        let mut outbox = CommandOutbox::new();
        outbox.push(1, false, 100);
        outbox.push(2, false, 100);
        outbox.push(3, true, 100);
        assert_eq!(outbox.dispatch(0), [1, 3]);
        assert_eq!(outbox.dispatch(0), Vec::<CommandId>::new());
        outbox.connection_lost();
        assert_eq!(outbox.dispatch(0), [1, 3]);
        assert!(outbox.remove(1));
        assert!(!outbox.remove(1));
        assert_eq!(outbox.dispatch(0), [2]);
        assert_eq!(outbox.next_deadline(), Some(100));
        assert_eq!(outbox.take_expired(100), [2, 3]);
        assert!(outbox.is_empty());
    }

    #[test]
    fn push_keeps_id_order_and_ignores_duplicates() {
        let mut outbox = CommandOutbox::new();
        outbox.push(5, false, 100);
        outbox.push(2, false, 50);
        outbox.push(5, true, 10);
        outbox.push(9, false, 100);
        let ids: Vec<_> = outbox.entries().iter().map(|e| e.id).collect();
        assert_eq!(ids, [2, 5, 9]);
        assert_eq!(outbox.get(5).map(|e| e.concurrent), Some(false));
        assert_eq!(outbox.len(), 3);
        assert!(outbox.contains(2));
        assert!(!outbox.contains(3));
    }

    #[test]
    fn an_expired_serial_command_does_not_hold_up_the_queue() {
        let mut outbox = CommandOutbox::new();
        outbox.push(1, false, 10);
        outbox.push(2, false, 100);
        assert_eq!(outbox.dispatch(10), [2]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push { concurrent: bool, lifetime: i64 },
        Dispatch,
        Remove(u8),
        ConnectionLost,
        TakeExpired,
        Tick(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (any::<bool>(), 1i64..40).prop_map(|(concurrent, lifetime)| Op::Push { concurrent, lifetime }),
            3 => Just(Op::Dispatch),
            2 => any::<u8>().prop_map(Op::Remove),
            1 => Just(Op::ConnectionLost),
            1 => Just(Op::TakeExpired),
            2 => (0i64..15).prop_map(Op::Tick),
        ]
    }

    proptest! {
        /// From any state, any events: a terminal state never changes, and every step agrees with
        /// the table.
        #[test]
        fn terminal_states_are_final(
            start in proptest::sample::select(CommandState::ALL.to_vec()),
            events in proptest::collection::vec(proptest::sample::select(CommandEvent::ALL.to_vec()), 0..20),
        ) {
            let mut state = start;
            for event in events {
                let result = transition(state, event);
                prop_assert_eq!(result.as_ref().ok().copied(), expected(state, event));
                match result {
                    Ok(next) => {
                        prop_assert!(!state.is_terminal());
                        state = next;
                    }
                    Err(e) => prop_assert_eq!(e, InvalidTransition { from: state, event }),
                }
            }
        }

        /// Under any sequence of operations: at most one serial command is in flight; the serial
        /// command dispatched is the oldest unexpired serial one; dispatch never returns an expired
        /// or in-flight command, and does return every unexpired concurrent one; after a lost
        /// connection the oldest unexpired serial command goes out again.
        #[test]
        fn outbox_dispatches_in_order(ops in proptest::collection::vec(op(), 0..80)) {
            let mut outbox = CommandOutbox::new();
            let mut now: TimeUs = 0;
            let mut next_id: CommandId = 1;
            for op in ops {
                match op {
                    Op::Push { concurrent, lifetime } => {
                        outbox.push(next_id, concurrent, now + lifetime);
                        next_id += 1;
                    }
                    Op::Dispatch => {
                        check_dispatch(&mut outbox, now)?;
                    }
                    Op::Remove(pick) => {
                        let ids: Vec<_> = outbox.entries().iter().map(|e| e.id).collect();
                        if !ids.is_empty() {
                            let id = ids[usize::from(pick) % ids.len()];
                            prop_assert!(outbox.remove(id));
                            prop_assert!(!outbox.contains(id));
                        }
                    }
                    Op::ConnectionLost => {
                        outbox.connection_lost();
                        let oldest_serial = outbox
                            .entries()
                            .iter()
                            .find(|e| !e.concurrent && e.deadline_us > now)
                            .map(|e| e.id);
                        let sent = check_dispatch(&mut outbox, now)?;
                        if let Some(id) = oldest_serial {
                            prop_assert!(sent.contains(&id), "{} not redelivered", id);
                        }
                    }
                    Op::TakeExpired => {
                        let before = outbox.clone();
                        let expired = outbox.take_expired(now);
                        for e in before.entries() {
                            prop_assert_eq!(expired.contains(&e.id), e.deadline_us <= now);
                            prop_assert_eq!(outbox.contains(e.id), e.deadline_us > now);
                        }
                        prop_assert!(outbox.next_deadline().is_none_or(|d| d > now));
                    }
                    Op::Tick(dt) => now += dt,
                }
                let serial_in_flight = outbox.entries().iter().filter(|e| e.in_flight && !e.concurrent).count();
                prop_assert!(serial_in_flight <= 1);
                prop_assert!(outbox.entries().windows(2).all(|w| w[0].id < w[1].id));
                prop_assert_eq!(outbox.next_deadline(), outbox.entries().iter().map(|e| e.deadline_us).min());
            }
        }
    }

    /// Dispatches and checks the result against the outbox before.
    fn check_dispatch(
        outbox: &mut CommandOutbox,
        now: TimeUs,
    ) -> Result<Vec<CommandId>, TestCaseError> {
        let before = outbox.clone();
        let sent = outbox.dispatch(now);
        for id in &sent {
            let entry = before.get(*id);
            prop_assert!(entry.is_some());
            let entry = entry.unwrap();
            prop_assert!(!entry.in_flight, "{} was already in flight", id);
            prop_assert!(entry.deadline_us > now, "{} has expired", id);
            prop_assert!(outbox.get(*id).is_some_and(|e| e.in_flight));
        }
        let live = |e: &&OutboxEntry| e.deadline_us > now && !e.in_flight;
        for e in before
            .entries()
            .iter()
            .filter(live)
            .filter(|e| e.concurrent)
        {
            prop_assert!(sent.contains(&e.id), "concurrent {} not dispatched", e.id);
        }
        let serial_busy = before
            .entries()
            .iter()
            .any(|e| e.in_flight && !e.concurrent);
        let serial_sent: Vec<_> = sent
            .iter()
            .filter(|id| before.get(**id).is_some_and(|e| !e.concurrent))
            .collect();
        let oldest_serial = before
            .entries()
            .iter()
            .find(|e| !e.concurrent && e.deadline_us > now)
            .map(|e| e.id);
        if serial_busy {
            prop_assert!(serial_sent.is_empty());
        } else {
            prop_assert_eq!(serial_sent.first().map(|id| **id), oldest_serial);
            prop_assert!(serial_sent.len() <= 1);
        }
        Ok(sent)
    }
}
