//! The CLI's side of the control socket.

use std::{
    io,
    path::{Path, PathBuf},
};

use super::{Request, Response};
use crate::record::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `stale`: a socket file is there but nothing listens (a daemon that did not exit cleanly).
    #[error("the daemon is not running ({})", socket_absence(path, *stale))]
    NotRunning { path: PathBuf, stale: bool },
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Refused(String),
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
}

/// Why there is no daemon at `path`, as the CLI words it.
pub fn socket_absence(path: &Path, stale: bool) -> String {
    if stale {
        format!(
            "stale control socket at {}: left by a daemon that did not exit cleanly; the next \
             `bulkhead daemon` replaces it",
            path.display()
        )
    } else {
        format!("no control socket at {}", path.display())
    }
}

/// A connection to the daemon (blocking; the CLI has nothing else to do meanwhile).
pub struct Client {
    path: PathBuf,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl Client {
    /// `admin_group` only words the error when the socket refuses us.
    pub fn connect(path: &Path, admin_group: &str) -> Result<Self, ClientError> {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => Ok(Self {
                path: path.to_path_buf(),
                reader: std::io::BufReader::new(s),
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                Err(ClientError::NotRunning {
                    path: path.to_path_buf(),
                    stale: e.kind() == io::ErrorKind::ConnectionRefused,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                Err(ClientError::Refused(format!(
                    "permission denied on {}: root or members of the `{admin_group}` group only",
                    path.display()
                )))
            }
            Err(source) => Err(ClientError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn io_err(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }

    pub fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        use std::io::Write as _;
        let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        let r = self.reader.get_mut().write_all(&line);
        match r {
            Ok(()) => Ok(()),
            // The daemon refuses a peer by answering at once and closing; the refusal may
            // already be waiting for us even though our request could not be written.
            Err(e) => match self.next() {
                Ok(Some(Response::Error { message })) => Err(ClientError::Refused(message)),
                _ => Err(self.io_err(e)),
            },
        }
    }

    /// The next response line; `None` when the daemon closed the connection.
    pub fn next(&mut self) -> Result<Option<Response>, ClientError> {
        use std::io::BufRead as _;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer);
        if n.map_err(|e| self.io_err(e))? == 0 {
            return Ok(None);
        }
        serde_json::from_str(&answer)
            .map(Some)
            .map_err(|e| ClientError::Protocol(format!("{e}: {answer:?}")))
    }

    /// One request, one answer.
    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value, ClientError> {
        self.send(req)?;
        match self.next()? {
            Some(Response::Ok { result }) => Ok(result),
            Some(Response::Error { message }) => Err(ClientError::Refused(message)),
            Some(other) => Err(ClientError::Protocol(format!("{other:?}"))),
            None => Err(ClientError::Protocol(
                "the daemon closed the connection".into(),
            )),
        }
    }
}

/// One request to the daemon at `path`.
pub fn call(
    path: &Path,
    admin_group: &str,
    req: &Request,
) -> Result<serde_json::Value, ClientError> {
    Client::connect(path, admin_group)?.call(req)
}

/// Convenience for `StoreError` in the CLI.
impl From<StoreError> for ClientError {
    fn from(e: StoreError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}
