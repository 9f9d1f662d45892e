//! A frontend message, read as far as the session's model needs.

use super::super::{codec, SessionError};

/// A frontend message, read as far as the session's model needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Query {
        sql: &'a str,
    },
    Parse {
        name: &'a str,
        sql: &'a str,
    },
    Bind {
        portal: &'a str,
        statement: &'a str,
    },
    Describe {
        statement: bool,
        name: &'a str,
    },
    Execute {
        portal: &'a str,
    },
    Sync,
    Close {
        statement: bool,
        name: &'a str,
    },
    /// A fastpath function call: it names a function by OID, with nothing to judge it by.
    FunctionCall,
    Terminate,
    /// Flush and COPY data, done or fail: forwarded as they are, not answered on their own.
    Other,
}

impl<'a> Request<'a> {
    /// Reads a frontend message; an unknown tag or a malformed body is the client's error.
    pub fn read(tag: u8, body: &'a [u8]) -> Result<Self, SessionError> {
        let client = SessionError::Client;
        Ok(match tag {
            b'Q' => Request::Query {
                sql: codec::query_text(body).map_err(client)?,
            },
            b'P' => {
                let (name, sql) = codec::parse_message(body).map_err(client)?;
                Request::Parse { name, sql }
            }
            b'B' => {
                let (portal, statement) = codec::bind_names(body).map_err(client)?;
                Request::Bind { portal, statement }
            }
            b'E' => Request::Execute {
                portal: codec::execute_portal(body).map_err(client)?,
            },
            b'S' => Request::Sync,
            b'C' | b'D' => {
                let (kind, name) = codec::close_target(body).map_err(client)?;
                let statement = match kind {
                    b'S' => true,
                    b'P' => false,
                    _ => {
                        return Err(SessionError::Client(codec::CodecError::Malformed {
                            what: "Close or Describe",
                        }))
                    }
                };
                if tag == b'C' {
                    Request::Close { statement, name }
                } else {
                    Request::Describe { statement, name }
                }
            }
            b'F' => Request::FunctionCall,
            b'X' => Request::Terminate,
            b'H' | b'd' | b'c' | b'f' => Request::Other,
            other => return Err(SessionError::UnexpectedFrontend(char::from(other))),
        })
    }
}
