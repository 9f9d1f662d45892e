//! Reading DNS messages for the record: the questions of a query, the answers of a reply.
//!
//! Parsed with `simple-dns`, after a check that the header's section counts fit the message
//! (the parser reserves room for every record the header announces), and behind
//! `catch_unwind`: a message that cannot be read is an error, never a panic.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use simple_dns::{rdata::RData, Packet, PacketFlag, OPCODE, QTYPE, RCODE};

/// Largest query the forwarder relays (a question and EDNS options fit in far less).
pub const MAX_MESSAGE: usize = 4096;
/// Largest reply it delivers: any UDP payload (a client may offer an EDNS0 buffer that big).
pub const MAX_REPLY: usize = 65_535;
/// Most questions, and most answers, written into one event.
const MAX_LISTED: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("not a DNS message: {0}")]
    Malformed(String),
    #[error("a DNS response where a query was expected")]
    NotAQuery,
    #[error("a DNS query where a response was expected")]
    NotAResponse,
    #[error("DNS opcode {0} is not a standard query")]
    Opcode(String),
    #[error("a DNS query without a question")]
    NoQuestion,
}

/// A query as recorded: its id and its questions (`example.com A`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    pub questions: Vec<String>,
}

impl Query {
    /// The request text: the questions, comma-separated.
    pub fn text(&self) -> String {
        self.questions.join(", ")
    }
}

/// A reply as recorded: its id, response code, whether it was truncated, and its answers
/// (`example.com A 192.0.2.1`, `www.example.com CNAME example.com`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub id: u16,
    pub rcode: String,
    pub truncated: bool,
    pub answers: Vec<String>,
    /// The addresses among the answers (A and AAAA records).
    pub addresses: Vec<std::net::IpAddr>,
}

impl Reply {
    /// The response summary: `NOERROR: example.com A 192.0.2.1`.
    pub fn summary(&self) -> String {
        let mut out = self.rcode.clone();
        if self.truncated {
            out.push_str(" (truncated)");
        }
        if !self.answers.is_empty() {
            out.push_str(": ");
            out.push_str(&self.answers.join(", "));
        }
        out
    }
}

/// The message's id, or `None` when it is shorter than a header.
pub fn id(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]))
}

/// Each question takes at least 5 bytes (root name, type, class), each record 11: a header
/// announcing more than the message can hold is refused before anything is allocated for it.
fn counts_fit(bytes: &[u8], max: usize) -> Result<(), MessageError> {
    if bytes.len() < 12 {
        return Err(MessageError::Malformed("shorter than a header".into()));
    }
    if bytes.len() > max {
        return Err(MessageError::Malformed(format!(
            "{} bytes, more than {max}",
            bytes.len()
        )));
    }
    let count = |at: usize| usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
    let need = 12 + 5 * count(4) + 11 * (count(6) + count(8) + count(10));
    if need > bytes.len() {
        return Err(MessageError::Malformed(
            "the header announces more records than the message holds".into(),
        ));
    }
    Ok(())
}

fn parse(bytes: &[u8], max: usize) -> Result<Packet<'_>, MessageError> {
    counts_fit(bytes, max)?;
    match std::panic::catch_unwind(|| Packet::parse(bytes)) {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(MessageError::Malformed(e.to_string())),
        Err(_) => Err(MessageError::Malformed("the parser failed".into())),
    }
}

/// The response code as `dig` and the RFCs name it.
fn rcode_name(rcode: RCODE) -> String {
    match rcode {
        RCODE::NoError => "NOERROR".into(),
        RCODE::FormatError => "FORMERR".into(),
        RCODE::ServerFailure => "SERVFAIL".into(),
        RCODE::NameError => "NXDOMAIN".into(),
        RCODE::NotImplemented => "NOTIMP".into(),
        RCODE::Refused => "REFUSED".into(),
        other => format!("{other:?}").to_uppercase(),
    }
}

fn qtype_name(q: QTYPE) -> String {
    match q {
        QTYPE::TYPE(t) => format!("{t:?}"),
        other => format!("{other:?}"),
    }
}

/// Reads a query a governed process sent.
pub fn parse_query(bytes: &[u8]) -> Result<Query, MessageError> {
    let p = parse(bytes, MAX_MESSAGE)?;
    if p.has_flags(PacketFlag::RESPONSE) {
        return Err(MessageError::NotAQuery);
    }
    if p.opcode() != OPCODE::StandardQuery {
        return Err(MessageError::Opcode(format!("{:?}", p.opcode())));
    }
    if p.questions.is_empty() {
        return Err(MessageError::NoQuestion);
    }
    let mut questions: Vec<String> = p
        .questions
        .iter()
        .take(MAX_LISTED)
        .map(|q| format!("{} {}", q.qname, qtype_name(q.qtype)))
        .collect();
    if p.questions.len() > MAX_LISTED {
        questions.push(format!("… {} more", p.questions.len() - MAX_LISTED));
    }
    Ok(Query {
        id: p.id(),
        questions,
    })
}

/// Reads a resolver's reply.
pub fn parse_reply(bytes: &[u8]) -> Result<Reply, MessageError> {
    let p = parse(bytes, MAX_REPLY)?;
    if !p.has_flags(PacketFlag::RESPONSE) {
        return Err(MessageError::NotAResponse);
    }
    let mut answers = Vec::new();
    let mut addresses = Vec::new();
    for rr in &p.answers {
        let mut line = format!("{} ", rr.name);
        match &rr.rdata {
            RData::A(a) => {
                let ip = Ipv4Addr::from(a.address);
                addresses.push(ip.into());
                let _ = write!(line, "A {ip}");
            }
            RData::AAAA(a) => {
                let ip = Ipv6Addr::from(a.address);
                addresses.push(ip.into());
                let _ = write!(line, "AAAA {ip}");
            }
            RData::CNAME(c) => {
                let _ = write!(line, "CNAME {}", c.0);
            }
            other => {
                let _ = write!(line, "{:?}", other.type_code());
            }
        }
        if answers.len() < MAX_LISTED {
            answers.push(line);
        }
    }
    if p.answers.len() > MAX_LISTED {
        answers.push(format!("… {} more", p.answers.len() - MAX_LISTED));
    }
    Ok(Reply {
        id: p.id(),
        rcode: rcode_name(p.rcode()),
        truncated: p.has_flags(PacketFlag::TRUNCATION),
        answers,
        addresses,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use simple_dns::{rdata, Name, Question, ResourceRecord, CLASS, QCLASS, TYPE};

    use super::*;

    pub(crate) fn query(id: u16, name: &str, t: TYPE) -> Vec<u8> {
        let mut p = Packet::new_query(id);
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(t),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.build_bytes_vec().unwrap()
    }

    pub(crate) fn reply(id: u16, name: &str, v4: [u8; 4]) -> Vec<u8> {
        let mut p = Packet::new_reply(id);
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.answers.push(ResourceRecord::new(
            Name::new_unchecked("alias.example"),
            CLASS::IN,
            60,
            RData::CNAME(rdata::CNAME(Name::new_unchecked(name))),
        ));
        p.answers.push(ResourceRecord::new(
            Name::new_unchecked(name),
            CLASS::IN,
            60,
            RData::A(rdata::A {
                address: u32::from_be_bytes(v4),
            }),
        ));
        p.build_bytes_vec().unwrap()
    }

    #[test]
    fn queries_and_replies_are_read() {
        let q = parse_query(&query(7, "db.example", TYPE::AAAA)).unwrap();
        assert_eq!(q.id, 7);
        assert_eq!(q.text(), "db.example AAAA");
        let r = parse_reply(&reply(7, "db.example", [192, 0, 2, 9])).unwrap();
        assert_eq!(r.id, 7);
        assert_eq!(
            r.summary(),
            "NOERROR: alias.example CNAME db.example, db.example A 192.0.2.9"
        );
        assert_eq!(r.addresses, vec![std::net::IpAddr::from([192, 0, 2, 9])]);
    }

    #[test]
    fn what_is_not_a_query_is_refused_without_panicking() {
        assert!(parse_query(b"q").is_err());
        assert!(parse_query(&[0; 11]).is_err());
        assert_eq!(
            parse_query(&reply(1, "a.example", [1, 2, 3, 4])),
            Err(MessageError::NotAQuery)
        );
        assert!(parse_reply(&query(1, "a.example", TYPE::A)).is_err());
        // A header announcing 65535 records in 12 bytes.
        let mut lying = vec![0u8; 12];
        lying[6] = 0xff;
        lying[7] = 0xff;
        assert!(matches!(
            parse_query(&lying),
            Err(MessageError::Malformed(_))
        ));
        // No question.
        assert_eq!(parse_query(&[0; 12]), Err(MessageError::NoQuestion));
        // Every prefix of a valid message, and every single-byte corruption, is an error or a
        // message, never a panic.
        let good = reply(9, "x.example", [10, 0, 0, 1]);
        for n in 0..good.len() {
            let _ = parse_reply(&good[..n]);
            let _ = parse_query(&good[..n]);
        }
        for i in 0..good.len() {
            for b in [0u8, 0x3f, 0xc0, 0xff] {
                let mut bad = good.clone();
                bad[i] = b;
                let _ = parse_reply(&bad);
                let _ = parse_query(&bad);
            }
        }
        assert!(parse_query(&vec![0u8; MAX_MESSAGE + 1]).is_err());
    }
}
