//! Jobs: one command or desired-state change applied to many devices ("targets") at a controlled
//! rate, and aborted when too many of them fail. [`Rollout`] holds the rules; the caller stores
//! the states, sends the commands and runs the timers.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::TimeUs;

/// Length of the window `max_per_minute` counts starts in: a start at `t` counts until
/// `t + WINDOW_US - 1` and no longer at `t + WINDOW_US`.
pub const WINDOW_US: TimeUs = 60_000_000;

/// Where one target (device) of a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetState {
    /// Not started yet.
    Pending,
    /// Started (its command sent or its desired state written), no outcome yet.
    Running,
    /// Ended well.
    Succeeded,
    /// The device reported an error.
    Failed,
    /// No outcome arrived before the deadline.
    Expired,
    /// The device (or the server, e.g. by policy) refused it.
    Rejected,
    /// Cancelled while running (by an operator, or because the job was aborted or cancelled).
    Cancelled,
    /// Never started: the job was aborted or cancelled first.
    Skipped,
}

impl TargetState {
    /// Every state, in the order of the enum.
    pub const ALL: [TargetState; 8] = [
        TargetState::Pending,
        TargetState::Running,
        TargetState::Succeeded,
        TargetState::Failed,
        TargetState::Expired,
        TargetState::Rejected,
        TargetState::Cancelled,
        TargetState::Skipped,
    ];

    /// Lower-case name for storage, logs and APIs.
    pub fn name(self) -> &'static str {
        match self {
            TargetState::Pending => "pending",
            TargetState::Running => "running",
            TargetState::Succeeded => "succeeded",
            TargetState::Failed => "failed",
            TargetState::Expired => "expired",
            TargetState::Rejected => "rejected",
            TargetState::Cancelled => "cancelled",
            TargetState::Skipped => "skipped",
        }
    }

    /// Inverse of [`TargetState::name`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.name() == s)
    }

    /// Whether the target is done: everything but Pending and Running.
    pub fn is_finished(self) -> bool {
        !matches!(self, TargetState::Pending | TargetState::Running)
    }

    /// Counts against the abort rule: Failed, Expired, Rejected.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            TargetState::Failed | TargetState::Expired | TargetState::Rejected
        )
    }

    /// Whether a running target may end in this state (what [`Rollout::finish`] accepts).
    fn is_outcome(self) -> bool {
        self.is_finished() && self != TargetState::Skipped
    }

    /// Position in [`TargetState::ALL`].
    fn index(self) -> usize {
        self as usize
    }
}

/// Where the job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Starting targets and waiting for their outcomes.
    Running,
    /// Every target finished without tripping the abort rule.
    Completed,
    /// Too many targets failed: the rest were skipped.
    Aborted,
    /// An operator cancelled it: the rest were skipped.
    Cancelled,
}

impl JobState {
    /// Every state, in the order of the enum.
    pub const ALL: [JobState; 4] = [
        JobState::Running,
        JobState::Completed,
        JobState::Aborted,
        JobState::Cancelled,
    ];

    /// Lower-case name for storage, logs and APIs.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Aborted => "aborted",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Inverse of [`JobState::name`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.name() == s)
    }

    /// Whether the job is over: no target starts any more. Everything but Running.
    pub fn is_finished(self) -> bool {
        self != JobState::Running
    }
}

/// The rate and the abort rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RolloutLimits {
    /// Targets running at once (>= 1).
    pub max_in_flight: usize,
    /// Targets started in any 60-second window (None = no limit).
    pub max_per_minute: Option<u32>,
    /// Abort when failures / finished > this, once finished >= abort_min_finished (None = never).
    pub abort_failure_ratio: Option<f64>,
    /// Finished targets needed before the abort rule applies, so that one early failure does not
    /// abort a large job.
    pub abort_min_finished: u32,
}

impl RolloutLimits {
    /// Checks the limits: `max_in_flight` at least 1, `abort_failure_ratio` finite in [0, 1),
    /// `max_per_minute` at least 1 when set.
    pub fn validate(&self) -> Result<(), JobError> {
        if self.max_in_flight == 0 {
            return Err(JobError::NoInFlight);
        }
        if let Some(ratio) = self.abort_failure_ratio
            && !(0.0..1.0).contains(&ratio)
        {
            return Err(JobError::BadRatio(ratio));
        }
        if self.max_per_minute == Some(0) {
            return Err(JobError::BadRate);
        }
        Ok(())
    }
}

/// What a job's limits or a target's outcome got wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// `max_in_flight` is 0: nothing would ever start.
    #[error("max_in_flight must be at least 1")]
    NoInFlight,
    /// `abort_failure_ratio` is negative, 1 or more, or not a number.
    #[error("abort_failure_ratio must be at least 0 and below 1, got {0}")]
    BadRatio(f64),
    /// `max_per_minute` is `Some(0)`: nothing would ever start.
    #[error("max_per_minute must be at least 1 (0 = no limit)")]
    BadRate,
    /// The target is not one of the job's.
    #[error("target {0} is not known to this job")]
    UnknownTarget(String),
    /// The target cannot end that way from where it stands: only a running target ends, and
    /// only as succeeded, failed, expired, rejected or cancelled.
    #[error("target {target} is {}: it cannot become {}", from.name(), to.name())]
    BadTransition {
        /// The target.
        target: String,
        /// Its state.
        from: TargetState,
        /// The state asked for.
        to: TargetState,
    },
}

/// One job's progress: which targets are where, what may start now, when it ends.
/// Targets are identified by a String (device id), kept in the order given.
#[derive(Debug, Clone)]
pub struct Rollout {
    limits: RolloutLimits,
    state: JobState,
    /// Target ids in the order given, without duplicates.
    targets: Vec<String>,
    /// `states[i]` is where `targets[i]` stands.
    states: Vec<TargetState>,
    /// Target id to its position.
    index: HashMap<String, usize>,
    /// Targets per state, indexed by [`TargetState::index`].
    counts: [usize; 8],
    /// No Pending target before this position (targets never become Pending again).
    next_pending: usize,
    /// Start times, ascending; only the latest `max_per_minute` are kept (older ones cannot
    /// decide anything), and none when there is no per-minute limit.
    starts: VecDeque<TimeUs>,
    /// Set when this rollout aborted the job.
    abort_reason: Option<String>,
}

impl Rollout {
    /// A new running job over these targets (all Pending). No targets = Completed at once.
    ///
    /// A target given twice is kept once, at its first place. The limits should pass
    /// [`RolloutLimits::validate`] (checked where the job is created, so the user hears about
    /// it); with `max_in_flight` 0 or `max_per_minute` `Some(0)` nothing ever starts.
    pub fn new(targets: Vec<String>, limits: RolloutLimits) -> Self {
        let targets = targets
            .into_iter()
            .map(|target| (target, TargetState::Pending))
            .collect();
        let mut rollout = Self::build(targets, limits, JobState::Running);
        if rollout.is_empty() {
            rollout.state = JobState::Completed;
        }
        rollout
    }

    /// Rebuilds one from stored target states (after a restart): started-times are unknown, so
    /// the per-minute window counts the Running targets as started at `now_us`. State stays as given.
    ///
    /// A target given twice is kept once, with its first state. If the job is finished, Pending
    /// targets become Skipped (the store may have stopped between writing the job's state and
    /// its targets'). A Running job with nothing Pending or Running is Completed (every target
    /// had finished before the job's own state was written). The abort
    /// reason of an aborted job is not known here ([`Rollout::abort_reason`] is None): store it
    /// with the job.
    pub fn restore(
        targets: Vec<(String, TargetState)>,
        limits: RolloutLimits,
        state: JobState,
        now_us: TimeUs,
    ) -> Self {
        let mut rollout = Self::build(targets, limits, state);
        if state.is_finished() {
            rollout.skip_pending();
        } else if rollout.count(TargetState::Pending) == 0
            && rollout.count(TargetState::Running) == 0
        {
            // Every target had finished when the server stopped, before the job was marked.
            rollout.state = JobState::Completed;
        }
        if let Some(max) = limits.max_per_minute {
            let running = rollout.count(TargetState::Running);
            let kept = running.min(usize::try_from(max).unwrap_or(usize::MAX));
            rollout.starts.extend(std::iter::repeat_n(now_us, kept));
        }
        rollout
    }

    fn build(targets: Vec<(String, TargetState)>, limits: RolloutLimits, state: JobState) -> Self {
        let mut rollout = Self {
            limits,
            state,
            targets: Vec::with_capacity(targets.len()),
            states: Vec::with_capacity(targets.len()),
            index: HashMap::with_capacity(targets.len()),
            counts: [0; 8],
            next_pending: 0,
            starts: VecDeque::new(),
            abort_reason: None,
        };
        for (target, target_state) in targets {
            if rollout.index.contains_key(&target) {
                continue;
            }
            rollout.index.insert(target.clone(), rollout.targets.len());
            rollout.targets.push(target);
            rollout.states.push(target_state);
            rollout.counts[target_state.index()] += 1;
        }
        rollout
    }

    /// Where the job stands.
    pub fn state(&self) -> JobState {
        self.state
    }

    /// The rate and the abort rule, as given.
    pub fn limits(&self) -> RolloutLimits {
        self.limits
    }

    /// Targets to start now (marks them Running, records their start time), in target order,
    /// honouring max_in_flight and the 60 s window. Empty unless Running.
    pub fn start(&mut self, now_us: TimeUs) -> Vec<String> {
        if self.state != JobState::Running {
            return Vec::new();
        }
        let in_flight_room = self
            .limits
            .max_in_flight
            .saturating_sub(self.count(TargetState::Running));
        let rate_room = match self.limits.max_per_minute {
            None => usize::MAX,
            Some(max) => usize::try_from(max)
                .unwrap_or(usize::MAX)
                .saturating_sub(self.started_in_window(now_us)),
        };
        let room = in_flight_room.min(rate_room);
        let mut started = Vec::new();
        while started.len() < room {
            let Some(at) = self.next_pending_at() else {
                break;
            };
            self.next_pending = at + 1;
            self.set_state(at, TargetState::Running);
            self.record_start(now_us);
            if let Some(target) = self.targets.get(at) {
                started.push(target.clone());
            }
        }
        started
    }

    /// When the per-minute window next lets a target start (None if nothing is waiting on it:
    /// no pending targets, or the in-flight limit is what blocks).
    ///
    /// `now_us` itself when a target could start right now (call [`Rollout::start`]); None too
    /// when the job is not Running.
    pub fn next_start_at(&self, now_us: TimeUs) -> Option<TimeUs> {
        if self.state != JobState::Running
            || self.count(TargetState::Pending) == 0
            || self.count(TargetState::Running) >= self.limits.max_in_flight
        {
            return None;
        }
        let Some(max) = self.limits.max_per_minute else {
            return Some(now_us);
        };
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let first = self.first_in_window(now_us);
        let in_window = self.starts.len() - first;
        if in_window < max {
            return Some(now_us);
        }
        if max == 0 {
            return None;
        }
        // Room for one more once the oldest `in_window - max + 1` starts have left the window.
        self.starts
            .get(first + in_window - max)
            .map(|start| start.saturating_add(WINDOW_US))
    }

    /// A running target ended (Succeeded, Failed, Expired, Rejected or Cancelled). Applies the
    /// abort rule (then: state Aborted, every Pending target becomes Skipped) and completion
    /// (no Pending and no Running left while Running => Completed). Returns the targets that must
    /// be cancelled now because the job was just aborted: the ones still Running.
    ///
    /// After an abort or a cancel, the targets still Running may finish too; the job's state
    /// stays as it is.
    pub fn finish(&mut self, target: &str, outcome: TargetState) -> Result<Vec<String>, JobError> {
        let at = *self
            .index
            .get(target)
            .ok_or_else(|| JobError::UnknownTarget(target.to_owned()))?;
        let from = self.states.get(at).copied().unwrap_or(TargetState::Pending);
        if from != TargetState::Running || !outcome.is_outcome() {
            return Err(JobError::BadTransition {
                target: target.to_owned(),
                from,
                to: outcome,
            });
        }
        self.set_state(at, outcome);
        if self.state != JobState::Running {
            return Ok(Vec::new());
        }
        if let Some(reason) = self.abort_rule_trips() {
            self.state = JobState::Aborted;
            self.abort_reason = Some(reason);
            self.skip_pending();
            return Ok(self.running_targets());
        }
        if self.count(TargetState::Pending) == 0 && self.count(TargetState::Running) == 0 {
            self.state = JobState::Completed;
        }
        Ok(Vec::new())
    }

    /// An operator cancels: state Cancelled, Pending targets Skipped. Returns the Running targets
    /// (to cancel their commands). No-op (empty) if already finished.
    pub fn cancel(&mut self) -> Vec<String> {
        if self.state.is_finished() {
            return Vec::new();
        }
        self.state = JobState::Cancelled;
        self.skip_pending();
        self.running_targets()
    }

    /// Why it was aborted ("3 of 5 finished targets failed (60%), above the 50% threshold"), if it was.
    pub fn abort_reason(&self) -> Option<String> {
        self.abort_reason.clone()
    }

    /// Where a target stands, None if it is not one of the job's.
    pub fn target_state(&self, target: &str) -> Option<TargetState> {
        let at = *self.index.get(target)?;
        self.states.get(at).copied()
    }

    /// Count per state (every state present, zeros included), by name.
    pub fn counts(&self) -> BTreeMap<&'static str, u32> {
        TargetState::ALL
            .into_iter()
            .map(|state| {
                let count = u32::try_from(self.count(state)).unwrap_or(u32::MAX);
                (state.name(), count)
            })
            .collect()
    }

    /// Every target, in the order given.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.targets.iter().map(String::as_str)
    }

    /// Number of targets.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether the job has no targets.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    fn count(&self, state: TargetState) -> usize {
        self.counts[state.index()]
    }

    fn set_state(&mut self, at: usize, to: TargetState) {
        if let Some(state) = self.states.get_mut(at) {
            self.counts[state.index()] -= 1;
            self.counts[to.index()] += 1;
            *state = to;
        }
    }

    fn next_pending_at(&self) -> Option<usize> {
        let rest = self.states.get(self.next_pending..)?;
        let offset = rest.iter().position(|s| *s == TargetState::Pending)?;
        Some(self.next_pending + offset)
    }

    fn skip_pending(&mut self) {
        while let Some(at) = self.next_pending_at() {
            self.set_state(at, TargetState::Skipped);
            self.next_pending = at + 1;
        }
        self.next_pending = self.states.len();
    }

    fn running_targets(&self) -> Vec<String> {
        self.targets
            .iter()
            .zip(&self.states)
            .filter(|(_, state)| **state == TargetState::Running)
            .map(|(target, _)| target.clone())
            .collect()
    }

    /// Position in `starts` of the first start still in the window at `now_us` (starts after
    /// `now_us`, if the clock went back, count as in the window).
    fn first_in_window(&self, now_us: TimeUs) -> usize {
        self.starts
            .partition_point(|start| now_us.saturating_sub(*start) >= WINDOW_US)
    }

    fn started_in_window(&self, now_us: TimeUs) -> usize {
        self.starts.len() - self.first_in_window(now_us)
    }

    fn record_start(&mut self, now_us: TimeUs) {
        let Some(max) = self.limits.max_per_minute else {
            return;
        };
        let at = self.starts.partition_point(|start| *start <= now_us);
        self.starts.insert(at, now_us);
        while self.starts.len() > usize::try_from(max).unwrap_or(usize::MAX) {
            self.starts.pop_front();
        }
    }

    /// The abort rule on the current counts: the reason if it trips.
    fn abort_rule_trips(&self) -> Option<String> {
        let threshold = self.limits.abort_failure_ratio?;
        let finished: usize = TargetState::ALL
            .into_iter()
            .filter(|s| s.is_finished())
            .map(|s| self.count(s))
            .sum();
        let failures: usize = TargetState::ALL
            .into_iter()
            .filter(|s| s.is_failure())
            .map(|s| self.count(s))
            .sum();
        let min_finished = usize::try_from(self.limits.abort_min_finished).unwrap_or(usize::MAX);
        if finished == 0 || finished < min_finished {
            return None;
        }
        let ratio = failures as f64 / finished as f64;
        (ratio > threshold).then(|| {
            format!(
                "{failures} of {finished} finished targets failed ({}%), above the {}% threshold",
                percent(ratio),
                percent(threshold)
            )
        })
    }
}

/// `0.6` as "60", `1/3` as "33.3".
fn percent(ratio: f64) -> String {
    let text = format!("{:.1}", ratio * 100.0);
    match text.strip_suffix(".0") {
        Some(whole) => whole.to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobState as J;
    use TargetState as T;
    use proptest::prelude::*;

    const S: TimeUs = 1_000_000;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("dev-{i}")).collect()
    }

    fn limits(max_in_flight: usize) -> RolloutLimits {
        RolloutLimits {
            max_in_flight,
            max_per_minute: None,
            abort_failure_ratio: None,
            abort_min_finished: 0,
        }
    }

    fn abort_at(ratio: f64, min_finished: u32) -> RolloutLimits {
        RolloutLimits {
            abort_failure_ratio: Some(ratio),
            abort_min_finished: min_finished,
            ..limits(100)
        }
    }

    fn count(rollout: &Rollout, state: TargetState) -> u32 {
        rollout.counts()[state.name()]
    }

    #[test]
    fn names_round_trip() {
        for state in TargetState::ALL {
            assert_eq!(TargetState::parse(state.name()), Some(state));
        }
        for state in JobState::ALL {
            assert_eq!(JobState::parse(state.name()), Some(state));
        }
        assert_eq!(TargetState::parse("Pending"), None);
        assert_eq!(JobState::parse(""), None);
        let finished: Vec<_> = T::ALL.into_iter().filter(|s| s.is_finished()).collect();
        assert_eq!(
            finished,
            [
                T::Succeeded,
                T::Failed,
                T::Expired,
                T::Rejected,
                T::Cancelled,
                T::Skipped
            ]
        );
        let failures: Vec<_> = T::ALL.into_iter().filter(|s| s.is_failure()).collect();
        assert_eq!(failures, [T::Failed, T::Expired, T::Rejected]);
        let over: Vec<_> = J::ALL.into_iter().filter(|s| s.is_finished()).collect();
        assert_eq!(over, [J::Completed, J::Aborted, J::Cancelled]);
    }

    #[test]
    fn validate_explains_bad_limits() {
        assert_eq!(limits(1).validate(), Ok(()));
        assert_eq!(abort_at(0.0, 0).validate(), Ok(()));
        assert_eq!(limits(0).validate(), Err(JobError::NoInFlight));
        for ratio in [1.0, -0.1, f64::INFINITY] {
            assert_eq!(
                abort_at(ratio, 0).validate(),
                Err(JobError::BadRatio(ratio))
            );
        }
        assert!(matches!(
            abort_at(f64::NAN, 0).validate(),
            Err(JobError::BadRatio(r)) if r.is_nan()
        ));
        let zero_rate = RolloutLimits {
            max_per_minute: Some(0),
            ..limits(1)
        };
        assert_eq!(zero_rate.validate(), Err(JobError::BadRate));
        assert_eq!(
            JobError::BadRatio(1.5).to_string(),
            "abort_failure_ratio must be at least 0 and below 1, got 1.5"
        );
        assert_eq!(
            JobError::BadRate.to_string(),
            "max_per_minute must be at least 1 (0 = no limit)"
        );
    }

    #[test]
    fn in_flight_limit_holds_targets_back_in_order() {
        let mut rollout = Rollout::new(ids(5), limits(2));
        assert_eq!(rollout.state(), J::Running);
        assert_eq!(rollout.len(), 5);
        assert_eq!(rollout.next_start_at(0), Some(0));
        assert_eq!(rollout.start(0), ["dev-0", "dev-1"]);
        assert_eq!(rollout.start(0), Vec::<String>::new());
        assert_eq!(rollout.next_start_at(0), None, "the in-flight limit blocks");
        assert_eq!(rollout.finish("dev-1", T::Succeeded), Ok(vec![]));
        assert_eq!(rollout.next_start_at(5), Some(5));
        assert_eq!(rollout.start(5), ["dev-2"]);
        assert_eq!(rollout.target_state("dev-0"), Some(T::Running));
        assert_eq!(rollout.target_state("dev-1"), Some(T::Succeeded));
        assert_eq!(rollout.target_state("dev-4"), Some(T::Pending));
        assert_eq!(rollout.target_state("dev-9"), None);
    }

    #[test]
    fn the_window_is_exactly_sixty_seconds() {
        let rate = RolloutLimits {
            max_per_minute: Some(2),
            ..limits(10)
        };
        let mut rollout = Rollout::new(ids(5), rate);
        let t = 1_000 * S;
        assert_eq!(rollout.start(t), ["dev-0", "dev-1"]);
        assert_eq!(rollout.next_start_at(t), Some(t + WINDOW_US));
        assert_eq!(rollout.start(t + WINDOW_US - 1), Vec::<String>::new());
        assert_eq!(rollout.start(t + WINDOW_US), ["dev-2", "dev-3"]);
        // One start at t + 70 s leaves room for one at t + 120 s (when dev-2 and dev-3 leave).
        let mut rollout = Rollout::new(ids(5), rate);
        assert_eq!(rollout.start(t), ["dev-0", "dev-1"]);
        assert_eq!(rollout.start(t + WINDOW_US), ["dev-2", "dev-3"]);
        assert_eq!(rollout.next_start_at(t + 70 * S), Some(t + 2 * WINDOW_US));
        assert_eq!(rollout.start(t + 2 * WINDOW_US - 1), Vec::<String>::new());
        assert_eq!(rollout.start(t + 2 * WINDOW_US), ["dev-4"]);
        assert_eq!(
            rollout.next_start_at(t + 2 * WINDOW_US),
            None,
            "none pending"
        );
    }

    #[test]
    fn starts_spread_over_the_window() {
        let rate = RolloutLimits {
            max_per_minute: Some(2),
            ..limits(1)
        };
        let mut rollout = Rollout::new(ids(4), rate);
        assert_eq!(rollout.start(0), ["dev-0"]);
        rollout.finish("dev-0", T::Succeeded).unwrap();
        assert_eq!(rollout.start(30 * S), ["dev-1"]);
        rollout.finish("dev-1", T::Succeeded).unwrap();
        assert_eq!(rollout.next_start_at(30 * S), Some(WINDOW_US));
        assert_eq!(rollout.start(WINDOW_US), ["dev-2"]);
        rollout.finish("dev-2", T::Succeeded).unwrap();
        assert_eq!(rollout.next_start_at(WINDOW_US), Some(30 * S + WINDOW_US));
    }

    #[test]
    fn abort_threshold_is_strict_and_waits_for_min_finished() {
        let mut rollout = Rollout::new(ids(10), abort_at(0.5, 2));
        assert_eq!(rollout.start(0).len(), 10);
        // 1 of 1 failed, but fewer than 2 finished: the rule does not apply yet.
        assert_eq!(rollout.finish("dev-0", T::Failed), Ok(vec![]));
        assert_eq!(rollout.state(), J::Running);
        // 1 of 2 = 50%: not above 50%.
        assert_eq!(rollout.finish("dev-1", T::Succeeded), Ok(vec![]));
        assert_eq!(rollout.state(), J::Running);
        // Cancelled is finished but not a failure: 1 of 3.
        assert_eq!(rollout.finish("dev-2", T::Cancelled), Ok(vec![]));
        assert_eq!(rollout.finish("dev-3", T::Expired), Ok(vec![]));
        assert_eq!(rollout.state(), J::Running, "2 of 4 = 50%");
        assert_eq!(rollout.abort_reason(), None);
        let to_cancel = rollout.finish("dev-4", T::Rejected).unwrap();
        assert_eq!(rollout.state(), J::Aborted, "3 of 5 = 60%");
        assert_eq!(to_cancel, ["dev-5", "dev-6", "dev-7", "dev-8", "dev-9"]);
        assert_eq!(
            rollout.abort_reason().as_deref(),
            Some("3 of 5 finished targets failed (60%), above the 50% threshold")
        );
    }

    #[test]
    fn an_abort_skips_pending_targets_and_lets_running_ones_finish() {
        let mut rollout = Rollout::new(
            ids(5),
            RolloutLimits {
                max_in_flight: 2,
                ..abort_at(0.0, 1)
            },
        );
        assert_eq!(rollout.start(0), ["dev-0", "dev-1"]);
        assert_eq!(rollout.finish("dev-0", T::Failed), Ok(vec!["dev-1".into()]));
        assert_eq!(rollout.state(), J::Aborted);
        assert_eq!(count(&rollout, T::Skipped), 3);
        assert_eq!(count(&rollout, T::Pending), 0);
        assert_eq!(rollout.start(WINDOW_US), Vec::<String>::new());
        assert_eq!(rollout.next_start_at(WINDOW_US), None);
        assert_eq!(rollout.cancel(), Vec::<String>::new(), "already finished");
        // The last running target ends (here: it succeeded before the cancel reached it).
        assert_eq!(rollout.finish("dev-1", T::Succeeded), Ok(vec![]));
        assert_eq!(rollout.state(), J::Aborted);
        assert_eq!(
            rollout.abort_reason().as_deref(),
            Some("1 of 1 finished targets failed (100%), above the 0% threshold")
        );
    }

    #[test]
    fn a_job_completes_when_every_target_has_finished() {
        let mut rollout = Rollout::new(ids(3), abort_at(0.5, 0));
        assert_eq!(rollout.start(0).len(), 3);
        rollout.finish("dev-0", T::Succeeded).unwrap();
        rollout.finish("dev-2", T::Failed).unwrap();
        assert_eq!(rollout.state(), J::Running);
        rollout.finish("dev-1", T::Succeeded).unwrap();
        assert_eq!(rollout.state(), J::Completed);
        assert_eq!(rollout.abort_reason(), None);
        assert_eq!(rollout.start(0), Vec::<String>::new());

        let empty = Rollout::new(vec![], limits(1));
        assert_eq!(empty.state(), J::Completed);
        assert!(empty.is_empty());
        assert_eq!(empty.counts().values().sum::<u32>(), 0);
        assert_eq!(empty.counts().len(), 8);
    }

    #[test]
    fn a_cancel_skips_pending_targets_and_returns_running_ones() {
        let mut rollout = Rollout::new(ids(4), limits(2));
        rollout.start(0);
        assert_eq!(rollout.cancel(), ["dev-0", "dev-1"]);
        assert_eq!(rollout.state(), J::Cancelled);
        assert_eq!(rollout.target_state("dev-3"), Some(T::Skipped));
        assert_eq!(rollout.cancel(), Vec::<String>::new());
        assert_eq!(rollout.finish("dev-0", T::Cancelled), Ok(vec![]));
        assert_eq!(rollout.finish("dev-1", T::Failed), Ok(vec![]));
        assert_eq!(rollout.state(), J::Cancelled);
        assert_eq!(rollout.abort_reason(), None);
        let counts = rollout.counts();
        assert_eq!(counts["cancelled"], 1);
        assert_eq!(counts["failed"], 1);
        assert_eq!(counts["skipped"], 2);
        assert_eq!(counts["pending"], 0);
    }

    #[test]
    fn finish_refuses_what_cannot_happen() {
        let mut rollout = Rollout::new(ids(3), limits(1));
        rollout.start(0);
        assert_eq!(
            rollout.finish("truck-9", T::Succeeded),
            Err(JobError::UnknownTarget("truck-9".into()))
        );
        let err = rollout.finish("dev-1", T::Succeeded).unwrap_err();
        assert_eq!(
            err.to_string(),
            "target dev-1 is pending: it cannot become succeeded"
        );
        for outcome in [T::Pending, T::Running, T::Skipped] {
            assert_eq!(
                rollout.finish("dev-0", outcome),
                Err(JobError::BadTransition {
                    target: "dev-0".into(),
                    from: T::Running,
                    to: outcome
                })
            );
        }
        rollout.finish("dev-0", T::Succeeded).unwrap();
        assert_eq!(
            rollout.finish("dev-0", T::Failed).unwrap_err().to_string(),
            "target dev-0 is succeeded: it cannot become failed"
        );
        assert_eq!(
            JobError::UnknownTarget("truck-9".into()).to_string(),
            "target truck-9 is not known to this job"
        );
    }

    #[test]
    fn duplicate_targets_are_kept_once() {
        let targets = ["a", "b", "a", "c"].map(String::from).to_vec();
        let mut rollout = Rollout::new(targets, limits(10));
        assert_eq!(rollout.len(), 3);
        assert_eq!(rollout.start(0), ["a", "b", "c"]);
    }

    #[test]
    fn restore_counts_running_targets_as_just_started() {
        let rate = RolloutLimits {
            max_per_minute: Some(3),
            ..limits(10)
        };
        let stored = vec![
            ("a".to_owned(), T::Succeeded),
            ("b".to_owned(), T::Running),
            ("c".to_owned(), T::Running),
            ("d".to_owned(), T::Pending),
            ("e".to_owned(), T::Pending),
            ("b".to_owned(), T::Failed),
        ];
        let now = 500 * S;
        let mut rollout = Rollout::restore(stored.clone(), rate, J::Running, now);
        assert_eq!(rollout.len(), 5);
        assert_eq!(rollout.target_state("b"), Some(T::Running));
        assert_eq!(rollout.limits(), rate);
        assert_eq!(rollout.start(now), ["d"]);
        assert_eq!(rollout.next_start_at(now + S), Some(now + WINDOW_US));
        assert_eq!(rollout.start(now + WINDOW_US - 1), Vec::<String>::new());
        assert_eq!(rollout.start(now + WINDOW_US), ["e"]);

        // The state stays as given; a finished job has no Pending targets.
        let mut aborted = Rollout::restore(stored, rate, J::Aborted, now);
        assert_eq!(aborted.state(), J::Aborted);
        assert_eq!(aborted.target_state("d"), Some(T::Skipped));
        assert_eq!(aborted.abort_reason(), None);
        assert_eq!(aborted.start(now), Vec::<String>::new());
        assert_eq!(aborted.finish("b", T::Cancelled), Ok(vec![]));
        assert_eq!(aborted.finish("c", T::Succeeded), Ok(vec![]));
        assert_eq!(aborted.state(), J::Aborted);

        let done = Rollout::restore(vec![("a".into(), T::Succeeded)], rate, J::Completed, now);
        assert_eq!(done.state(), J::Completed);
    }

    #[test]
    fn restore_with_more_running_than_the_rate_waits_a_full_window() {
        let rate = RolloutLimits {
            max_per_minute: Some(1),
            ..limits(10)
        };
        let stored = vec![
            ("a".to_owned(), T::Running),
            ("b".to_owned(), T::Running),
            ("c".to_owned(), T::Pending),
        ];
        let mut rollout = Rollout::restore(stored, rate, J::Running, 0);
        assert_eq!(rollout.start(0), Vec::<String>::new());
        assert_eq!(rollout.next_start_at(0), Some(WINDOW_US));
        assert_eq!(rollout.start(WINDOW_US), ["c"]);
    }

    #[test]
    fn percentages_drop_a_needless_decimal() {
        assert_eq!(percent(0.6), "60");
        assert_eq!(percent(1.0 / 3.0), "33.3");
        assert_eq!(percent(0.0), "0");
    }

    // ---- property tests ----

    #[derive(Debug, Clone)]
    enum Op {
        Advance(TimeUs),
        Start,
        /// Finish the `pick`th running target (or, with no running target, the `pick`th target,
        /// which must be refused) with `ALL[outcome % 8]`.
        Finish {
            pick: u8,
            outcome: u8,
        },
        Cancel,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => prop_oneof![
                0..2 * S,
                Just(WINDOW_US - 1),
                Just(WINDOW_US),
                0..2 * WINDOW_US,
            ]
            .prop_map(Op::Advance),
            3 => Just(Op::Start),
            5 => (any::<u8>(), any::<u8>()).prop_map(|(pick, outcome)| Op::Finish { pick, outcome }),
            1 => Just(Op::Cancel),
        ]
    }

    fn valid_limits() -> impl Strategy<Value = RolloutLimits> {
        (
            1usize..5,
            proptest::option::of(1u32..6),
            proptest::option::of(prop_oneof![Just(0.0), Just(0.5), 0.0f64..1.0]),
            0u32..6,
        )
            .prop_map(
                |(max_in_flight, max_per_minute, abort_failure_ratio, abort_min_finished)| {
                    RolloutLimits {
                        max_in_flight,
                        max_per_minute,
                        abort_failure_ratio,
                        abort_min_finished,
                    }
                },
            )
    }

    /// The abort rule's condition, computed from the test's own record of target states.
    fn abort_condition(limits: &RolloutLimits, model: &[TargetState]) -> bool {
        let finished = model
            .iter()
            .filter(|s| !matches!(s, T::Pending | T::Running))
            .count();
        let failures = model
            .iter()
            .filter(|s| matches!(s, T::Failed | T::Expired | T::Rejected))
            .count();
        limits.abort_failure_ratio.is_some_and(|ratio| {
            finished > 0
                && finished as u64 >= u64::from(limits.abort_min_finished)
                && failures as f64 / finished as f64 > ratio
        })
    }

    proptest! {
        /// Under any limits and any sequence of operations: the in-flight and per-minute limits
        /// hold, starts take the first pending targets and as many as the limits allow, states
        /// agree with an independent model (abort exactly when the rule's condition held at a
        /// finish), a finished job starts nothing and has nothing pending.
        #[test]
        fn rollout_follows_its_rules(
            n in 0usize..16,
            limits in valid_limits(),
            ops in proptest::collection::vec(op(), 0..120),
        ) {
            prop_assert_eq!(limits.validate(), Ok(()));
            let targets = ids(n);
            let mut rollout = Rollout::new(targets.clone(), limits);
            let mut model = vec![T::Pending; n];
            let mut job = if n == 0 { J::Completed } else { J::Running };
            let mut starts: Vec<TimeUs> = Vec::new();
            let mut now: TimeUs = 1_700_000_000 * S;
            let in_window = |starts: &[TimeUs], at: TimeUs| {
                starts.iter().filter(|s| at - **s < WINDOW_US).count()
            };
            for op in ops {
                match op {
                    Op::Advance(dt) => now += dt,
                    Op::Start => {
                        let started = rollout.start(now);
                        let pending: Vec<_> = (0..n).filter(|i| model[*i] == T::Pending).collect();
                        let expected: Vec<_> = pending.iter().take(started.len()).map(|i| targets[*i].clone()).collect();
                        prop_assert_eq!(&started, &expected, "not the first pending targets");
                        if job != J::Running {
                            prop_assert!(started.is_empty());
                        }
                        for target in &started {
                            let i = targets.iter().position(|t| t == target).unwrap();
                            model[i] = T::Running;
                            starts.push(now);
                        }
                        let running = model.iter().filter(|s| **s == T::Running).count();
                        let pending = model.iter().filter(|s| **s == T::Pending).count();
                        if let Some(max) = limits.max_per_minute {
                            prop_assert!(in_window(&starts, now) <= max as usize, "window over the rate");
                        }
                        // As many as allowed: what holds the rest back is a limit.
                        let blocked_by_window = job == J::Running
                            && pending > 0
                            && running < limits.max_in_flight;
                        if blocked_by_window {
                            let max = limits.max_per_minute.map(|m| m as usize);
                            prop_assert_eq!(Some(in_window(&starts, now)), max, "a start was held back");
                            let next = rollout.next_start_at(now);
                            prop_assert!(next.is_some_and(|t| t > now), "next_start_at {:?}", next);
                            let next = next.unwrap();
                            prop_assert!(in_window(&starts, next) < max.unwrap());
                            prop_assert!(in_window(&starts, next - 1) >= max.unwrap(), "next_start_at too late");
                        } else {
                            prop_assert_eq!(rollout.next_start_at(now), None);
                        }
                    }
                    Op::Finish { pick, outcome } => {
                        let outcome = T::ALL[usize::from(outcome) % T::ALL.len()];
                        let running: Vec<_> = (0..n).filter(|i| model[*i] == T::Running).collect();
                        if running.is_empty() {
                            if n > 0 {
                                let i = usize::from(pick) % n;
                                let refused = rollout.finish(&targets[i], outcome);
                                prop_assert_eq!(refused, Err(JobError::BadTransition {
                                    target: targets[i].clone(),
                                    from: model[i],
                                    to: outcome,
                                }));
                            }
                            continue;
                        }
                        let i = running[usize::from(pick) % running.len()];
                        let result = rollout.finish(&targets[i], outcome);
                        if matches!(outcome, T::Pending | T::Running | T::Skipped) {
                            prop_assert_eq!(result, Err(JobError::BadTransition {
                                target: targets[i].clone(),
                                from: T::Running,
                                to: outcome,
                            }));
                            continue;
                        }
                        model[i] = outcome;
                        let mut expected_cancel = Vec::new();
                        if job == J::Running {
                            if abort_condition(&limits, &model) {
                                job = J::Aborted;
                                for state in &mut model {
                                    if *state == T::Pending {
                                        *state = T::Skipped;
                                    }
                                }
                                expected_cancel = (0..n)
                                    .filter(|i| model[*i] == T::Running)
                                    .map(|i| targets[i].clone())
                                    .collect();
                            } else if !model.iter().any(|s| matches!(s, T::Pending | T::Running)) {
                                job = J::Completed;
                            }
                        }
                        prop_assert_eq!(result, Ok(expected_cancel));
                    }
                    Op::Cancel => {
                        let returned = rollout.cancel();
                        let mut expected = Vec::new();
                        if job == J::Running {
                            job = J::Cancelled;
                            for state in &mut model {
                                if *state == T::Pending {
                                    *state = T::Skipped;
                                }
                            }
                            expected = (0..n)
                                .filter(|i| model[*i] == T::Running)
                                .map(|i| targets[i].clone())
                                .collect();
                        }
                        prop_assert_eq!(returned, expected);
                    }
                }

                prop_assert_eq!(rollout.state(), job);
                prop_assert_eq!(rollout.abort_reason().is_some(), job == J::Aborted);
                for (i, target) in targets.iter().enumerate() {
                    prop_assert_eq!(rollout.target_state(target), Some(model[i]));
                }
                let counts = rollout.counts();
                prop_assert_eq!(counts.len(), T::ALL.len());
                prop_assert_eq!(counts.values().map(|c| *c as usize).sum::<usize>(), rollout.len());
                for state in T::ALL {
                    let expected = model.iter().filter(|s| **s == state).count();
                    prop_assert_eq!(counts[state.name()] as usize, expected);
                }
                prop_assert!(counts["running"] as usize <= limits.max_in_flight);
                if job != J::Running {
                    prop_assert_eq!(counts["pending"], 0);
                    let mut copy = rollout.clone();
                    prop_assert!(copy.start(now).is_empty());
                    prop_assert_eq!(rollout.next_start_at(now), None);
                }
                if job == J::Completed {
                    prop_assert_eq!(counts["running"], 0);
                    prop_assert!(rollout.abort_reason().is_none());
                }
            }
        }

        /// A restored rollout behaves like the original from then on, except that the running
        /// targets count as started at the restore time.
        #[test]
        fn restore_keeps_states_and_limits(
            n in 0usize..12,
            limits in valid_limits(),
            finishes in proptest::collection::vec((any::<u8>(), 2usize..7), 0..12),
        ) {
            let targets = ids(n);
            let mut rollout = Rollout::new(targets.clone(), limits);
            let now = 10 * WINDOW_US;
            rollout.start(0);
            for (pick, outcome) in finishes {
                let running: Vec<_> = targets
                    .iter()
                    .filter(|t| rollout.target_state(t) == Some(T::Running))
                    .cloned()
                    .collect();
                if let Some(target) = running.get(usize::from(pick) % running.len().max(1)) {
                    rollout.finish(target, T::ALL[outcome]).unwrap();
                }
                rollout.start(0);
            }
            let stored: Vec<_> = targets
                .iter()
                .map(|t| (t.clone(), rollout.target_state(t).unwrap()))
                .collect();
            let mut restored = Rollout::restore(stored, limits, rollout.state(), now);
            prop_assert_eq!(restored.state(), rollout.state());
            prop_assert_eq!(restored.counts(), rollout.counts());
            let running = rollout.counts()["running"] as usize;
            let started = restored.start(now);
            let mut room = limits.max_in_flight.saturating_sub(running);
            if let Some(max) = limits.max_per_minute {
                room = room.min((max as usize).saturating_sub(running));
            }
            let pending = rollout.counts()["pending"] as usize;
            let expected = if rollout.state() == J::Running { room.min(pending) } else { 0 };
            prop_assert_eq!(started.len(), expected);
        }
    }
}
