//! TLS 1.3 sessions for resumption that survive a graceful restart, so a fleet reconnecting to a
//! restarted server resumes its sessions (no certificate signature on the server, no chain
//! verification on the device) and may send its Hello in 0-RTT.
//!
//! The sessions are *stateful*: a ticket is a random id, the session behind it stays here, and a
//! resumption takes it out (rustls uses each once). That is what lets rustls accept 0-RTT (it
//! refuses early data with stateless tickets, which could be replayed), and a replayed 0-RTT
//! flight finds no session. The store is in memory, bounded (oldest sessions go first), saved to
//! `DATA_DIR/tls-sessions` (mode 0600) by a graceful shutdown and read back, then deleted, by the
//! next start: a session is never offered twice, even after a crash, and a crash costs the
//! fleet one full handshake each.

use std::collections::{HashMap, VecDeque};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Name of the file, in the data dir, that holds the sessions between a shutdown and a start.
pub const SESSIONS_FILE: &str = "tls-sessions";
const MAGIC: &[u8; 8] = b"flsess01";
/// Largest key or value we read back: rustls' are a few hundred bytes.
const MAX_ENTRY_BYTES: usize = 64 * 1024;

/// The server's TLS session store (a [`rustls::server::StoresServerSessions`]).
#[derive(Debug)]
pub(crate) struct SessionStore {
    inner: Mutex<Sessions>,
    capacity: usize,
    path: PathBuf,
}

#[derive(Debug, Default)]
struct Sessions {
    map: HashMap<Vec<u8>, Vec<u8>>,
    /// Keys, oldest first (may name sessions already taken).
    order: VecDeque<Vec<u8>>,
}

impl Sessions {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>, capacity: usize) {
        if capacity == 0 {
            return;
        }
        while self.map.len() >= capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
        }
        // Keys of taken sessions pile up in `order`: drop them once they dominate.
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
    }
}

impl SessionStore {
    /// A store of at most `capacity` sessions, with the sessions a graceful shutdown saved in
    /// `data_dir` (the file is deleted once read).
    pub(crate) fn open(data_dir: &Path, capacity: usize) -> Self {
        let path = data_dir.join(SESSIONS_FILE);
        let mut sessions = Sessions::default();
        match read_file(&path) {
            Ok(Some(entries)) => {
                let n = entries.len();
                for (k, v) in entries {
                    sessions.put(k, v, capacity);
                }
                tracing::info!(sessions = n, "TLS sessions of the previous run loaded");
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "cannot read the saved TLS sessions; devices do full handshakes")
            }
        }
        match std::fs::remove_file(&path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(file = %path.display(), %error, "cannot delete the saved TLS sessions");
            }
            _ => {}
        }
        Self {
            inner: Mutex::new(sessions),
            capacity,
            path,
        }
    }

    /// Writes the sessions to the data dir for the next start (a graceful shutdown).
    pub(crate) fn save(&self) -> std::io::Result<usize> {
        let entries: Vec<Entry> = match self.inner.lock() {
            Ok(s) => s
                .order
                .iter()
                .filter_map(|k| s.map.get(k).map(|v| (k.clone(), v.clone())))
                .collect(),
            Err(_) => return Ok(0),
        };
        let tmp = self.path.with_extension("tmp");
        {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = std::io::BufWriter::new(opts.open(&tmp)?);
            f.write_all(MAGIC)?;
            for (k, v) in &entries {
                for part in [k, v] {
                    f.write_all(&(part.len() as u32).to_be_bytes())?;
                    f.write_all(part)?;
                }
            }
            f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        Ok(entries.len())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().map_or(0, |s| s.map.len())
    }
}

/// A session's key and value.
type Entry = (Vec<u8>, Vec<u8>);

fn read_file(path: &Path) -> std::io::Result<Option<Vec<Entry>>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut r = bytes.as_slice();
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(bad("not a fleetlink TLS sessions file"));
    }
    let mut part = || -> std::io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_ENTRY_BYTES || len > r.len() {
            return Err(bad("truncated or corrupt TLS sessions file"));
        }
        let (head, tail) = r.split_at(len);
        r = tail;
        Ok(head.to_vec())
    };
    let mut entries = Vec::new();
    loop {
        let key = match part() {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        };
        entries.push((key, part()?));
    }
    Ok(Some(entries))
}

impl rustls::server::StoresServerSessions for SessionStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        match self.inner.lock() {
            Ok(mut s) => {
                s.put(key, value, self.capacity);
                self.capacity > 0
            }
            Err(_) => false,
        }
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.lock().ok()?.map.get(key).cloned()
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.lock().ok()?.map.remove(key)
    }

    fn can_cache(&self) -> bool {
        self.capacity > 0
    }
}

#[cfg(test)]
mod tests {
    use rustls::server::StoresServerSessions as _;

    use super::*;

    #[test]
    fn sessions_survive_a_graceful_restart_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path(), 10);
        assert!(store.put(b"a".to_vec(), b"session a".to_vec()));
        assert!(store.put(b"b".to_vec(), b"session b".to_vec()));
        assert_eq!(store.take(b"a").as_deref(), Some(&b"session a"[..]));
        assert_eq!(store.take(b"a"), None, "a session is used once");
        assert_eq!(store.save().unwrap(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(SESSIONS_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "sessions hold secrets");
        }
        let again = SessionStore::open(dir.path(), 10);
        assert_eq!(again.get(b"b").as_deref(), Some(&b"session b"[..]));
        assert_eq!(again.get(b"a"), None);
        assert!(
            !dir.path().join(SESSIONS_FILE).exists(),
            "read once: a crash must not offer the same sessions again"
        );
        assert_eq!(SessionStore::open(dir.path(), 10).len(), 0);
    }

    #[test]
    fn the_oldest_sessions_go_first_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path(), 3);
        for i in 0..5u8 {
            store.put(vec![i], vec![i]);
        }
        assert_eq!(store.len(), 3);
        assert_eq!(store.get(&[0]), None);
        assert_eq!(store.get(&[1]), None);
        assert_eq!(store.get(&[4]).as_deref(), Some(&[4u8][..]));
        // taken sessions free their room without evicting others
        store.take(&[2]);
        store.put(vec![5], vec![5]);
        assert_eq!(store.get(&[3]).as_deref(), Some(&[3u8][..]));
        assert_eq!(store.len(), 3);
        let off = SessionStore::open(dir.path(), 0);
        assert!(!off.put(vec![1], vec![1]) && !off.can_cache());
    }

    #[test]
    fn a_damaged_file_costs_only_the_sessions() {
        let dir = tempfile::tempdir().unwrap();
        for junk in [
            &b"garbage"[..],
            b"flsess01\x00\x00\x00\x05ab",
            b"flsess01\xff\xff\xff\xff",
        ] {
            std::fs::write(dir.path().join(SESSIONS_FILE), junk).unwrap();
            let store = SessionStore::open(dir.path(), 10);
            assert_eq!(store.len(), 0);
            assert!(!dir.path().join(SESSIONS_FILE).exists());
            assert!(store.put(b"k".to_vec(), b"v".to_vec()));
        }
    }
}
