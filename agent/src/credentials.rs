//! Where the gateway finds a target's credentials. Only protocol handlers read them; the
//! governed tool never sees them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `{ file = "/etc/bulkhead/credentials/orders-db" }` or `{ env = "ORDERS_DB_PASSWORD" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum CredentialRef {
    File(PathBuf),
    Env(String),
}

impl CredentialRef {
    /// The secret: the first line of the file, or the environment variable's value. Read at
    /// each use, so a rotated file takes effect for the next session.
    pub fn read_secret(&self) -> Result<String, String> {
        match self {
            CredentialRef::File(path) => std::fs::read_to_string(path)
                .map(|s| s.lines().next().unwrap_or("").to_string())
                .map_err(|e| format!("{}: {e}", path.display())),
            CredentialRef::Env(name) => {
                std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))
            }
        }
    }

    /// What is wrong with it before any use, if anything.
    pub fn problem(&self) -> Option<(&'static str, &'static str)> {
        match self {
            CredentialRef::Env(name) if name.is_empty() => Some(("env", "must name a variable")),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_gives_its_first_line_and_a_missing_one_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\nignored\n").unwrap();
        assert_eq!(
            CredentialRef::File(path.clone()).read_secret(),
            Ok("s3cret".into())
        );
        let missing = CredentialRef::File(dir.path().join("none"));
        assert!(missing.read_secret().unwrap_err().contains("none"));
        assert!(CredentialRef::Env(String::new()).problem().is_some());
    }
}
