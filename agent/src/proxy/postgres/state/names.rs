//! What every statement and portal name stands for on the server, and the changes a
//! statement makes to them ([`Effect`]), applied when the server has applied the message.

use std::{collections::HashMap, sync::Arc};

use super::{Masks, MAX_RECORD_TEXT};
use crate::policy::{Classification, NameEffect, PreparedStatements, SqlClass};

/// Which request a statement or portal runs, and the masks for its rows.
#[derive(Debug, Clone)]
pub(super) struct Attribution {
    pub(super) request: u64,
    pub(super) masks: Masks,
    /// Approved by an admin for one execution: later Executes are decided again.
    pub(super) once: bool,
}

/// What a statement or portal name stands for on the server.
#[derive(Debug, Clone)]
pub(super) struct Named {
    /// What running it does.
    pub(super) what: Arc<Classification>,
    /// The text that made it, for the record of an Execute judged on its own.
    pub(super) text: Arc<str>,
    /// The decision on its Parse, which its Executes reuse; `None`: each Execute is judged.
    pub(super) judged: Option<Attribution>,
    /// A cursor declared `WITH HOLD`: it outlives its transaction.
    pub(super) hold: bool,
}

impl Named {
    /// A name the gateway cannot place: it runs something unknown.
    pub(super) fn unknown(reason: String) -> Self {
        Self {
            what: Arc::new(unknown_classification(reason)),
            text: Arc::from(""),
            judged: None,
            hold: false,
        }
    }
}

pub(super) fn unknown_classification(reason: String) -> Classification {
    let mut c = Classification::default();
    c.classes.insert(SqlClass::Unknown);
    c.unknown_reasons.push(reason);
    c
}

/// A change to the names, applied when the server has applied the message behind it.
#[derive(Debug, Clone)]
pub(super) enum Effect {
    SetStatement(String, Named),
    RemoveStatement(String),
    ClearStatements,
    SetPortal(String, Named),
    /// A Bind: the portal runs what the statement stands for when the server binds it.
    BindPortal {
        portal: String,
        statement: String,
    },
    RemovePortal(String),
    ClearPortals,
    /// The transaction ended: its portals are closed (cursors declared `WITH HOLD` stay).
    EndTransaction,
}

impl Effect {
    /// The name this effect makes, if any (a statement: `true`).
    pub(super) fn makes(&self) -> Option<(bool, &str)> {
        match self {
            Effect::SetStatement(name, _) => Some((true, name)),
            Effect::SetPortal(name, _) | Effect::BindPortal { portal: name, .. } => {
                Some((false, name))
            }
            _ => None,
        }
    }
}

/// What every statement and portal name stands for.
#[derive(Debug, Clone, Default)]
pub(super) struct Names {
    pub(super) statements: HashMap<String, Named>,
    pub(super) portals: HashMap<String, Named>,
    /// The statements' classifications, for the classifier's `EXECUTE name`.
    pub(super) prepared: PreparedStatements,
}

impl Names {
    pub(super) fn apply(&mut self, effect: &Effect) {
        match effect {
            Effect::SetStatement(name, named) => {
                self.prepared.insert(name, Arc::clone(&named.what));
                self.statements.insert(name.clone(), named.clone());
            }
            Effect::RemoveStatement(name) => {
                self.prepared.remove(name);
                self.statements.remove(name);
            }
            Effect::ClearStatements => {
                self.prepared.clear();
                self.statements.clear();
            }
            Effect::SetPortal(name, named) => {
                self.portals.insert(name.clone(), named.clone());
            }
            Effect::BindPortal { portal, statement } => {
                let named = self.statements.get(statement).cloned().unwrap_or_else(|| {
                    Named::unknown(format!(
                        "statement {statement:?}, which the gateway did not see prepared"
                    ))
                });
                self.portals.insert(
                    portal.clone(),
                    Named {
                        hold: false,
                        ..named
                    },
                );
            }
            Effect::RemovePortal(name) => {
                self.portals.remove(name);
            }
            Effect::ClearPortals => self.portals.clear(),
            Effect::EndTransaction => self.portals.retain(|_, p| p.hold),
        }
    }

    pub(super) fn statement(&self, name: &str) -> Option<&Named> {
        self.statements.get(name)
    }

    pub(super) fn portal(&self, name: &str) -> Option<&Named> {
        self.portals.get(name)
    }
}

/// `sql` as kept with a name for the record: its first [`MAX_RECORD_TEXT`] bytes.
pub(super) fn record_text(sql: &str) -> Arc<str> {
    if sql.len() <= MAX_RECORD_TEXT {
        return Arc::from(sql);
    }
    let mut end = MAX_RECORD_TEXT;
    while !sql.is_char_boundary(end) {
        end -= 1;
    }
    Arc::from(format!("{}...", &sql[..end]))
}

/// What running a statement classified as `what` does to the names.
pub(super) fn effects_of(what: &Classification, text: &str) -> Vec<Effect> {
    if what.names.is_empty() {
        return Vec::new();
    }
    let text = record_text(text);
    let named = |what: &Arc<Classification>, hold: bool| Named {
        what: Arc::clone(what),
        text: Arc::clone(&text),
        judged: None,
        hold,
    };
    let mut out = Vec::with_capacity(what.names.len());
    for e in &what.names {
        match e {
            NameEffect::Prepare { name, what } => {
                out.push(Effect::SetStatement(name.clone(), named(what, false)));
            }
            NameEffect::Deallocate(Some(name)) => out.push(Effect::RemoveStatement(name.clone())),
            NameEffect::Deallocate(None) => out.push(Effect::ClearStatements),
            NameEffect::Declare { name, what, hold } => {
                out.push(Effect::SetPortal(name.clone(), named(what, *hold)));
            }
            NameEffect::Close(Some(name)) => out.push(Effect::RemovePortal(name.clone())),
            NameEffect::Close(None) => out.push(Effect::ClearPortals),
            NameEffect::DiscardAll => {
                out.push(Effect::ClearStatements);
                out.push(Effect::ClearPortals);
            }
            NameEffect::EndTransaction => out.push(Effect::EndTransaction),
            NameEffect::Fetch(_) => {}
        }
    }
    out
}
