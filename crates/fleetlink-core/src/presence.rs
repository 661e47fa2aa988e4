//! The presence state machine of one device: online/offline, since when, last seen, from where.

use crate::TimeUs;

/// Why a device went offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflineReason {
    /// The connection closed (by the device, or it was lost).
    Closed,
    /// Nothing arrived for longer than the heartbeat timeout.
    Timeout,
    /// The connection was closed because of a protocol error.
    Error,
    /// The server is shutting down.
    ServerShutdown,
    /// Another connection authenticated as the same device and replaced this one.
    Kicked,
}

impl OfflineReason {
    /// Lower-case name for logs and APIs.
    pub fn name(self) -> &'static str {
        match self {
            OfflineReason::Closed => "closed",
            OfflineReason::Timeout => "timeout",
            OfflineReason::Error => "error",
            OfflineReason::ServerShutdown => "server_shutdown",
            OfflineReason::Kicked => "kicked",
        }
    }

    /// The reason with this name.
    pub fn parse(s: &str) -> Option<OfflineReason> {
        [
            OfflineReason::Closed,
            OfflineReason::Timeout,
            OfflineReason::Error,
            OfflineReason::ServerShutdown,
            OfflineReason::Kicked,
        ]
        .into_iter()
        .find(|r| r.name() == s)
    }
}

/// Identifies one connection of a device.
pub type SessionId = u64;

/// Where a device stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceState {
    /// Never connected since it was provisioned (or since the server started).
    Unknown,
    /// Connected.
    Online {
        /// The current connection.
        session: SessionId,
        /// When it connected.
        since: TimeUs,
    },
    /// Not connected.
    Offline {
        /// When it went offline.
        since: TimeUs,
        /// Why.
        reason: OfflineReason,
    },
}

/// Presence of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    state: PresenceState,
    last_seen: Option<TimeUs>,
    remote_addr: Option<String>,
}

/// A change of presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceChange {
    /// The device came online; `replaced` is the older session it replaces, which must be closed.
    Online {
        /// The older session of the same device, if any.
        replaced: Option<SessionId>,
    },
    /// The device went offline.
    Offline {
        /// The session that ended.
        session: SessionId,
        /// Why.
        reason: OfflineReason,
    },
}

impl Default for Presence {
    fn default() -> Self {
        Self::new()
    }
}

impl Presence {
    /// A device never seen.
    pub fn new() -> Self {
        Self {
            state: PresenceState::Unknown,
            last_seen: None,
            remote_addr: None,
        }
    }

    /// A device known to be offline since `since` (restored from stored history after a
    /// restart), last heard from at `last_seen`, from `remote_addr`.
    pub fn offline(
        since: TimeUs,
        reason: OfflineReason,
        last_seen: TimeUs,
        remote_addr: Option<String>,
    ) -> Self {
        Self {
            state: PresenceState::Offline { since, reason },
            last_seen: Some(last_seen),
            remote_addr,
        }
    }

    /// The current state.
    pub fn state(&self) -> &PresenceState {
        &self.state
    }

    /// Whether the device is online.
    pub fn is_online(&self) -> bool {
        matches!(self.state, PresenceState::Online { .. })
    }

    /// When anything last arrived from the device.
    pub fn last_seen(&self) -> Option<TimeUs> {
        self.last_seen
    }

    /// The remote address of the current or last connection.
    pub fn remote_addr(&self) -> Option<&str> {
        self.remote_addr.as_deref()
    }

    /// Since when the current state holds.
    pub fn since(&self) -> Option<TimeUs> {
        match self.state {
            PresenceState::Unknown => None,
            PresenceState::Online { since, .. } | PresenceState::Offline { since, .. } => {
                Some(since)
            }
        }
    }

    /// The current session, if online.
    pub fn session(&self) -> Option<SessionId> {
        match self.state {
            PresenceState::Online { session, .. } => Some(session),
            _ => None,
        }
    }

    /// A new connection authenticated as this device. A newer connection replaces an older one.
    pub fn connect(
        &mut self,
        session: SessionId,
        remote_addr: String,
        now: TimeUs,
    ) -> PresenceChange {
        let replaced = self.session();
        self.state = PresenceState::Online {
            session,
            since: now,
        };
        self.last_seen = Some(now);
        self.remote_addr = Some(remote_addr);
        PresenceChange::Online { replaced }
    }

    /// Something arrived on `session`. Returns false if `session` is not the current one.
    pub fn seen(&mut self, session: SessionId, now: TimeUs) -> bool {
        if self.session() != Some(session) {
            return false;
        }
        self.last_seen = Some(self.last_seen.map_or(now, |t| t.max(now)));
        true
    }

    /// `session` ended. Changes nothing if it is not the current session (it was replaced).
    pub fn disconnect(
        &mut self,
        session: SessionId,
        reason: OfflineReason,
        now: TimeUs,
    ) -> Option<PresenceChange> {
        if self.session() != Some(session) {
            return None;
        }
        self.state = PresenceState::Offline { since: now, reason };
        Some(PresenceChange::Offline { session, reason })
    }

    /// Goes offline if nothing arrived for more than `timeout_us`.
    pub fn check_timeout(&mut self, now: TimeUs, timeout_us: i64) -> Option<PresenceChange> {
        let session = self.session()?;
        let last = self.last_seen.unwrap_or(now);
        if now.saturating_sub(last) > timeout_us {
            self.disconnect(session, OfflineReason::Timeout, now)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod offline_restore_tests {
    use super::*;

    #[test]
    fn a_restored_offline_device_comes_online_and_reasons_round_trip() {
        let mut p = Presence::offline(100, OfflineReason::Timeout, 90, Some("1.2.3.4:5".into()));
        assert!(!p.is_online());
        assert_eq!(p.since(), Some(100));
        assert_eq!(p.last_seen(), Some(90));
        assert_eq!(
            p.connect(7, "5.6.7.8:9".into(), 200),
            PresenceChange::Online { replaced: None }
        );
        assert_eq!(p.session(), Some(7));
        for r in ["closed", "timeout", "error", "server_shutdown", "kicked"] {
            assert_eq!(OfflineReason::parse(r).map(OfflineReason::name), Some(r));
        }
        assert_eq!(OfflineReason::parse("lost"), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn timeout_takes_a_silent_device_offline() {
        let mut p = Presence::new();
        p.connect(1, "127.0.0.1:5000".into(), 1_000);
        assert_eq!(p.check_timeout(1_500, 1_000), None);
        assert!(p.seen(1, 1_900));
        assert_eq!(p.check_timeout(2_800, 1_000), None);
        assert_eq!(
            p.check_timeout(3_000, 1_000),
            Some(PresenceChange::Offline {
                session: 1,
                reason: OfflineReason::Timeout
            })
        );
        assert_eq!(
            p.state(),
            &PresenceState::Offline {
                since: 3_000,
                reason: OfflineReason::Timeout
            }
        );
    }

    #[test]
    fn a_replaced_session_cannot_take_the_device_offline() {
        let mut p = Presence::new();
        p.connect(1, "a".into(), 0);
        assert_eq!(
            p.connect(2, "b".into(), 10),
            PresenceChange::Online { replaced: Some(1) }
        );
        assert_eq!(p.disconnect(1, OfflineReason::Closed, 20), None);
        assert!(p.is_online());
        assert!(!p.seen(1, 30));
        assert_eq!(p.remote_addr(), Some("b"));
    }

    #[derive(Debug, Clone)]
    enum Event {
        Connect,
        Seen(u8),
        Disconnect(u8),
        Tick,
    }

    proptest! {
        /// Online iff the last connected session has neither disconnected nor timed out.
        #[test]
        fn presence_follows_the_latest_session(events in proptest::collection::vec(
            prop_oneof![Just(Event::Connect), any::<u8>().prop_map(Event::Seen), any::<u8>().prop_map(Event::Disconnect), Just(Event::Tick)],
            0..60,
        )) {
            let mut p = Presence::new();
            let mut now = 0;
            let mut sessions = 0u64;
            let mut live: Option<u64> = None;
            let mut last_seen = 0;
            for e in events {
                now += 100;
                match e {
                    Event::Connect => { sessions += 1; p.connect(sessions, String::new(), now); live = Some(sessions); last_seen = now; }
                    Event::Seen(s) => {
                        let s = u64::from(s) % (sessions + 1);
                        if p.seen(s, now) { prop_assert_eq!(live, Some(s)); last_seen = now; }
                    }
                    Event::Disconnect(s) => {
                        let s = u64::from(s) % (sessions + 1);
                        if p.disconnect(s, OfflineReason::Closed, now).is_some() { prop_assert_eq!(live, Some(s)); live = None; }
                    }
                    Event::Tick => {
                        if p.check_timeout(now, 250).is_some() { prop_assert!(now - last_seen > 250); live = None; }
                    }
                }
                prop_assert_eq!(p.session(), live);
                prop_assert!(p.since().unwrap_or(0) <= now);
            }
        }
    }
}
