//! The real identity of result columns: (table OID, attribute number) → schema, table, column,
//! read from the target's own catalog.
//!
//! The lookup runs on a side connection of the gateway's own (same target, same held
//! credentials, same database: OIDs are per database), never inside the client's session,
//! whose protocol order it would break. Answers are cached per target address and database,
//! shared by all sessions, for [`TTL`]; a DDL statement decided through the gateway on that
//! database drops the cache (and again when its transaction ends), so a renamed column is not
//! served under its old name. Only statements with column mask rules ever ask.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use tokio::io::AsyncWriteExt as _;

use super::settings::PostgresTarget;
use super::{
    codec::{self, CodecError},
    upstream::{self, UpstreamError},
};
use crate::net::OrigDstAddr;

/// How long a table's columns are trusted without asking again (DDL made outside the
/// gateway is seen after at most this long).
pub const TTL: Duration = Duration::from_secs(30);
/// A lookup that takes longer fails (and what depends on it is masked).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds: tables per database cache, answer rows per lookup.
const MAX_TABLES: usize = 10_000;
const MAX_ROWS: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog lookup: {0}")]
    Login(#[from] UpstreamError),
    #[error("catalog lookup: {0}")]
    Codec(#[from] CodecError),
    #[error("catalog lookup failed at the target: {0}")]
    Query(String),
    #[error("catalog lookup timed out")]
    Timeout,
    #[error("catalog lookup: malformed answer")]
    Malformed,
    #[error("catalog lookup: too many rows")]
    TooLarge,
}

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub number: i16,
    pub name: String,
    pub type_oid: u32,
    /// Generated columns are left out of `COPY table TO` without a column list.
    pub generated: bool,
    /// A stored generated column's expression (`pg_get_expr`): the columns of its row it is
    /// computed from ([`super::columns`] masks it as they are).
    pub generation: Option<String>,
}

/// A table (or view, materialized view, foreign table) and its live columns in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
    /// A view's or materialized view's query (`pg_get_viewdef`): what its columns read.
    pub definition: Option<String>,
    /// The tables it inherits from and those that inherit from it, at any depth (partitions
    /// and `INHERITS`), as (schema, name): a child's rows are read through its parent too, and
    /// a child's inherited column has its parent's name ([`super::columns`] masks by both).
    pub kin: Vec<(String, String)>,
}

impl Table {
    pub fn column(&self, number: i16) -> Option<&Column> {
        self.columns.iter().find(|c| c.number == number)
    }

    pub fn column_named(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// How the side connection logs in: what the session itself used.
#[derive(Clone)]
pub struct Login {
    pub addr: OrigDstAddr,
    pub pg: PostgresTarget,
    pub user: String,
    pub database: String,
    pub password: Option<String>,
}

/// A relation's name as a statement gave it: schema (`None`: any), name.
type RelationName = (Option<String>, String);

#[derive(Default)]
struct Database {
    tables: Mutex<HashMap<u32, (Instant, Arc<Table>)>>,
    /// Relations by the name a statement gave (schema `None`: any schema), as OIDs.
    names: Mutex<HashMap<RelationName, (Instant, Vec<u32>)>>,
    /// Bumped by every invalidation: a lookup that started before one does not fill the cache.
    generation: AtomicU64,
}

/// The caches of every target database, shared by all sessions.
#[derive(Default)]
pub struct Catalogs {
    databases: Mutex<HashMap<(SocketAddr, String), Arc<Database>>>,
}

impl Catalogs {
    fn database(&self, login: &Login) -> Arc<Database> {
        let mut dbs = self
            .databases
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            dbs.entry((login.addr.0, login.database.clone()))
                .or_default(),
        )
    }

    /// Forgets what is known of one database's tables.
    pub fn invalidate(&self, addr: OrigDstAddr, database: &str) {
        let db = self
            .databases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(addr.0, database.to_string()))
            .cloned();
        if let Some(db) = db {
            db.generation.fetch_add(1, Ordering::SeqCst);
            db.tables
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            db.names
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }

    /// The tables with these OIDs, each with (at least) the given attribute numbers; a table
    /// the catalog does not have is left out. Cached answers are used while fresh and complete.
    pub async fn tables_by_oid(
        &self,
        login: &Login,
        wanted: &[(u32, i16)],
    ) -> Result<HashMap<u32, Arc<Table>>, CatalogError> {
        let db = self.database(login);
        let mut found = HashMap::new();
        let mut missing: Vec<u32> = Vec::new();
        {
            let tables = db.tables.lock().unwrap_or_else(PoisonError::into_inner);
            for &(oid, number) in wanted {
                if found.contains_key(&oid) || missing.contains(&oid) {
                    continue;
                }
                match tables.get(&oid) {
                    Some((at, t))
                        if at.elapsed() < TTL
                            && wanted
                                .iter()
                                .filter(|(o, _)| *o == oid)
                                .all(|(_, n)| t.column(*n).is_some())
                            && t.column(number).is_some() =>
                    {
                        found.insert(oid, Arc::clone(t));
                    }
                    _ => missing.push(oid),
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let list: Vec<String> = missing.iter().map(u32::to_string).collect();
        let condition = format!("c.oid IN ({})", list.join(", "));
        for t in self.lookup(login, &db, &condition).await? {
            found.insert(t.oid, t);
        }
        Ok(found)
    }

    /// The relations called `name` (in `schema`, if given; in any schema otherwise).
    pub async fn tables_by_name(
        &self,
        login: &Login,
        schema: Option<&str>,
        name: &str,
    ) -> Result<Vec<Arc<Table>>, CatalogError> {
        let db = self.database(login);
        let condition = match schema {
            Some(s) => format!(
                "c.relname = {} AND n.nspname = {}",
                literal(name),
                literal(s)
            ),
            None => format!("c.relname = {}", literal(name)),
        };
        self.lookup(login, &db, &condition).await
    }

    /// The relations with these names (schema `None`: in any schema), with a view's
    /// definition; names the catalog lacks are left out. Cached like [`Self::tables_by_oid`].
    pub async fn relations_by_names(
        &self,
        login: &Login,
        names: &[RelationName],
    ) -> Result<Vec<Arc<Table>>, CatalogError> {
        let db = self.database(login);
        let mut found: Vec<Arc<Table>> = Vec::new();
        let mut missing: Vec<&RelationName> = Vec::new();
        {
            let known = db.names.lock().unwrap_or_else(PoisonError::into_inner);
            let tables = db.tables.lock().unwrap_or_else(PoisonError::into_inner);
            for name in names {
                let cached = known
                    .get(name)
                    .filter(|(at, _)| at.elapsed() < TTL)
                    .and_then(|(_, oids)| {
                        oids.iter()
                            .map(|o| {
                                tables
                                    .get(o)
                                    .filter(|(at, _)| at.elapsed() < TTL)
                                    .map(|(_, t)| Arc::clone(t))
                            })
                            .collect::<Option<Vec<_>>>()
                    });
                match cached {
                    Some(t) => found.extend(t),
                    None => missing.push(name),
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let condition = missing
            .iter()
            .map(|(schema, name)| match schema {
                Some(s) => format!(
                    "(c.relname = {} AND n.nspname = {})",
                    literal(name),
                    literal(s)
                ),
                None => format!("c.relname = {}", literal(name)),
            })
            .collect::<Vec<_>>()
            .join(" OR ");
        let generation = db.generation.load(Ordering::SeqCst);
        let looked_up = self.lookup(login, &db, &format!("({condition})")).await?;
        if db.generation.load(Ordering::SeqCst) == generation {
            let mut known = db.names.lock().unwrap_or_else(PoisonError::into_inner);
            if known.len() + missing.len() > MAX_TABLES {
                known.clear();
            }
            let now = Instant::now();
            for name in &missing {
                let oids = looked_up
                    .iter()
                    .filter(|t| t.name == name.1 && name.0.as_ref().is_none_or(|s| *s == t.schema))
                    .map(|t| t.oid)
                    .collect();
                known.insert((*name).clone(), (now, oids));
            }
        }
        found.extend(looked_up);
        Ok(found)
    }

    async fn lookup(
        &self,
        login: &Login,
        db: &Database,
        condition: &str,
    ) -> Result<Vec<Arc<Table>>, CatalogError> {
        let generation = db.generation.load(Ordering::SeqCst);
        // The kin of each table, worked out and sent once per table (on its first column's
        // row): its ancestors and its descendants in pg_inherits (acyclic: the server refuses
        // circular inheritance), as a JSON array of [schema, name], which no name can break.
        let sql = format!(
            "WITH rel AS (SELECT c.oid, n.nspname, c.relname, c.relkind \
               FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE {condition}), \
             kin AS (SELECT rel.oid, (WITH RECURSIVE \
               up(oid) AS (SELECT i.inhparent FROM pg_catalog.pg_inherits i \
                 WHERE i.inhrelid = rel.oid \
                 UNION SELECT i.inhparent FROM pg_catalog.pg_inherits i JOIN up ON i.inhrelid = up.oid), \
               down(oid) AS (SELECT i.inhrelid FROM pg_catalog.pg_inherits i \
                 WHERE i.inhparent = rel.oid \
                 UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN down ON i.inhparent = down.oid) \
               SELECT pg_catalog.json_agg(pg_catalog.json_build_array(kn.nspname, k.relname)) \
               FROM pg_catalog.pg_class k JOIN pg_catalog.pg_namespace kn ON kn.oid = k.relnamespace \
               WHERE k.oid IN (SELECT oid FROM up UNION SELECT oid FROM down)) AS kin FROM rel) \
             SELECT rel.oid, rel.nspname, rel.relname, a.attnum, a.attname, a.atttypid, \
             a.attgenerated <> '', \
             CASE WHEN rel.relkind IN ('v', 'm') THEN pg_catalog.pg_get_viewdef(rel.oid) END, \
             CASE WHEN pg_catalog.row_number() OVER (PARTITION BY rel.oid ORDER BY a.attnum) = 1 \
               THEN kin.kin END, \
             CASE WHEN a.attgenerated <> '' THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END \
             FROM rel JOIN kin ON kin.oid = rel.oid \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = rel.oid \
             LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY rel.oid, a.attnum"
        );
        let rows = tokio::time::timeout(LOOKUP_TIMEOUT, query(login, &sql))
            .await
            .map_err(|_| CatalogError::Timeout)??;
        let tables = tables_from_rows(&rows)?;
        if db.generation.load(Ordering::SeqCst) == generation {
            let mut cache = db.tables.lock().unwrap_or_else(PoisonError::into_inner);
            if cache.len() + tables.len() > MAX_TABLES {
                cache.clear();
            }
            let now = Instant::now();
            for t in &tables {
                cache.insert(t.oid, (now, Arc::clone(t)));
            }
        }
        Ok(tables)
    }
}

/// A string literal that means the same whatever `standard_conforming_strings` says.
fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

type Row = Vec<Option<String>>;

/// Groups the lookup's rows (ordered by table, then column) into tables.
fn tables_from_rows(rows: &[Row]) -> Result<Vec<Arc<Table>>, CatalogError> {
    let mut tables: Vec<Table> = Vec::new();
    for row in rows {
        let [Some(oid), Some(schema), Some(name), Some(number), Some(column), Some(type_oid), Some(generated), definition, kin, generation] =
            row.as_slice()
        else {
            return Err(CatalogError::Malformed);
        };
        let oid: u32 = oid.parse().map_err(|_| CatalogError::Malformed)?;
        let column = Column {
            number: number.parse().map_err(|_| CatalogError::Malformed)?,
            name: column.clone(),
            type_oid: type_oid.parse().map_err(|_| CatalogError::Malformed)?,
            generated: generated == "t",
            generation: generation.clone(),
        };
        match tables.last_mut() {
            Some(t) if t.oid == oid => t.columns.push(column),
            _ => tables.push(Table {
                oid,
                schema: schema.clone(),
                name: name.clone(),
                columns: vec![column],
                definition: definition.clone(),
                kin: match kin {
                    None => Vec::new(),
                    Some(json) => {
                        serde_json::from_str(json).map_err(|_| CatalogError::Malformed)?
                    }
                },
            }),
        }
    }
    Ok(tables.into_iter().map(Arc::new).collect())
}

/// Runs one simple query on a fresh side connection and returns its rows as text.
async fn query(login: &Login, sql: &str) -> Result<Vec<Row>, CatalogError> {
    let extra = [(
        "application_name".to_string(),
        "bulkhead-catalog".to_string(),
    )];
    let mut up = upstream::login(
        login.addr,
        &login.pg,
        &login.user,
        &login.database,
        &extra,
        login.password.as_deref(),
    )
    .await?;
    up.writer
        .write_all(&codec::query(sql))
        .await
        .map_err(CodecError::from)?;
    up.writer.flush().await.map_err(CodecError::from)?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let frame = up.reader.next().await?.ok_or(CatalogError::Query(
            "the target closed the connection".into(),
        ))?;
        match frame.tag {
            b'D' => {
                if rows.len() >= MAX_ROWS {
                    return Err(CatalogError::TooLarge);
                }
                let values = codec::data_row_values(&frame.body)?;
                rows.push(
                    values
                        .into_iter()
                        .map(|v| v.map(|v| String::from_utf8_lossy(v).into_owned()))
                        .collect(),
                );
            }
            b'E' => {
                error = codec::error_fields(&frame.body)
                    .into_iter()
                    .find(|(c, _)| *c == b'M')
                    .map(|(_, m)| m)
                    .or_else(|| Some("error".into()));
            }
            b'Z' => break,
            _ => {}
        }
    }
    let _ = up.writer.write_all(&codec::terminate()).await;
    let _ = up.writer.shutdown().await;
    match error {
        Some(e) => Err(CatalogError::Query(e)),
        None => Ok(rows),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: &[&str]) -> Row {
        v.iter().map(|s| Some((*s).to_string())).collect()
    }

    #[test]
    fn rows_group_into_tables_and_bad_rows_are_errors() {
        let rows = vec![
            row(&["16384", "public", "users", "1", "id", "23", "f"]),
            row(&["16384", "public", "users", "2", "ssn", "25", "f"]),
            row(&["16390", "hr", "people", "1", "ssn", "25", "t"]),
        ];
        let rows: Vec<Row> = rows
            .into_iter()
            .map(|mut r| {
                r.push(None);
                r.push(None);
                r.push(None);
                r
            })
            .chain([row(&[
                "16400",
                "public",
                "v",
                "1",
                "ssn",
                "25",
                "f",
                " SELECT users.ssn FROM users;",
                r#"[["public","users_2024"],["hr","odd \"]\\"]]"#,
                "upper(ssn)",
            ])])
            .collect();
        let t = tables_from_rows(&rows).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].definition, None);
        assert!(t[0].kin.is_empty());
        assert_eq!(t[0].columns[1].generation, None);
        assert_eq!(t[2].columns[0].generation.as_deref(), Some("upper(ssn)"));
        assert_eq!(
            t[2].kin,
            [
                ("public".to_string(), "users_2024".to_string()),
                ("hr".to_string(), "odd \"]\\".to_string())
            ]
        );
        assert_eq!(
            t[2].definition.as_deref(),
            Some(" SELECT users.ssn FROM users;")
        );
        assert_eq!(t[0].column(2).unwrap().name, "ssn");
        assert_eq!(
            (t[1].schema.as_str(), t[1].columns[0].generated),
            ("hr", true)
        );
        assert!(
            tables_from_rows(&[row(&["x", "a", "b", "1", "c", "25", "f", "d", "[]", "e"])])
                .is_err()
        );
        assert!(
            tables_from_rows(&[row(&["1", "a", "b", "1", "c", "25", "f", "d", "[1]", "e"])])
                .is_err()
        );
        assert!(tables_from_rows(&[vec![None; 10]]).is_err());
        assert!(tables_from_rows(&[row(&["1"])]).is_err());
    }

    #[test]
    fn literals_cannot_break_out() {
        assert_eq!(literal("users"), "E'users'");
        assert_eq!(literal("a'b\\c\0"), "E'a''b\\\\c'");
    }
}
