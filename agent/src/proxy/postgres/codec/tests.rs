use super::*;

async fn read_all(bytes: &[u8], max: usize) -> Result<Vec<Frame>, CodecError> {
    let mut r = FrameReader::new(bytes, "client", max);
    let mut out = Vec::new();
    while let Some(f) = r.next().await? {
        out.push(f);
    }
    Ok(out)
}

#[tokio::test]
async fn frames_round_trip_and_keep_their_raw_bytes() {
    let mut wire = Vec::new();
    wire.extend_from_slice(&query("SELECT 1"));
    wire.extend_from_slice(&parse("s1", "SELECT $1"));
    wire.extend_from_slice(&ready_for_query(b'T'));
    let frames = read_all(&wire, MAX_FRONTEND).await.unwrap();
    assert_eq!(frames.len(), 3);
    assert_eq!(query_text(&frames[0].body).unwrap(), "SELECT 1");
    assert_eq!(parse_message(&frames[1].body).unwrap(), ("s1", "SELECT $1"));
    assert_eq!(ready_status(&frames[2].body), b'T');
    let joined: Vec<u8> = frames.iter().flat_map(|f| f.raw.iter().copied()).collect();
    assert_eq!(joined, wire);
}

#[tokio::test]
async fn bad_lengths_are_errors_not_allocations() {
    for len in [-1i32, 0, 3, i32::MIN] {
        let mut wire = vec![b'Q'];
        wire.extend_from_slice(&len.to_be_bytes());
        assert!(
            matches!(
                read_all(&wire, MAX_FRONTEND).await,
                Err(CodecError::BadLength { .. })
            ),
            "{len}"
        );
    }
    let mut wire = vec![b'Q'];
    wire.extend_from_slice(&i32::MAX.to_be_bytes());
    assert!(matches!(
        read_all(&wire, MAX_FRONTEND).await,
        Err(CodecError::TooLong { .. })
    ));
    // Truncated: EOF in the middle of a frame.
    let q = query("SELECT 1");
    assert!(matches!(
        read_all(&q[..q.len() - 2], MAX_FRONTEND).await,
        Err(CodecError::Io(_))
    ));
}

#[test]
fn startup_packets_parse_and_garbage_does_not() {
    let mut sm = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "alice"), ("database", "shop")],
        &mut sm,
    )
    .unwrap();
    let StartupPacket::Startup(s) = parse_startup(&sm[4..]).unwrap() else {
        panic!()
    };
    assert_eq!(
        (s.get("user"), s.get("database")),
        (Some("alice"), Some("shop"))
    );
    let mut ssl = BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut ssl);
    assert_eq!(parse_startup(&ssl[4..]).unwrap(), StartupPacket::Ssl);
    let mut cancel = BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(7, 9, &mut cancel);
    assert_eq!(
        parse_startup(&cancel[4..]).unwrap(),
        StartupPacket::Cancel { pid: 7, secret: 9 }
    );
    for bad in [
        &b""[..],
        &b"\x00\x03\x00\x00user\x00"[..],
        &b"\x00\x00\x00\x01"[..],
        &b"\x04\xd2\x16\x2e\x00"[..],
    ] {
        assert!(parse_startup(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn data_rows_are_rewritten_field_by_field_and_nulls_kept() {
    let row = data_row_body(&[Some(b"keep"), None, Some(b"secret")]);
    let out = rewrite_data_row(&row, |v| (v == b"secret").then(|| b"***".to_vec()))
        .unwrap()
        .unwrap();
    let mut expected = BytesMut::new();
    expected.put_i16(3);
    expected.put_i32(4);
    expected.put_slice(b"keep");
    expected.put_i32(-1);
    expected.put_i32(3);
    expected.put_slice(b"***");
    assert_eq!(&out[5..], &expected[..]);
    assert_eq!(
        i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize,
        out.len() - 1
    );
    assert!(
        rewrite_data_row(&row, |_| None).unwrap().is_none(),
        "unchanged rows are forwarded as they are"
    );
    assert!(
        rewrite_data_row(&row[..7], |_| Some(vec![])).is_err(),
        "a truncated row is an error, never passed unmasked"
    );
}

fn row_description_body(fields: &[(&str, u32, i16, u32, i16)]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_i16(i16::try_from(fields.len()).unwrap());
    for (name, table, column, type_oid, format) in fields {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_u32(*table);
        b.put_i16(*column);
        b.put_u32(*type_oid);
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(*format);
    }
    b
}

#[test]
fn row_descriptions_parse_and_truncated_ones_do_not() {
    let body = row_description_body(&[("x", 16384, 3, 25, 0), ("?column?", 0, 0, 23, 1)]);
    let fields = row_description(&body).unwrap();
    assert_eq!(
        fields[0],
        FieldDescription {
            name: "x".into(),
            table_oid: 16384,
            column: 3,
            type_oid: 25,
            type_len: -1,
            type_mod: -1,
            format: 0,
        }
    );
    assert_eq!((fields[1].table_oid, fields[1].format), (0, 1));
    assert!(row_description(&row_description_body(&[]))
        .unwrap()
        .is_empty());
    for cut in 0..body.len() {
        assert!(row_description(&body[..cut]).is_err(), "cut at {cut}");
    }
    let mut lying = body.clone();
    lying[0..2].copy_from_slice(&i16::MAX.to_be_bytes());
    assert!(
        row_description(&lying).is_err(),
        "a count the body cannot hold"
    );
    lying[0..2].copy_from_slice(&(-1i16).to_be_bytes());
    assert!(row_description(&lying).is_err());
    let mut unterminated = BytesMut::new();
    unterminated.put_i16(1);
    unterminated.put_slice(&[b'a'; 40]);
    assert!(row_description(&unterminated).is_err());
}

#[test]
fn rows_rewrite_by_index_with_nulls_and_only_when_changed() {
    let row = data_row_body(&[Some(b"keep"), None, Some(b"secret")]);
    assert_eq!(
        data_row_values(&row).unwrap(),
        vec![Some(&b"keep"[..]), None, Some(&b"secret"[..])]
    );
    let out = rewrite_row_body(&row, |i, _| match i {
        0 => Some(Replacement::Null),
        2 => Some(Replacement::Value(b"***".to_vec())),
        _ => unreachable!("NULL fields are not offered"),
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        data_row_values(&out).unwrap(),
        vec![None, None, Some(&b"***"[..])]
    );
    assert!(rewrite_row_body(&row, |_, _| None).unwrap().is_none());
    for cut in 0..row.len() {
        assert!(
            rewrite_row_body(&row[..cut], |_, _| None).is_err(),
            "cut at {cut}"
        );
    }
    let framed = data_row(&out);
    assert_eq!(framed[0], b'D');
    assert_eq!(&framed[5..], &out[..]);
}

#[test]
fn bind_result_formats_and_copy_out_responses() {
    let mut bind = BytesMut::new();
    postgres_protocol::message::frontend::bind(
        "p",
        "s1",
        [1i16],
        [7i32],
        |v, buf| {
            buf.put_i32(v);
            Ok(postgres_protocol::IsNull::No)
        },
        [1i16, 0],
        &mut bind,
    )
    .map_err(|_| ())
    .unwrap();
    assert_eq!(bind_result_formats(&bind[5..]).unwrap(), vec![1, 0]);
    assert_eq!(bind_names(&bind[5..]).unwrap(), ("p", "s1"));
    for cut in 5..bind.len() {
        assert!(bind_result_formats(&bind[5..cut]).is_err(), "cut at {cut}");
    }
    assert_eq!(
        copy_out_response(&[0, 0, 2, 0, 0, 0, 0]).unwrap(),
        (0, vec![0, 0])
    );
    assert!(copy_out_response(&[1, 0, 2, 0, 1]).is_err());
}

#[test]
fn error_responses_carry_sqlstate_and_message() {
    let e = error_response("42501", "denied by policy: no DDL");
    let fields = error_fields(&e[5..]);
    assert!(fields.contains(&(b'C', "42501".into())));
    assert!(fields.contains(&(b'M', "denied by policy: no DDL".into())));
    assert_eq!(command_tag(b"INSERT 0 1\0"), "INSERT 0 1");
    assert!(
        error_fields(b"Sunterminated").is_empty(),
        "an unterminated field is dropped"
    );
}

#[test]
fn bind_parameters_are_read_for_an_approver_bounded_and_by_format() {
    let mut body = Vec::new();
    body.extend_from_slice(b"portal\0stmt\0");
    // A format per value (text, binary, text); the values: text, binary, NULL.
    body.extend_from_slice(&3i16.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&3i16.to_be_bytes());
    body.extend_from_slice(&2i32.to_be_bytes());
    body.extend_from_slice(b"42");
    body.extend_from_slice(&2i32.to_be_bytes());
    body.extend_from_slice(&[0xde, 0xad]);
    body.extend_from_slice(&(-1i32).to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    let params = bind_parameters(&body).unwrap();
    assert_eq!(
        params,
        vec![Some("42".to_string()), Some("\\xdead".to_string()), None]
    );
    // One long text value: cut, and marked.
    let mut long = Vec::new();
    long.extend_from_slice(b"\0\0");
    long.extend_from_slice(&0i16.to_be_bytes());
    long.extend_from_slice(&1i16.to_be_bytes());
    long.extend_from_slice(&5000i32.to_be_bytes());
    long.extend_from_slice(&[b'a'; 5000]);
    long.extend_from_slice(&0i16.to_be_bytes());
    let p = bind_parameters(&long).unwrap();
    let v = p[0].as_deref().unwrap();
    assert!(
        v.len() <= PARAMETER_SHOWN + 3 && v.ends_with('…'),
        "{}",
        v.len()
    );
    // Cut short: malformed, not a panic.
    assert!(bind_parameters(&long[..20]).is_err());
}

#[test]
fn a_notification_keeps_its_process_and_channel_with_a_new_payload() {
    let body = b"\x00\x00\x04\xd2chan\0123-45-6789\0";
    let out = notification_with_payload(body, "[withheld]").unwrap();
    assert_eq!(
        &out[..],
        b"A\x00\x00\x00\x18\x00\x00\x04\xd2chan\0[withheld]\0"
    );
    for bad in [
        &b"\x00\x00"[..],
        b"\x00\x00\x04\xd2chan",
        b"\x00\x00\x04\xd2chan\0no end",
    ] {
        assert!(notification_with_payload(bad, "x").is_err());
    }
}
