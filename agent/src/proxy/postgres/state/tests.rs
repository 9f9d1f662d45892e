//! The session model driven by plain calls: frontend messages as a client sends them, backend
//! answers as PostgreSQL gives them, and what the client would see and the record would say.

use bytes::{BufMut as _, BytesMut};

use super::*;
use crate::policy::{mask::Detector, MaskRule, MaskStyle, SqlClass};

/// A session's model with what went by.
#[derive(Default)]
struct Session {
    state: State,
    /// Frames forwarded to the target, in order.
    forwarded: Vec<Bytes>,
}

fn frame(tag: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.put_u8(tag);
    b.put_i32(i32::try_from(body.len() + 4).unwrap());
    b.put_slice(body);
    b.freeze()
}

fn cstr(s: &str) -> Vec<u8> {
    [s.as_bytes(), b"\0"].concat()
}

fn bind(portal: &str, statement: &str) -> Bytes {
    // No parameter formats, no parameters, no result formats.
    frame(b'B', &[cstr(portal), cstr(statement), vec![0; 6]].concat())
}

fn execute(portal: &str) -> Bytes {
    frame(b'E', &[cstr(portal), vec![0; 4]].concat())
}

fn sync() -> Bytes {
    frame(b'S', &[])
}

fn allow(request: u64) -> Judged {
    Judged {
        request,
        refusal: None,
        masks: Arc::from([]),
        what: None,
        approved_once: false,
    }
}

fn masked(request: u64) -> Judged {
    Judged {
        masks: Arc::from([Arc::new(MaskRule {
            rule: format!("mask-{request}"),
            ..MaskRule::for_test(&[], &[Detector::Email], MaskStyle::Redact)
        })]),
        ..allow(request)
    }
}

fn deny(request: u64, message: &str) -> Judged {
    Judged {
        refusal: Some(message.into()),
        ..allow(request)
    }
}

fn command_complete(tag: &str) -> (u8, Vec<u8>) {
    (b'C', cstr(tag))
}

fn error(message: &str) -> (u8, Vec<u8>) {
    (b'E', codec::error_response("42601", message)[5..].to_vec())
}

fn ready() -> (u8, Vec<u8>) {
    (b'Z', b"I".to_vec())
}

fn in_transaction() -> (u8, Vec<u8>) {
    (b'Z', b"T".to_vec())
}

/// The response events' request, summary and error, in order.
fn responses(events: &[EventKind]) -> Vec<(u64, Option<String>, Option<String>)> {
    events
        .iter()
        .map(|e| match e {
            EventKind::Response {
                request,
                summary,
                error,
                ..
            } => (*request, summary.clone(), error.clone()),
            other => panic!("not a response: {other:?}"),
        })
        .collect()
}

fn response(
    request: u64,
    summary: Option<&str>,
    error: Option<&str>,
) -> (u64, Option<String>, Option<String>) {
    (request, summary.map(Into::into), error.map(Into::into))
}

/// The SQLSTATE and message of an ErrorResponse frame.
fn error_of(frame: &[u8]) -> (String, String) {
    assert_eq!(frame[0], b'E');
    let fields = codec::error_fields(&frame[5..]);
    let field = |code: u8| {
        fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    (field(b'C'), field(b'M'))
}

impl Session {
    /// The client sends `raw`, decided as `judged` when it needs a decision.
    fn send(&mut self, raw: &Bytes, judged: Option<Judged>) {
        let request = Request::read(raw[0], &raw[5..]).unwrap();
        let out = self
            .state
            .on_frontend(&request, judged)
            .unwrap()
            .unwrap_or_else(|| raw.clone());
        self.forwarded.push(out);
    }

    fn parse(&mut self, name: &str, sql: &str, judged: Judged) {
        self.send(&codec::parse(name, sql), Some(judged));
    }

    fn query(&mut self, sql: &str, judged: Judged) {
        self.send(&codec::query(sql), Some(judged));
    }

    /// Parse, Bind and Execute of one statement under its own name and portal.
    fn statement(&mut self, name: &str, sql: &str, judged: Judged) {
        self.parse(name, sql, judged);
        self.send(&bind(name, name), None);
        self.send(&execute(name), None);
    }

    /// The target answers; what the client gets for each answer.
    fn answer(&mut self, answers: &[(u8, Vec<u8>)]) -> Vec<Bytes> {
        answers
            .iter()
            .map(|(tag, body)| {
                self.state
                    .on_backend(*tag, body)
                    .unwrap()
                    .unwrap_or_else(|| frame(*tag, body))
            })
            .collect()
    }

    /// The stand-in the target received in place of the `n`th forwarded frame (a Parse).
    fn stand_in(&self, n: usize) -> String {
        let (_, sql) = codec::parse_message(&self.forwarded[n][5..]).unwrap();
        assert!(sql.starts_with(DENIED_MARK), "{sql} is not a stand-in");
        sql.to_string()
    }

    fn front_masks_rule(&self) -> Option<(Front, String)> {
        self.state
            .front_masks()
            .map(|(front, masks)| (front, masks[0].rule.clone()))
    }
}

#[test]
fn a_pipeline_of_executes_is_answered_in_order_each_with_its_own_request_and_masks() {
    let mut s = Session::default();
    s.statement("s1", "SELECT email FROM users", masked(1));
    s.statement("s2", "UPDATE t SET x = 1", allow(2));
    s.statement("s3", "SELECT email FROM admins", masked(3));
    s.send(&sync(), None);
    assert_eq!(s.forwarded.len(), 10, "everything forwarded as it came");

    s.answer(&[(b'1', vec![]), (b'2', vec![])]);
    assert_eq!(
        s.front_masks_rule(),
        Some((Front::Execute, "mask-1".into())),
        "the first Execute's rows are masked by the first Parse's rules"
    );
    s.answer(&[command_complete("SELECT 2"), (b'1', vec![]), (b'2', vec![])]);
    assert_eq!(
        s.state.front_masks().map(|m| m.0),
        None,
        "the UPDATE has no masks"
    );
    s.answer(&[command_complete("UPDATE 5"), (b'1', vec![]), (b'2', vec![])]);
    assert_eq!(
        s.front_masks_rule(),
        Some((Front::Execute, "mask-3".into()))
    );
    s.answer(&[command_complete("SELECT 1")]);
    assert_eq!(
        responses(&s.state.take_finished()),
        vec![
            response(1, Some("SELECT 2 (2 rows)"), None),
            response(2, Some("UPDATE 5 (5 rows)"), None),
            response(3, Some("SELECT 1 (1 rows)"), None),
        ],
        "each Execute completes at its CommandComplete"
    );
    s.answer(&[ready()]);
    assert!(
        s.state.take_finished().is_empty(),
        "the Sync records nothing"
    );

    // The Sync's ReadyForQuery emptied the queue: the next request is at the front.
    s.query("SELECT email FROM users", masked(4));
    assert_eq!(s.front_masks_rule(), Some((Front::Query, "mask-4".into())));
}

#[test]
fn a_portal_runs_what_its_statement_was_decided_as_until_it_is_closed() {
    let mut s = Session::default();
    s.query("BEGIN", allow(9));
    s.parse("s1", "SELECT email FROM users", masked(1));
    s.send(&bind("p", "s1"), None);
    s.send(&sync(), None);
    s.answer(&[
        command_complete("BEGIN"),
        in_transaction(),
        (b'1', vec![]),
        (b'2', vec![]),
        in_transaction(),
    ]);
    // Later round trips in the transaction execute the portal (with a row limit) by name.
    s.send(&execute("p"), None);
    s.send(&execute("p"), None);
    s.send(&sync(), None);
    assert_eq!(
        s.front_masks_rule(),
        Some((Front::Execute, "mask-1".into()))
    );
    s.answer(&[
        (b's', vec![]),
        command_complete("SELECT 3"),
        in_transaction(),
    ]);
    assert_eq!(
        responses(&s.state.take_finished()),
        vec![
            response(9, Some("BEGIN (0 rows)"), None),
            response(1, Some("portal suspended (0 rows)"), None),
            response(1, Some("SELECT 3 (3 rows)"), None),
        ]
    );
    // Closed, the names mean nothing: an Execute of them runs nothing the gateway decided,
    // and is refused unless it is decided on its own.
    s.send(&frame(b'C', b"Pp\0"), None);
    s.send(&frame(b'C', b"Ss1\0"), None);
    s.send(&bind("q", "s1"), None);
    s.send(&execute("p"), None);
    s.send(&execute("q"), None);
    s.send(&sync(), None);
    for n in [10, 11] {
        assert!(codec::execute_portal(&s.forwarded[n][5..])
            .unwrap()
            .starts_with(DENIED_MARK));
    }
    assert_eq!(s.state.front_masks().map(|m| m.0), None);
    s.answer(&[
        (b'3', vec![]),
        (b'3', vec![]),
        error("prepared statement \"s1\" does not exist"),
        ready(),
    ]);
    assert!(s.state.take_finished().is_empty(), "nobody's requests");
    assert_eq!(s.state.in_flight(), 0);
}

#[test]
fn after_an_error_the_executes_up_to_the_sync_are_not_executed_and_the_queue_stays_in_step() {
    let mut s = Session::default();
    s.statement("s1", "SELECT 1", allow(1));
    s.statement("s2", "SELECT broken(", allow(2));
    s.statement("s3", "DELETE FROM t", allow(3));
    s.statement("s4", "SELECT 4", allow(4));
    s.send(&sync(), None);
    s.statement("s5", "SELECT email FROM users", masked(5));
    s.send(&sync(), None);

    // PostgreSQL: s1 runs, s2's Parse fails, everything else up to the Sync is skipped.
    s.answer(&[
        (b'1', vec![]),
        (b'2', vec![]),
        command_complete("SELECT 1"),
        error("syntax error at end of input"),
    ]);
    assert_eq!(
        responses(&s.state.take_finished()),
        vec![
            response(1, Some("SELECT 1 (1 rows)"), None),
            response(2, None, Some("syntax error at end of input")),
            response(3, None, Some("not executed: an earlier message failed")),
            response(4, None, Some("not executed: an earlier message failed")),
        ],
        "the error completes the Parse it stopped; what the server skips is recorded at once"
    );
    s.answer(&[ready()]);
    assert!(s.state.take_finished().is_empty());

    // The next Sync's round: its Execute is at the front, with its own masks.
    s.answer(&[(b'1', vec![]), (b'2', vec![])]);
    assert_eq!(
        s.front_masks_rule(),
        Some((Front::Execute, "mask-5".into()))
    );
    s.answer(&[command_complete("SELECT 1"), ready()]);
    assert_eq!(
        responses(&s.state.take_finished()),
        vec![response(5, Some("SELECT 1 (1 rows)"), None)]
    );
    assert!(s.state.front_masks().is_none() && s.state.pending.is_empty());
}

#[test]
fn a_denied_statement_is_answered_in_its_place_with_the_policys_message() {
    let mut s = Session::default();
    s.statement("s1", "SELECT 1", allow(1));
    s.statement("s2", "DELETE FROM orders", deny(2, "no deletes here"));
    s.statement("s3", "SELECT 3", allow(3));
    s.send(&sync(), None);
    // The denied Parse went to the target as a stand-in; everything else as it came.
    let stand_in = s.stand_in(3);
    assert_eq!(s.forwarded[0], codec::parse("s1", "SELECT 1"));
    assert_eq!(s.forwarded[4], bind("s2", "s2"));

    // The target's answers: s1 runs; the stand-in fails to parse; the rest is skipped.
    let parse_error = error(&format!("syntax error at or near \"{stand_in}\""));
    let seen = s.answer(&[
        (b'1', vec![]),
        (b'2', vec![]),
        command_complete("SELECT 1"),
        parse_error.clone(),
        ready(),
    ]);
    assert_eq!(
        seen[2],
        frame(b'C', &cstr("SELECT 1")),
        "earlier answers unchanged"
    );
    assert_eq!(
        error_of(&seen[3]),
        ("42501".into(), "bulkhead: no deletes here".into()),
        "the stand-in's error becomes the policy's, in the denied statement's place"
    );
    assert_eq!(seen[4], frame(b'Z', b"I"));
    assert_eq!(
        responses(&s.state.take_finished()),
        vec![
            response(1, Some("SELECT 1 (1 rows)"), None),
            response(2, None, Some("denied: bulkhead: no deletes here")),
            response(3, None, Some("not executed: an earlier message failed")),
        ]
    );

    // Later answers are the target's own: a real error, even one that names the spent
    // stand-in, reaches the client as the target sent it.
    s.query("SELECT 1/0", allow(4));
    s.query(&format!("SELECT {stand_in}"), allow(5));
    let division = error("division by zero");
    let seen = s.answer(&[division.clone(), ready(), parse_error.clone(), ready()]);
    assert_eq!(seen[0], frame(b'E', &division.1));
    assert_eq!(seen[2], frame(b'E', &parse_error.1));
    assert_eq!(
        responses(&s.state.take_finished()),
        vec![
            response(4, None, Some("division by zero")),
            response(
                5,
                None,
                Some(&format!("syntax error at or near \"{stand_in}\""))
            ),
        ]
    );
}

#[test]
fn a_denied_simple_query_is_replaced_whole_and_its_message_says_it_is_the_gateways() {
    let mut s = Session::default();
    s.query("DROP TABLE t; SELECT 1", deny(7, "bulkhead: no DDL"));
    s.send(&frame(b'F', &[0; 10]), Some(deny(8, "no fastpath")));
    let stand_in = |n: usize| codec::query_text(&s.forwarded[n][5..]).unwrap().to_string();
    let (first, second) = (stand_in(0), stand_in(1));
    assert!(first.starts_with(DENIED_MARK) && second.starts_with(DENIED_MARK));
    assert_ne!(first, second, "each stand-in has its own nonce");
    let seen = s.answer(&[
        error(&format!("syntax error at or near \"{first}\"")),
        ready(),
        error(&format!("syntax error at or near \"{second}\"")),
        ready(),
    ]);
    assert_eq!(
        error_of(&seen[0]),
        ("42501".into(), "bulkhead: no DDL".into())
    );
    assert_eq!(
        error_of(&seen[2]),
        ("42501".into(), "bulkhead: no fastpath".into())
    );
    assert_eq!(
        responses(&s.state.take_finished()),
        vec![
            response(7, None, Some("denied: bulkhead: no DDL")),
            response(8, None, Some("denied: bulkhead: no fastpath")),
        ]
    );
}

#[test]
fn a_simple_query_of_several_statements_completes_at_its_ready_for_query() {
    let mut s = Session::default();
    s.query("SELECT 1; UPDATE t SET x = 1; SELECT 2", masked(1));
    s.query("SELECT 1; SELECT 1/0; SELECT 3", allow(2));
    assert_eq!(s.front_masks_rule(), Some((Front::Query, "mask-1".into())));
    s.answer(&[
        (b'T', vec![0, 0]),
        (b'D', vec![0, 0]),
        command_complete("SELECT 1"),
        command_complete("UPDATE 4"),
        (b'T', vec![0, 0]),
        command_complete("SELECT 0"),
    ]);
    assert!(
        s.state.take_finished().is_empty(),
        "a simple query is not complete before its ReadyForQuery"
    );
    assert_eq!(
        s.front_masks_rule(),
        Some((Front::Query, "mask-1".into())),
        "the rows of every statement in the message are masked by its rules"
    );
    s.answer(&[ready()]);
    assert_eq!(
        responses(&s.state.take_finished()),
        vec![response(
            1,
            Some("SELECT 1; UPDATE 4; SELECT 0 (5 rows)"),
            None
        )]
    );
    assert!(
        s.state.front_masks().is_none(),
        "the next query has no masks"
    );
    // An error stops the message; what ran before it is kept with the error.
    s.answer(&[
        command_complete("SELECT 1"),
        error("division by zero"),
        ready(),
    ]);
    assert_eq!(
        responses(&s.state.take_finished()),
        vec![response(
            2,
            Some("SELECT 1 (1 rows)"),
            Some("division by zero")
        )]
    );
    assert!(s.state.pending.is_empty());
}

#[test]
fn a_statement_without_a_decision_is_refused() {
    let mut s = Session::default();
    s.send(&codec::query("DELETE FROM t"), None);
    s.send(&codec::parse("s", "DELETE FROM t"), None);
    assert!(codec::query_text(&s.forwarded[0][5..])
        .unwrap()
        .starts_with(DENIED_MARK));
    s.stand_in(1);
}

#[test]
fn frontend_messages_are_read_and_unknown_or_malformed_ones_are_errors() {
    assert_eq!(
        Request::read(b'B', b"p\0s\0\0\0\0\0\0\0").unwrap(),
        Request::Bind {
            portal: "p",
            statement: "s"
        }
    );
    assert_eq!(
        Request::read(b'C', b"Sname\0").unwrap(),
        Request::Close {
            statement: true,
            name: "name"
        }
    );
    assert_eq!(Request::read(b'H', b"").unwrap(), Request::Other);
    assert!(matches!(
        Request::read(b'Q', b"no terminator"),
        Err(SessionError::Client(_))
    ));
    assert!(matches!(
        Request::read(b'p', b"password\0"),
        Err(SessionError::UnexpectedFrontend('p'))
    ));
}

#[test]
fn extended_messages_without_a_sync_make_a_simple_query_mid_batch() {
    let mut s = Session::default();
    assert!(!s.state.mid_batch());
    s.query("SELECT 1", allow(1));
    assert!(!s.state.mid_batch(), "simple queries alone");
    s.statement("a", "SELECT 2", allow(2));
    assert!(
        s.state.mid_batch(),
        "Parse, Bind and Execute without a Sync"
    );
    s.send(&sync(), None);
    assert!(!s.state.mid_batch(), "a Sync ends the batch");
    s.send(&bind("", "a"), None);
    assert!(s.state.mid_batch(), "a Bind alone starts one");
}

#[test]
fn a_statement_approved_by_an_admin_runs_once_and_its_later_executes_are_decided_again() {
    let mut s = Session::default();
    let approved = Judged {
        approved_once: true,
        ..allow(1)
    };
    s.parse("d", "DELETE FROM precious WHERE id = 1", approved);
    s.send(&bind("", "d"), None);
    assert!(
        s.state.to_judge("").is_none(),
        "the approval covers one run"
    );
    s.send(&execute(""), None);
    s.send(&sync(), None);
    assert_eq!(codec::execute_portal(&s.forwarded[2][5..]).unwrap(), "");
    s.answer(&[
        (b'1', vec![]),
        (b'2', vec![]),
        command_complete("DELETE 1"),
        ready(),
    ]);
    // Again: the relay must decide it again; undecided, it is refused in place.
    s.send(&bind("", "d"), None);
    let again = s.state.to_judge("").expect("decided again");
    assert!(
        again.text.contains("DELETE FROM precious"),
        "{}",
        again.text
    );
    s.send(&execute(""), None);
    assert!(codec::execute_portal(&s.forwarded[5][5..])
        .unwrap()
        .starts_with(DENIED_MARK));
    // Decided again (approved again, say), it runs.
    s.send(&execute(""), Some(allow(2)));
    assert_eq!(codec::execute_portal(&s.forwarded[6][5..]).unwrap(), "");
}

#[test]
fn what_a_name_keeps_is_bounded() {
    let mut s = Session::default();
    // A statement that runs a prepared statement is classified again at each Execute from
    // its text, kept up to a bound: past it, the statement is unknown.
    let executes = Arc::new(Classification {
        uses_prepared: true,
        ..Classification::default()
    });
    let long = format!("EXECUTE s('{}')", "x".repeat(MAX_REJUDGED_TEXT));
    s.parse(
        "e",
        &long,
        Judged {
            what: Some(Arc::clone(&executes)),
            ..allow(1)
        },
    );
    s.send(&bind("p", "e"), None);
    let judge = s.state.to_judge("p").expect("judged at each Execute");
    assert!(judge.what.classes.contains(&SqlClass::Unknown));
    // Otherwise only the start of a statement's text is kept, for the record.
    s.parse(
        "f",
        &format!("SELECT '{}'", "y".repeat(4000)),
        Judged {
            what: Some(Arc::new(Classification::default())),
            approved_once: true,
            ..allow(2)
        },
    );
    s.send(&bind("q", "f"), None);
    s.send(&execute("q"), None);
    s.send(&bind("r", "f"), None);
    let judge = s
        .state
        .to_judge("r")
        .expect("approved once, then judged again");
    assert!(judge.text.len() < 1200, "{}", judge.text.len());
}

mod random_sequences {
    //! Random message sequences between a client and a model of PostgreSQL
    //! ([`super::super::sim`]), with the errors PostgreSQL produces (duplicate names, missing
    //! names, failed transactions, statements that fail when they run, denied statements'
    //! stand-ins), answers read at random points: no row with the masked value reaches the
    //! client unmasked, the denied DELETE never runs, and the gateway never loses track.

    use proptest::prelude::*;

    use super::super::sim::{check, ops_from_bytes, Op, PORTALS, SQL, STATEMENTS};

    fn op() -> impl Strategy<Value = Op> {
        let s = STATEMENTS.len();
        let p = PORTALS.len();
        let q = SQL.len();
        prop_oneof![
            3 => (0..s, 0..q).prop_map(|(n, q)| Op::Parse(n, q)),
            3 => (0..p, 0..s).prop_map(|(p, n)| Op::Bind(p, n)),
            1 => (any::<bool>(), 0..3usize).prop_map(|(k, n)| Op::Describe(k, n)),
            3 => (0..p).prop_map(Op::Execute),
            1 => (any::<bool>(), 0..3usize).prop_map(|(k, n)| Op::Close(k, n)),
            3 => Just(Op::Sync),
            3 => (0..q).prop_map(Op::Query),
            3 => (0..8usize).prop_map(Op::Deliver),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn no_row_goes_out_unmasked_and_the_queue_never_drifts(
            ops in proptest::collection::vec(op(), 1..60)
        ) {
            check(&ops);
        }

        /// The fuzz target's input (`agent/fuzz`, `pg_state`), read from raw bytes.
        #[test]
        fn the_fuzz_targets_byte_sequences_hold_too(
            data in proptest::collection::vec(any::<u8>(), 0..120)
        ) {
            check(&ops_from_bytes(&data));
        }
    }

    /// The sequences that were bypasses before the model followed the server.
    #[test]
    fn known_bypasses_stay_closed() {
        use Op::*;
        let secret = 0; // SELECT secret FROM users
        let plain = 1;
        let delete = 3;
        let cases: Vec<Vec<Op>> = vec![
            // A re-Parse of an existing name that the server refuses.
            vec![
                Parse(1, secret),
                Sync,
                Deliver(9),
                Parse(1, plain),
                Sync,
                Deliver(9),
                Bind(1, 1),
                Execute(1),
                Sync,
            ],
            // The same, pipelined.
            vec![
                Parse(1, secret),
                Sync,
                Parse(1, plain),
                Sync,
                Bind(1, 1),
                Execute(1),
                Sync,
            ],
            // A denied re-Parse.
            vec![
                Parse(1, secret),
                Sync,
                Parse(1, delete),
                Bind(1, 1),
                Execute(1),
                Sync,
                Bind(1, 1),
                Execute(1),
                Sync,
            ],
            // A Close skipped after an error.
            vec![
                Parse(1, secret),
                Sync,
                Bind(1, 2),
                Close(true, 1),
                Sync,
                Bind(2, 1),
                Execute(2),
                Sync,
            ],
            // PREPARE by SQL, run by Bind/Execute; DECLARE, run by Execute and FETCH.
            vec![Query(4), Bind(0, 1), Execute(0), Sync],
            vec![Query(20), Query(9), Execute(1), Sync, Query(13)],
        ];
        for ops in cases {
            check(&ops);
        }
    }
}
