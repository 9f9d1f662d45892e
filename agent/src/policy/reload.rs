//! Live policy: a handle readers snapshot without blocking, reloaded on change or SIGHUP.
//!
//! A reload parses the whole directory anew and swaps it in only if it is valid; an invalid
//! directory keeps the running set (a half-edited file must not open or close everything) and
//! records the error for `bulkhead status`. Sessions hold no reference to a set across
//! requests, so each request sees the newest valid set and nothing is dropped.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{file::load_dir, PolicySet, SqlCache};
use crate::record::now_micros;

/// How long file events are gathered before one reload (editors write in several steps).
const DEBOUNCE: Duration = Duration::from_millis(200);
/// How often a missing policy directory is looked for.
const MISSING_DIR_POLL: Duration = Duration::from_secs(2);

/// What `bulkhead status` shows about the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub dir: String,
    /// Increases with every successful load; 0 until the first.
    pub version: u64,
    pub loaded_at_us: u64,
    pub files: usize,
    pub rules: usize,
    /// The built-in starter policy is in force (observe mode), not the directory's.
    #[serde(default)]
    pub starter: bool,
    /// The last failed load's errors, cleared by the next successful one.
    pub last_error: Option<String>,
    pub last_error_at_us: Option<u64>,
}

impl PolicyStatus {
    /// Lines for `bulkhead status`, aligned with its other rows.
    pub fn lines(&self) -> Vec<String> {
        let when = crate::text::timestamp;
        let mut out = vec![if self.starter {
            format!(
                "policy:      BUILT-IN STARTER (observe mode): everything is recorded, nothing is enforced; \
                 {} does not exist (bulkhead policy init writes the examples there)",
                self.dir
            )
        } else if self.version == 0 {
            format!(
                "policy:      none loaded from {}: every request is denied",
                self.dir
            )
        } else {
            format!(
                "policy:      version {} ({}, {}) from {}, loaded {}",
                self.version,
                crate::text::count(self.rules, "rule", "rules"),
                crate::text::count(self.files, "file", "files"),
                self.dir,
                when(self.loaded_at_us)
            )
        }];
        if let Some(e) = &self.last_error {
            let at = self.last_error_at_us.map(when).unwrap_or_default();
            let first = e.lines().next().unwrap_or_default();
            let more = e.lines().count().saturating_sub(1);
            out.push(format!("             last reload failed {at}: {first}"));
            if more > 0 {
                out.push(format!(
                    "             ... and {more} more lines (bulkhead policy check)"
                ));
            }
        }
        out
    }
}

/// The live policy set. Cheap to clone; [`PolicyHandle::current`] never blocks on a reload.
#[derive(Debug, Clone)]
pub struct PolicyHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    current: ArcSwap<PolicySet>,
    status: Mutex<PolicyStatus>,
    cache: Arc<SqlCache>,
    /// Serializes reloads so versions and sets stay in step.
    reloading: Mutex<()>,
}

impl PolicyHandle {
    /// A handle that denies everything until [`PolicyHandle::reload`] succeeds.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let cache = Arc::new(SqlCache::default());
        Self {
            inner: Arc::new(Inner {
                status: Mutex::new(PolicyStatus {
                    dir: dir.display().to_string(),
                    ..PolicyStatus::default()
                }),
                dir,
                current: ArcSwap::from_pointee(
                    PolicySet::deny_all().with_cache(Arc::clone(&cache)),
                ),
                cache,
                reloading: Mutex::new(()),
            }),
        }
    }

    /// For a daemon on its embedded default configuration: when the policy directory does not
    /// exist, the built-in starter policy is in force (observe mode: record everything, enforce
    /// nothing) until the directory appears and loads. Returns whether the starter is in force.
    /// Never after a directory failed to load, and never for a directory a configuration
    /// names: those keep deny-everything until a valid load.
    pub fn start_with_starter_if_missing(&self) -> bool {
        if self.inner.dir.exists() {
            return false;
        }
        let set = starter_policy().with_cache(Arc::clone(&self.inner.cache));
        self.inner.current.store(Arc::new(set));
        let mut status = self
            .inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        status.starter = true;
        status.rules = 0;
        status.files = 0;
        true
    }

    /// Loads the directory; on success the new set replaces the old one.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, String> {
        let handle = Self::new(dir);
        handle.reload().map(|_| handle)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<PolicySet> {
        self.inner.current.load_full()
    }

    pub fn status(&self) -> PolicyStatus {
        self.inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Parses the directory anew. Valid: swapped in, returns the new version. Invalid: the old
    /// set stays, the error is recorded and returned.
    pub fn reload(&self) -> Result<u64, String> {
        let _one_at_a_time = self
            .inner
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match load_dir(&self.inner.dir) {
            Ok(set) => {
                let (files, rules) = (set.files.len(), set.rules.len());
                self.inner
                    .current
                    .store(Arc::new(set.with_cache(Arc::clone(&self.inner.cache))));
                let mut status = self
                    .inner
                    .status
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                status.version += 1;
                status.starter = false;
                status.loaded_at_us = now_micros();
                status.files = files;
                status.rules = rules;
                status.last_error = None;
                status.last_error_at_us = None;
                Ok(status.version)
            }
            Err(errors) => {
                let text = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n");
                let mut status = self
                    .inner
                    .status
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                status.last_error = Some(text.clone());
                status.last_error_at_us = Some(now_micros());
                Err(text)
            }
        }
    }
}

/// The text of the built-in starter policy.
pub const STARTER_POLICY: &str = include_str!("builtin/starter.toml");

/// The built-in starter policy: every target in observe mode, decided as deny unless allowed.
pub fn starter_policy() -> PolicySet {
    let path = Path::new("<built-in starter policy>");
    match super::file::parse_file(path, STARTER_POLICY) {
        Ok(p) => PolicySet::new(p.rules, p.targets, vec![path.to_path_buf()]),
        // The text is part of the binary and tested; should it ever fail, deny everything.
        Err(_) => PolicySet::deny_all(),
    }
}

/// Reloads `handle` when a file in its directory changes or the process gets SIGHUP; runs until
/// the task is dropped. Without file watching (no inotify, directory missing at start) SIGHUP
/// still works, and the reason is logged.
pub async fn watch(handle: PolicyHandle) {
    let (tx, mut rx) = mpsc::channel::<()>(16);
    let mut watcher = start_watcher(handle.dir(), tx.clone());
    // A directory that does not exist yet (the starter policy is in force, or it was removed)
    // is looked for every few seconds: once it appears it is loaded and watched.
    let mut look_for_dir = tokio::time::interval(MISSING_DIR_POLL);
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "no SIGHUP handler; policies reload on file changes only");
            None
        }
    };
    loop {
        tokio::select! {
            Some(()) = rx.recv() => {
                // Let the editor finish, then drop the events it made meanwhile.
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
            }
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {}
            _ = look_for_dir.tick(), if watcher.is_none() => {
                if !handle.dir().is_dir() {
                    continue;
                }
                info!(dir = %handle.dir().display(), "the policy directory appeared");
                watcher = start_watcher(handle.dir(), tx.clone());
            }
            else => return,
        }
        let h = handle.clone();
        let result = tokio::task::spawn_blocking(move || h.reload()).await;
        match result {
            Ok(Ok(version)) => info!(version, dir = %handle.dir().display(), "policies reloaded"),
            Ok(Err(e)) => {
                warn!(dir = %handle.dir().display(), error = %e, "policies not reloaded; the previous set stays in force");
            }
            Err(e) => warn!(error = %e, "policy reload task failed"),
        }
    }
}

fn start_watcher(dir: &Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher as _};
    let mut watcher =
        match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.try_send(());
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "cannot watch policy files; reload with SIGHUP");
                return None;
            }
        };
    if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
        warn!(dir = %dir.display(), error = %e, "cannot watch the policy directory; reload with SIGHUP");
        return None;
    }
    Some(watcher)
}
