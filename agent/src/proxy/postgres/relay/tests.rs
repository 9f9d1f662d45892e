//! The relay loops over in-memory streams (`tokio::io::duplex`): a scripted client on one
//! side, a fake target on the other that answers each round with recorded backend frames.

use std::{collections::HashMap, future::Future, net::SocketAddr};

use bytes::{BufMut as _, BytesMut};
use tokio::io::{split, AsyncReadExt as _, DuplexStream};

use super::*;
use crate::{
    approval::{ApprovalBroker, Approver},
    config::{Config, Source},
    ebpf::MockOrigDst,
    identity::{ProcReader, ProcessIdentity},
    net::{ClientAddr, OrigDstAddr},
    policy::PolicyHandle,
    proxy::{postgres::codec::Frame, Gateway},
    record::{now_micros, NewSession, SessionId, SessionStore, SledStore},
};

const POLICY: &str = r#"
[[target]]
protocol = "postgres"
default = "allow"

[[rule]]
id = "no-deletes"
verdict = "deny"
message = "no deletes here"
target = { protocol = ["postgres"] }
sql = { class = ["delete"] }

[[rule]]
id = "truncates"
verdict = "approve"
target = { protocol = ["postgres"] }
sql = { class = ["truncate"] }

[[rule]]
id = "emails"
verdict = "mask"
target = { protocol = ["postgres"] }
mask = { detectors = ["email"], style = "redact" }
"#;

/// Where the governed client connected: never dialled, the fake target stands in for it.
fn destination() -> OrigDstAddr {
    OrigDstAddr("192.0.2.10:5432".parse().unwrap())
}

fn gateway(policies: &tempfile::TempDir) -> Gateway {
    std::fs::write(policies.path().join("test.toml"), POLICY).unwrap();
    let config = Config::from_toml(
        &format!(
            "[[target]]\nname = \"db\"\naddresses = [\"{}\"]\nprotocol = \"postgres\"\n\
             postgres = {{ auth = [\"none\"] }}\n",
            destination()
        ),
        Source::Embedded,
    )
    .unwrap();
    let store: Arc<dyn SessionStore> = Arc::new(SledStore::temporary().unwrap());
    Gateway {
        approvals: Arc::new(ApprovalBroker::new(Arc::clone(&store), config.approvals)),
        config: Arc::new(config).into(),
        orig_dst: Arc::new(MockOrigDst::default()),
        store,
        proc: ProcReader::new("/", "/none"),
        stats: Arc::default(),
        policy: PolicyHandle::open(policies.path()).unwrap(),
        tls: None,
    }
}

/// A session under `config` (the gateway's, taken once as a connection takes it).
fn conn<'a>(gw: &'a Gateway, config: &'a Config) -> Conn<'a> {
    let client = ClientAddr(SocketAddr::from(([127, 0, 0, 1], 40000)));
    let target = config.resolve(destination());
    let session = gw
        .store
        .open(NewSession {
            started_at_us: now_micros(),
            client,
            destination: destination(),
            target: Some(target.name.to_string()),
            protocol: target.protocol,
            identity: ProcessIdentity::default(),
        })
        .unwrap();
    Conn {
        gw,
        client,
        destination: destination(),
        identity: ProcessIdentity::default(),
        session,
        target,
        memo: crate::proxy::session::DecisionMemo::default(),
    }
}

fn login() -> catalog::Login {
    catalog::Login {
        addr: destination(),
        pg: super::super::settings::PostgresTarget::default(),
        user: "app".into(),
        database: "app".into(),
        password: None,
    }
}

/// Runs the relay of a logged-in session between a client stream and a target stream.
async fn relay(conn: &Conn<'_>, client: DuplexStream, target: DuplexStream) -> SessionEnd {
    let (client_reader, client_writer) = split(client);
    let (target_reader, target_writer) = split(target);
    let catalogs = Catalogs::default();
    Relay::new(conn, &catalogs, login())
        .run(
            Leg::new(
                FrameReader::new(client_reader, "client", codec::MAX_FRONTEND),
                target_writer,
            ),
            Leg::new(
                FrameReader::new(target_reader, "target", codec::MAX_BACKEND),
                client_writer,
            ),
            0,
        )
        .await
}

/// What a session relayed between a scripted client and a fake target left behind.
struct Relayed<T> {
    end: SessionEnd,
    /// Every frame the target received.
    received: Vec<Frame>,
    /// What the client's script returned.
    client: T,
    /// Each recorded result with its request's text and verdict, in order.
    results: Vec<(String, RecordedVerdict, Option<String>, Option<String>)>,
}

/// Relays one logged-in session under [`POLICY`] between `client` (a script over the
/// client's end of the connection) and a fake target that answers with `answer`.
async fn relayed<T, F: Future<Output = T>>(
    answer: impl FnMut(&[Frame]) -> Vec<Bytes>,
    client: impl FnOnce(DuplexStream) -> F,
) -> Relayed<T> {
    let policies = tempfile::tempdir().unwrap();
    let gw = gateway(&policies);
    let config = gw.config.current();
    let conn = conn(&gw, &config);
    let (client_end, gw_client) = tokio::io::duplex(64 * 1024);
    let (gw_target, target_end) = tokio::io::duplex(64 * 1024);
    let (end, received, client) = tokio::join!(
        relay(&conn, gw_client, gw_target),
        fake_target(target_end, answer),
        client(client_end)
    );
    Relayed {
        end,
        received,
        client,
        results: results(gw.store.as_ref(), conn.session),
    }
}

/// A fake target: reads rounds of frames (up to a Sync or a Query), answers each with
/// `answer(round)`, and stops at Terminate or EOF. Returns every frame it received.
async fn fake_target(
    io: DuplexStream,
    mut answer: impl FnMut(&[Frame]) -> Vec<Bytes>,
) -> Vec<Frame> {
    let (r, mut w) = split(io);
    let mut reader = FrameReader::new(r, "client", codec::MAX_FRONTEND);
    let mut received = Vec::new();
    let mut round = Vec::new();
    while let Some(frame) = reader.next().await.unwrap() {
        received.push(frame.clone());
        if frame.tag == b'X' {
            break;
        }
        let ends_round = matches!(frame.tag, b'S' | b'Q');
        round.push(frame);
        if ends_round {
            for out in answer(&round) {
                w.write_all(&out).await.unwrap();
            }
            round.clear();
        }
    }
    received
}

/// Every frame until ReadyForQuery, included.
async fn read_until_ready<R: AsyncRead + Unpin>(reader: &mut FrameReader<R>) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some(f) = reader.next().await.unwrap() {
        let ready = f.tag == b'Z';
        frames.push(f);
        if ready {
            break;
        }
    }
    frames
}

fn frame(tag: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(tag);
    b.put_i32(i32::try_from(body.len() + 4).unwrap());
    b.put_slice(body);
    b.freeze()
}

fn bind_execute() -> Vec<Bytes> {
    vec![frame(b'B', b"\0\0\0\0\0\0\0\0"), frame(b'E', b"\0\0\0\0\0")]
}

/// Each recorded result with its request's text and verdict, in the requests' order: a
/// `response` event, or the result written into its request while that waited unwritten.
fn results(
    store: &dyn SessionStore,
    session: SessionId,
) -> Vec<(String, RecordedVerdict, Option<String>, Option<String>)> {
    let events = store.events(session).unwrap();
    let requests: HashMap<u64, (String, RecordedVerdict)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Request { text, verdict, .. } => Some((e.id, (text.clone(), *verdict))),
            _ => None,
        })
        .collect();
    let mut out: Vec<(u64, _)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Response {
                request,
                summary,
                error,
                ..
            } => {
                let (text, verdict) = requests[request].clone();
                Some((*request, (text, verdict, summary.clone(), error.clone())))
            }
            EventKind::Request {
                text,
                verdict,
                duration_us: Some(_),
                summary,
                error,
                ..
            } => Some((
                e.id,
                (text.clone(), *verdict, summary.clone(), error.clone()),
            )),
            _ => None,
        })
        .collect();
    out.sort_by_key(|(request, _)| *request);
    out.into_iter().map(|(_, result)| result).collect()
}

/// A held statement's NOTICE reaches the client while the statement waits, each time: the
/// target side finds it in the pass that queued it, with no waker of its own (`Relay::run`
/// polls the client side first). Eight holds, so an order that left it to chance would fail.
#[tokio::test]
async fn a_held_statement_is_told_to_the_client_while_it_waits() {
    let policies = tempfile::tempdir().unwrap();
    let gw = gateway(&policies);
    let config = gw.config.current();
    let conn = conn(&gw, &config);
    let (client_end, gw_client) = tokio::io::duplex(64 * 1024);
    let (gw_target, target_end) = tokio::io::duplex(64 * 1024);
    let answer = |_: &[Frame]| vec![frame(b'C', b"TRUNCATE TABLE\0"), frame(b'Z', b"I")];
    let approvals = &gw.approvals;
    let client = async move {
        let (r, mut w) = split(client_end);
        let mut reader = FrameReader::new(r, "target", codec::MAX_BACKEND);
        for _ in 0..8 {
            w.write_all(&codec::query("TRUNCATE t")).await.unwrap();
            let told = tokio::time::timeout(Duration::from_secs(5), reader.next())
                .await
                .expect("the client is told while the statement waits")
                .unwrap()
                .unwrap();
            assert_eq!(told.tag, b'N', "a NOTICE first");
            assert!(
                String::from_utf8_lossy(&told.body).contains("waits for an admin's approval"),
                "{told:?}"
            );
            let pending = approvals.list_pending();
            assert_eq!(pending.len(), 1, "{pending:?}");
            approvals
                .approve(pending[0].id, Approver::from_uid(0), None, None)
                .unwrap();
            let answers = read_until_ready(&mut reader).await;
            let tags: Vec<u8> = answers.iter().map(|f| f.tag).collect();
            assert_eq!(tags, b"CZ", "then the target's answer");
        }
        w.write_all(&codec::terminate()).await.unwrap();
    };
    let (end, received, ()) = tokio::join!(
        relay(&conn, gw_client, gw_target),
        fake_target(target_end, answer),
        client
    );
    assert_eq!(end.outcome, Outcome::Closed, "{end:?}");
    let queries = received.iter().filter(|f| f.tag == b'Q').count();
    assert_eq!(queries, 8, "each statement ran once approved");
}

#[tokio::test]
async fn a_pipeline_with_a_denied_statement_is_answered_in_order_masked_and_recorded() {
    let answer = |round: &[Frame]| {
        // The denied Parse arrives as a stand-in; the target's parse error names it.
        let (_, stand_in) = codec::parse_message(&round[3].body).unwrap();
        let mut row = BytesMut::new();
        row.put_i16(1);
        row.put_i32(15);
        row.put_slice(b"bob@example.com");
        vec![
            frame(b'1', b""),
            frame(b'2', b""),
            frame(b'D', &row),
            frame(b'C', b"SELECT 1\0"),
            codec::error_response("42601", &format!("syntax error at or near \"{stand_in}\"")),
            frame(b'Z', b"I"),
        ]
    };
    let client = |client| async move {
        let (r, mut w) = split(client);
        let mut reader = FrameReader::new(r, "target", codec::MAX_BACKEND);
        let mut pipeline = vec![codec::parse("", "SELECT email FROM users")];
        pipeline.extend(bind_execute());
        pipeline.push(codec::parse("", "DELETE FROM orders"));
        pipeline.extend(bind_execute());
        pipeline.push(codec::parse("", "SELECT 3"));
        pipeline.extend(bind_execute());
        pipeline.push(frame(b'S', b""));
        w.write_all(&pipeline.concat()).await.unwrap();
        let answers = read_until_ready(&mut reader).await;
        w.write_all(&codec::terminate()).await.unwrap();
        let mut rest = Vec::new();
        reader.get_mut().read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing after the session's end");
        answers
    };
    let Relayed {
        end,
        received,
        client: answers,
        results,
    } = relayed(answer, client).await;

    let texts: Vec<String> = received
        .iter()
        .filter(|f| f.tag == b'P')
        .map(|f| codec::parse_message(&f.body).unwrap().1.to_string())
        .collect();
    assert_eq!(texts[0], "SELECT email FROM users");
    assert!(
        texts[1].starts_with("BULKHEAD_DENIED_"),
        "the DELETE never reaches the target"
    );
    assert_eq!(texts[2], "SELECT 3");
    assert_eq!(
        received.last().unwrap().tag,
        b'X',
        "the client's Terminate is passed on"
    );

    let tags: Vec<u8> = answers.iter().map(|f| f.tag).collect();
    assert_eq!(tags, b"12DCEZ");
    assert_eq!(
        codec::data_row_values(&answers[2].body).unwrap(),
        vec![Some(&b"[redacted]"[..])],
        "the first statement's rows are masked by its rules"
    );
    let error: HashMap<u8, String> = codec::error_fields(&answers[4].body).into_iter().collect();
    assert_eq!(error[&b'C'], "42501");
    assert_eq!(error[&b'M'], "bulkhead: no deletes here");

    assert_eq!(end.outcome, Outcome::Closed);
    let sent: usize = received.iter().map(|f| f.raw.len()).sum();
    let got: usize = answers.iter().map(|f| f.raw.len()).sum();
    assert_eq!(
        (end.bytes_to_target, end.bytes_from_target),
        (sent as u64, got as u64)
    );

    // Recorded: each statement's decision, then its result, attributed by request id.
    assert_eq!(
        results,
        vec![
            (
                "SELECT email FROM users".into(),
                RecordedVerdict::Allow,
                Some("SELECT 1 (1 rows)".into()),
                None
            ),
            (
                "DELETE FROM orders".into(),
                RecordedVerdict::Deny,
                None,
                Some("denied: bulkhead: no deletes here".into())
            ),
            (
                "SELECT 3".into(),
                RecordedVerdict::Allow,
                None,
                Some("not executed: an earlier message failed".into())
            ),
        ]
    );
}

// Paused time: after a client error the relay still gives the target 5 s for its last answers.
#[tokio::test(start_paused = true)]
async fn a_message_the_gateway_cannot_read_ends_the_session_with_a_protocol_error() {
    let client = |client| async move {
        let (r, mut w) = split(client);
        let mut reader = FrameReader::new(r, "target", codec::MAX_BACKEND);
        w.write_all(&codec::query("SELECT 1")).await.unwrap();
        let first = read_until_ready(&mut reader).await;
        // A PasswordMessage after login: no place for it.
        w.write_all(&frame(b'p', b"secret\0")).await.unwrap();
        let mut rest = Vec::new();
        reader.get_mut().read_to_end(&mut rest).await.unwrap();
        (first, rest)
    };
    let Relayed {
        end,
        received,
        client: (first, rest),
        ..
    } = relayed(|_| vec![frame(b'Z', b"I")], client).await;
    assert_eq!(first.len(), 1);
    assert_eq!(
        received.iter().map(|f| f.tag).collect::<Vec<_>>(),
        b"Q",
        "the unreadable message is not forwarded"
    );
    assert_eq!(rest[0], b'E');
    let fatal: HashMap<u8, String> = codec::error_fields(&rest[5..]).into_iter().collect();
    assert_eq!(fatal[&b'S'], "FATAL");
    assert_eq!(fatal[&b'C'], "08P01");
    assert_eq!(fatal[&b'M'], "bulkhead: client: unexpected message 'p'");
    assert!(matches!(end.outcome, Outcome::Failed { .. }));
}

/// After an error the server discards everything up to the Sync, a simple Query included; the
/// gateway would then take the Sync's answer for the Query's and attribute every later answer
/// (and its masks) one request late. So a Query inside an unfinished extended batch ends the
/// session before it reaches the target.
#[tokio::test(start_paused = true)]
async fn a_simple_query_inside_an_unfinished_extended_batch_ends_the_session() {
    let client = |client| async move {
        let (r, mut w) = split(client);
        let mut reader = FrameReader::new(r, "target", codec::MAX_BACKEND);
        let mut batch = vec![codec::parse("", "SELECT nope FROM nowhere")];
        batch.extend(bind_execute());
        batch.push(codec::query("SELECT email FROM users"));
        batch.push(frame(b'S', b""));
        w.write_all(&batch.concat()).await.unwrap();
        let mut rest = Vec::new();
        reader.get_mut().read_to_end(&mut rest).await.unwrap();
        rest
    };
    let Relayed {
        end,
        received,
        client: rest,
        ..
    } = relayed(|_| Vec::new(), client).await;
    assert_eq!(
        received.iter().map(|f| f.tag).collect::<Vec<_>>(),
        b"PBEX",
        "the Query is not forwarded; the target is told the session ends"
    );
    assert_eq!(rest[0], b'E');
    let fatal: HashMap<u8, String> = codec::error_fields(&rest[5..]).into_iter().collect();
    assert_eq!(fatal[&b'S'], "FATAL");
    assert!(
        fatal[&b'M'].contains("inside an unfinished extended-protocol batch"),
        "{fatal:?}"
    );
    assert!(matches!(end.outcome, Outcome::Failed { .. }));
}

/// A repeated statement's decision comes from the session's memo (the same decision, not a
/// new one), is recorded every time, and a new policy snapshot is never served an old
/// snapshot's decision.
#[tokio::test]
async fn a_repeated_statement_is_decided_from_the_memo_until_the_policy_changes() {
    let policies = tempfile::tempdir().unwrap();
    let gw = gateway(&policies);
    let config = gw.config.current();
    let conn = conn(&gw, &config);
    let policy = conn.policy();
    // Two texts of one shape: the classification cache hands out one classification.
    let first = policy.cache().classify("DELETE FROM t WHERE id = 1", None);
    let second = policy.cache().classify("DELETE FROM t WHERE id = 2", None);
    assert!(
        Arc::ptr_eq(&first, &second),
        "one shape, one classification"
    );

    let a = conn
        .decide_sql(&policy, &first, "DELETE FROM t WHERE id = 1", None, &[])
        .await;
    let b = conn
        .decide_sql(&policy, &second, "DELETE FROM t WHERE id = 2", None, &[])
        .await;
    assert_eq!(a.refusal.as_deref(), Some("no deletes here"));
    assert_eq!(b.refusal.as_deref(), Some("no deletes here"));
    assert!(
        Arc::ptr_eq(&a.decision, &b.decision),
        "served from the memo"
    );
    assert_ne!(a.request, b.request);

    // Another statement shape is evaluated on its own.
    let read = policy.cache().classify("SELECT 1", None);
    let c = conn.decide_sql(&policy, &read, "SELECT 1", None, &[]).await;
    assert!(c.refusal.is_none());

    // The deny rule goes: the new snapshot allows what the memo holds as denied.
    std::fs::write(
        policies.path().join("test.toml"),
        "[[target]]\nprotocol = \"postgres\"\ndefault = \"allow\"\n",
    )
    .unwrap();
    gw.policy.reload().unwrap();
    let reloaded = conn.policy();
    assert!(!Arc::ptr_eq(&policy, &reloaded));
    let d = conn
        .decide_sql(&reloaded, &first, "DELETE FROM t WHERE id = 1", None, &[])
        .await;
    assert!(d.refusal.is_none(), "{:?}", d.refusal);
    assert_eq!(d.decision.rules, vec!["target:db:default".to_string()]);

    let recorded: Vec<(String, RecordedVerdict, Vec<String>, Option<String>)> = gw
        .store
        .events(conn.session)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Request {
                text,
                verdict,
                rules,
                class,
                ..
            } => Some((text, verdict, rules.to_vec(), class.map(String::from))),
            _ => None,
        })
        .collect();
    let deny = |t: &str| {
        (
            t.to_string(),
            RecordedVerdict::Deny,
            vec!["no-deletes".to_string()],
            Some("delete".to_string()),
        )
    };
    assert_eq!(
        recorded,
        vec![
            deny("DELETE FROM t WHERE id = 1"),
            deny("DELETE FROM t WHERE id = 2"),
            (
                "SELECT 1".into(),
                RecordedVerdict::Allow,
                vec!["target:db:default".into()],
                Some("read".into())
            ),
            (
                "DELETE FROM t WHERE id = 1".into(),
                RecordedVerdict::Allow,
                vec!["target:db:default".into()],
                Some("delete".into())
            ),
        ]
    );
}
