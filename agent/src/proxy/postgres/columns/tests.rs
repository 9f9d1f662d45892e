use std::net::SocketAddr;

use bytes::{BufMut as _, BytesMut};

use super::{
    plan::{FieldAction, RowPlan},
    track::{with_formats, Expect},
    *,
};
use crate::{
    net::OrigDstAddr,
    policy::{mask::Detector, MaskRule, MaskStyle, Masker},
    proxy::postgres::{catalog, settings::PostgresTarget, state::Front},
    record::SledStore,
};

fn rule(columns: &[&str], detectors: &[Detector], style: MaskStyle) -> Arc<MaskRule> {
    Arc::new(MaskRule::for_test(columns, detectors, style))
}

fn masks() -> Masks {
    Arc::from([
        rule(&["public.users.ssn"], &[], MaskStyle::Redact),
        rule(&[], &[Detector::Email], MaskStyle::Redact),
    ])
}

fn field(table_oid: u32, column: i16, type_oid: u32, format: i16) -> FieldDescription {
    FieldDescription {
        name: "alias".into(),
        table_oid,
        column,
        type_oid,
        type_len: -1,
        type_mod: -1,
        format,
    }
}

fn row(values: &[Option<&[u8]>]) -> Vec<u8> {
    codec::data_row_body(values).to_vec()
}

fn values(body: &[u8]) -> Vec<Option<Vec<u8>>> {
    codec::data_row_values(body)
        .unwrap()
        .into_iter()
        .map(|v| v.map(<[u8]>::to_vec))
        .collect()
}

fn masker_of(m: &Masks) -> Masker<'_> {
    Masker::new(m.iter().map(AsRef::as_ref))
}

#[test]
fn plans_mask_named_columns_whole_and_the_rest_by_detectors() {
    let m = masks();
    let masker = masker_of(&m);
    let plan = RowPlan {
        detectors: masker.detectors().clone(),
        fields: Some(vec![
            FieldAction::Column {
                style: MaskStyle::Redact,
                format: 0,
                type_oid: 25,
            },
            FieldAction::Detect {
                format: 0,
                type_oid: 25,
            },
            FieldAction::Column {
                style: MaskStyle::Redact,
                format: 1,
                type_oid: 25,
            },
            FieldAction::Column {
                style: MaskStyle::Redact,
                format: 1,
                type_oid: 23,
            },
            FieldAction::Detect {
                format: 1,
                type_oid: 1009,
            },
            FieldAction::Detect {
                format: 1,
                type_oid: 25,
            },
        ]),
        unknown: Some(MaskStyle::Redact),
        binary: false,
    };
    let body = row(&[
        Some(b"123-45-6789"),
        Some(b"mail bob@example.com"),
        Some(b"123-45-6789"),
        Some(&[0, 0, 0, 7]),
        Some(b"\x00\x00\x00\x01bob@example.com"),
        Some(b"bob@example.com"),
    ]);
    let out = plan.apply(&body).unwrap().unwrap();
    assert_eq!(
        values(&out),
        vec![
            Some(b"[redacted]".to_vec()),
            Some(b"mail [redacted]".to_vec()),
            Some(b"[redacted]".to_vec()),
            None,
            None,
            Some(b"[redacted]".to_vec()),
        ],
        "binary text gets the text; other binary values become NULL"
    );
    let clean = row(&[None, Some(b"plain"), None, None, None, Some(b"x")]);
    assert!(
        plan.apply(&clean).unwrap().is_none(),
        "unchanged rows pass as they are"
    );
    // More values than described: not attributable, withheld.
    let extra = row(&[None, None, None, None, None, None, Some(b"?")]);
    assert_eq!(values(&plan.apply(&extra).unwrap().unwrap())[6], None);
}

#[test]
fn bind_formats_apply_to_a_statement_description() {
    let fields = [field(1, 1, 25, 0), field(0, 0, 23, 0)];
    let all_binary = with_formats(&fields, &[1]).unwrap();
    assert!(all_binary.iter().all(|f| f.format == 1));
    let each = with_formats(&fields, &[0, 1]).unwrap();
    assert_eq!((each[0].format, each[1].format), (0, 1));
    assert!(with_formats(&fields, &[])
        .unwrap()
        .iter()
        .all(|f| f.format == 0));
    assert!(with_formats(&fields, &[0, 1, 1]).is_none());
}

fn tracker(enabled: bool) -> Tracker {
    // Port 1 on loopback: nothing listens, so a catalog lookup fails at once.
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    Tracker::new(
        enabled,
        catalog::Login {
            addr: OrigDstAddr(addr),
            pg: PostgresTarget::default(),
            user: "u".into(),
            database: "d".into(),
            password: None,
        },
    )
}

fn description(fields: &[FieldDescription]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i16(i16::try_from(fields.len()).unwrap());
    for f in fields {
        b.put_slice(f.name.as_bytes());
        b.put_u8(0);
        b.put_u32(f.table_oid);
        b.put_i16(f.column);
        b.put_u32(f.type_oid);
        b.put_i16(f.type_len);
        b.put_i32(f.type_mod);
        b.put_i16(f.format);
    }
    b.to_vec()
}

fn frontend(t: &Tracker, tag: u8, parts: &[&[u8]]) {
    t.frontend(tag, &parts.concat());
}

#[tokio::test]
async fn an_execute_uses_the_description_of_its_statement_with_its_bind_formats() {
    let t = tracker(true);
    let catalogs = Catalogs::default();
    let store = SledStore::temporary().unwrap();
    let mut r = Results::new(&t, &catalogs, &store, SessionId(1));
    let m = masks();
    let fields = [field(0, 0, 25, 0), field(0, 0, 23, 0)];

    // Prepare: Parse s1, Describe S s1, Sync (tokio-postgres' prepare).
    t.push(Expect::Parse {
        name: "s1".into(),
        copy: None,
        // Reads no table: only the detectors apply.
        lineage: Some(Arc::new(super::lineage::analyze("SELECT $1::text, 1"))),
    });
    frontend(&t, b'D', &[b"S", b"s1\0"]);
    frontend(&t, b'S', &[]);
    for (tag, body) in [
        (b'1', vec![]),
        (b't', vec![0, 0]),
        (b'T', description(&fields)),
        (b'Z', vec![b'I']),
    ] {
        r.observe(tag, &body, || true);
    }
    assert!(t.queue.lock().unwrap().is_empty());

    // Later, in another round trip: Bind (binary results), Execute, Sync.
    let mut bind = BytesMut::new();
    bind.put_slice(b"\0s1\0");
    bind.put_i16(0);
    bind.put_i16(0);
    bind.put_i16(1);
    bind.put_i16(1);
    t.frontend(b'B', &bind);
    frontend(&t, b'E', &[b"\0", &[0, 0, 0, 0]]);
    frontend(&t, b'S', &[]);
    r.observe(b'2', &[], || true);
    let got = r.current_fields(Front::Execute).unwrap();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|f| f.format == 1), "formats from the Bind");
    let body = row(&[Some(b"bob@example.com"), Some(&[0, 0, 0, 1])]);
    let out = r
        .mask(Front::Execute, &m, b'D', &body)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(values(&out[5..])[0], Some(b"[redacted]".to_vec()));
    assert_eq!(values(&out[5..])[1], Some(vec![0, 0, 0, 1]));
    r.observe(b'C', b"SELECT 1\0", || true);
    r.observe(b'Z', b"I", || true);
    assert!(t.queue.lock().unwrap().is_empty());

    // An error skips to the Sync: what was queued after it is dropped with it.
    t.push(Expect::Parse {
        name: String::new(),
        copy: None,
        lineage: None,
    });
    t.frontend(b'B', b"\0\0\0\0\0\0\0\0");
    frontend(&t, b'E', &[b"\0", &[0, 0, 0, 0]]);
    frontend(&t, b'S', &[]);
    r.observe(b'E', b"\0", || true);
    assert_eq!(t.queue.lock().unwrap().len(), 1);
    r.observe(b'Z', b"I", || true);
    assert!(t.queue.lock().unwrap().is_empty());
    assert!(
        r.current_fields(Front::Execute).is_none(),
        "no Execute in flight"
    );
}

#[tokio::test]
async fn unknown_columns_under_a_column_rule_are_withheld() {
    let t = tracker(false);
    let catalogs = Catalogs::default();
    let store = SledStore::temporary().unwrap();
    let mut r = Results::new(&t, &catalogs, &store, SessionId(1));
    let m = masks();
    // An Execute whose description the session did not follow: every value withheld.
    let body = row(&[Some(b"x"), None]);
    let out = r
        .mask(Front::Execute, &m, b'D', &body)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(values(&out[5..]), vec![None, None]);

    // A simple query whose table column cannot be looked up (the side connection fails):
    // that column is masked; so is the expression, since a session that does not follow
    // Describes did not analyse its statement either.
    r.observe(b'C', b"SELECT 1\0", || true);
    r.observe(
        b'T',
        &description(&[field(16384, 2, 25, 0), field(0, 0, 25, 0)]),
        || true,
    );
    let body = row(&[Some(b"123-45-6789"), Some(b"plain")]);
    let out = r
        .mask(Front::Query, &m, b'D', &body)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        values(&out[5..]),
        vec![Some(b"[redacted]".to_vec()), Some(b"[redacted]".to_vec())]
    );
    // Detector-only masks never ask the catalog: the table column is only scanned.
    let detectors_only: Masks = Arc::from([rule(&[], &[Detector::Email], MaskStyle::Redact)]);
    r.observe(b'T', &description(&[field(16384, 2, 25, 0)]), || true);
    let body = row(&[Some(b"123-45-6789")]);
    assert!(r
        .mask(Front::Query, &detectors_only, b'D', &body)
        .await
        .unwrap()
        .is_none());
}

#[test]
fn errors_that_could_quote_a_value_are_withheld_under_a_column_rule() {
    let error = |code: &str, message: &str| {
        let frame = codec::error_response(code, message);
        frame[5..].to_vec()
    };
    let cast = error(
        "22P02",
        "invalid input syntax for type integer: \"123-45-6789\"",
    );
    let out = withheld_error(&masks(), &cast).expect("withheld");
    let fields = codec::error_fields(&out[5..]);
    assert!(fields.contains(&(b'C', "22P02".into())), "{fields:?}");
    assert!(
        !fields.iter().any(|(_, v)| v.contains("123-45-6789")),
        "{fields:?}"
    );
    // A name error raised at a position of the statement quotes its text: forwarded. One
    // without a position (a name looked up at run time: `ssn::regclass`), or with a context
    // (within a function, or a string parsed as a type name), could quote a value.
    let with = |code: &str, message: &str, extra: &[u8]| {
        let mut body = error(code, message);
        body.pop();
        body.extend_from_slice(extra);
        body.push(0);
        body
    };
    let missing = "column \"x\" does not exist";
    assert!(withheld_error(&masks(), &with("42703", missing, b"P8\0")).is_none());
    assert!(withheld_error(&masks(), &with("42703", missing, b"")).is_some());
    let leaked = "relation \"123-45-6789\" does not exist";
    let out = withheld_error(&masks(), &with("42P01", leaked, b"")).expect("withheld");
    assert!(!String::from_utf8_lossy(&out).contains("123-45-6789"));
    let typed = with(
        "42601",
        "syntax error at or near \"123\"",
        b"P8\0Winvalid type name \"123-45-6789\"\0",
    );
    assert!(withheld_error(&masks(), &typed).is_some());
    for schema in [
        "3F000", "3D000", "28000", "34000", "26000", "0A000", "55000",
    ] {
        assert!(
            withheld_error(&masks(), &with(schema, leaked, b"")).is_some(),
            "{schema}"
        );
    }
    // Classes that quote nothing: forwarded, position or not.
    let aborted = "current transaction is aborted, commands ignored until end of transaction block";
    assert!(withheld_error(&masks(), &error("25P02", aborted)).is_none());
    assert!(withheld_error(
        &masks(),
        &error("57014", "canceling statement due to user request")
    )
    .is_none());
    // Detector-only masks change nothing.
    let detectors_only: Masks = Arc::from([rule(&[], &[Detector::Email], MaskStyle::Redact)]);
    assert!(withheld_error(&detectors_only, &cast).is_none());
    // No SQLSTATE: withheld, as an internal error.
    let out = withheld_error(&masks(), b"Mno code\0\0").expect("withheld");
    assert!(codec::error_fields(&out[5..]).contains(&(b'C', "XX000".into())));
}
