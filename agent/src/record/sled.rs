//! `SessionStore` on sled.
//!
//! Tree `sessions`: key = session id (big-endian u64, so key order is start order and the
//! newest session is the last key), value = the session as JSON. The id comes from sled's
//! crash-safe id generator, so ids keep increasing across restarts.

use std::path::Path;

use super::{
    NewSession, Outcome, Session, SessionCounts, SessionEnd, SessionId, SessionStore, StoreError,
};

/// How often sled writes its log to disk: the most that a crash can lose.
pub const FLUSH_EVERY_MS: u64 = 100;

pub struct SledStore {
    db: sled::Db,
    sessions: sled::Tree,
}

impl SledStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(FLUSH_EVERY_MS))
            .open()?;
        let sessions = db.open_tree("sessions")?;
        Ok(Self { db, sessions })
    }

    /// Opens the store, waiting up to `patience` while another process holds its lock (a CLI
    /// reading it while the daemon was down holds it for a moment).
    pub fn open_waiting(path: &Path, patience: std::time::Duration) -> Result<Self, StoreError> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match Self::open(path) {
                Err(StoreError::Sled(sled::Error::Io(e)))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// A store that lives in memory only, for tests.
    pub fn temporary() -> Result<Self, StoreError> {
        let db = sled::Config::new().temporary(true).open()?;
        let sessions = db.open_tree("sessions")?;
        Ok(Self { db, sessions })
    }

    fn decode(key: &[u8], value: &[u8]) -> Result<Session, StoreError> {
        serde_json::from_slice(value).map_err(|source| StoreError::Corrupt {
            id: key.try_into().map_or(0, u64::from_be_bytes),
            source,
        })
    }

    fn put(&self, session: &Session) -> Result<(), StoreError> {
        let value = serde_json::to_vec(session).map_err(StoreError::Encode)?;
        self.sessions.insert(session.id.0.to_be_bytes(), value)?;
        Ok(())
    }
}

impl SessionStore for SledStore {
    fn open(&self, start: NewSession) -> Result<SessionId, StoreError> {
        let id = SessionId(self.db.generate_id()?);
        self.put(&Session {
            id,
            start,
            ended_at_us: None,
            bytes_to_target: 0,
            bytes_from_target: 0,
            outcome: Outcome::Open,
        })?;
        Ok(id)
    }

    fn close(&self, id: SessionId, end: SessionEnd) -> Result<(), StoreError> {
        let mut session = self.get(id)?.ok_or(StoreError::UnknownSession(id))?;
        session.ended_at_us = Some(end.ended_at_us);
        session.bytes_to_target = end.bytes_to_target;
        session.bytes_from_target = end.bytes_from_target;
        session.outcome = end.outcome;
        self.put(&session)
    }

    fn get(&self, id: SessionId) -> Result<Option<Session>, StoreError> {
        let key = id.0.to_be_bytes();
        self.sessions
            .get(key)?
            .map(|v| Self::decode(&key, &v))
            .transpose()
    }

    fn list(&self, limit: usize) -> Result<Vec<Session>, StoreError> {
        self.sessions
            .iter()
            .rev()
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                Self::decode(&k, &v)
            })
            .collect()
    }

    fn counts(&self) -> Result<SessionCounts, StoreError> {
        let mut counts = SessionCounts::default();
        for kv in &self.sessions {
            let (k, v) = kv?;
            counts.total += 1;
            if Self::decode(&k, &v)?.outcome == Outcome::Open {
                counts.open += 1;
            }
        }
        Ok(counts)
    }

    fn mark_interrupted(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        for kv in &self.sessions {
            let (k, v) = kv?;
            let mut s = Self::decode(&k, &v)?;
            if s.outcome == Outcome::Open {
                s.outcome = Outcome::Interrupted;
                self.put(&s)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Protocol,
        identity::ProcessIdentity,
        net::{ClientAddr, OrigDstAddr},
    };

    fn start(n: u16) -> NewSession {
        NewSession {
            started_at_us: u64::from(n),
            client: ClientAddr(format!("127.0.0.1:{}", 40000 + n).parse().unwrap()),
            destination: OrigDstAddr("10.0.0.5:5432".parse().unwrap()),
            target: Some("db".into()),
            protocol: Protocol::Tcp,
            identity: ProcessIdentity {
                pid: u32::from(n),
                comm: "psql".into(),
                ..ProcessIdentity::default()
            },
        }
    }

    #[test]
    fn sessions_are_listed_newest_first_and_closed_in_place() {
        let store = SledStore::temporary().unwrap();
        let ids: Vec<_> = (0..5).map(|n| store.open(start(n)).unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        store
            .close(
                ids[1],
                SessionEnd {
                    ended_at_us: 99,
                    bytes_to_target: 10,
                    bytes_from_target: 20,
                    outcome: Outcome::Closed,
                },
            )
            .unwrap();
        let list = store.list(3).unwrap();
        assert_eq!(
            list.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![ids[4], ids[3], ids[2]]
        );
        let s = store.get(ids[1]).unwrap().unwrap();
        assert_eq!(
            (s.bytes_to_target, s.bytes_from_target, s.ended_at_us),
            (10, 20, Some(99))
        );
        assert_eq!(s.outcome, Outcome::Closed);
        assert_eq!(s.start, start(1));
        assert_eq!(store.counts().unwrap(), SessionCounts { total: 5, open: 4 });
        assert!(matches!(
            store.close(
                SessionId(123_456),
                SessionEnd {
                    ended_at_us: 0,
                    bytes_to_target: 0,
                    bytes_from_target: 0,
                    outcome: Outcome::Closed
                }
            ),
            Err(StoreError::UnknownSession(_))
        ));
    }

    #[test]
    fn reopening_keeps_sessions_and_marks_open_ones_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sled");
        let first;
        {
            let store = SledStore::open(&path).unwrap();
            first = store.open(start(1)).unwrap();
            store.flush().unwrap();
        }
        let store = SledStore::open(&path).unwrap();
        assert_eq!(store.mark_interrupted().unwrap(), 1);
        assert_eq!(
            store.get(first).unwrap().unwrap().outcome,
            Outcome::Interrupted
        );
        let second = store.open(start(2)).unwrap();
        assert!(second > first, "ids keep increasing across reopen");
    }
}
