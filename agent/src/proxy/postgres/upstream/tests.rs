//! The login's pure decisions: which authentication requests are answered, where held
//! credentials may go.

use super::*;
use crate::config::TargetKind;

const PASSWORD: &str = "held-secret";

/// One request to a fresh login as `app` holding [`PASSWORD`], `allowed` methods.
fn first_step(allowed: &[AuthMethod], request: &AuthRequest) -> Result<AuthStep, UpstreamError> {
    Authenticator::new(allowed, "app", Some(PASSWORD)).step(request)
}

fn sasl(mechanisms: &[&str]) -> AuthRequest {
    AuthRequest::Sasl(mechanisms.iter().map(ToString::to_string).collect())
}

#[test]
fn a_request_is_answered_only_when_its_method_is_allowed() {
    use AuthMethod::{Md5, None as NoAuth, Password, ScramSha256};
    let default = PostgresTarget::default().auth;
    assert_eq!(default, [ScramSha256]);
    let scram = sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
    // (request, allowed, the method it asks for, answered?)
    let cases: &[(AuthRequest, &[AuthMethod], AuthMethod, bool)] = &[
        (AuthRequest::Cleartext, &default, Password, false),
        (AuthRequest::Cleartext, &[ScramSha256, Md5], Password, false),
        (AuthRequest::Cleartext, &[Password], Password, true),
        (AuthRequest::Md5(*b"salt"), &default, Md5, false),
        (AuthRequest::Md5(*b"salt"), &[Password], Md5, false),
        (AuthRequest::Md5(*b"salt"), &[ScramSha256, Md5], Md5, true),
        (AuthRequest::Ok, &default, NoAuth, false),
        (
            AuthRequest::Ok,
            &[ScramSha256, Md5, Password],
            NoAuth,
            false,
        ),
        (AuthRequest::Ok, &[NoAuth], NoAuth, true),
        (scram.clone(), &default, ScramSha256, true),
        (scram.clone(), &[Md5, Password, NoAuth], ScramSha256, false),
    ];
    for (request, allowed, asked, answered) in cases {
        let step = first_step(allowed, request);
        match step {
            Ok(AuthStep::Send(out)) if *answered => {
                let carries_password = out
                    .windows(PASSWORD.len())
                    .any(|w| w == PASSWORD.as_bytes());
                assert_eq!(carries_password, *asked == Password, "{request:?}: {out:?}");
            }
            Ok(AuthStep::LoggedIn(m)) if *answered => assert_eq!(m, *asked),
            Err(UpstreamError::NotAllowed {
                asked: a,
                allowed: al,
            }) if !answered => {
                assert_eq!((a, al.as_slice()), (*asked, *allowed), "{request:?}");
            }
            other => panic!("{request:?} under {allowed:?}: {other:?}"),
        }
    }
}

#[test]
fn a_refusal_names_what_the_server_asked_for_what_is_allowed_and_the_key() {
    let e = first_step(&[AuthMethod::ScramSha256], &AuthRequest::Md5(*b"salt")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the server asked for md5 authentication (\"md5\"), which the target's postgres.auth \
         (\"scram-sha-256\") does not allow; the gateway sent nothing derived from the \
         password (to allow it, add \"md5\" to postgres.auth)"
    );
    assert_eq!(e.recorded_method(), "md5 (refused: not in postgres.auth)");
    assert_eq!(e.sqlstate(), "28000");
    assert_eq!(
        e.outcome("db"),
        Outcome::Refused {
            reason: format!("target db: {e}")
        }
    );
    let e = first_step(&[AuthMethod::Md5, AuthMethod::Password], &AuthRequest::Ok).unwrap_err();
    assert!(
        e.to_string()
            .contains("no authentication at all (\"none\")")
            && e.to_string().contains("(\"md5\", \"password\")"),
        "{e}"
    );
}

#[test]
fn methods_the_gateway_lacks_are_unsupported_whatever_is_allowed() {
    let all = AuthMethod::ALL;
    for (request, named) in [
        (sasl(&["SCRAM-SHA-256-PLUS"]), "SASL SCRAM-SHA-256-PLUS"),
        (AuthRequest::Other(7), "GSSAPI"),
        (AuthRequest::Other(9), "SSPI"),
        (AuthRequest::Other(2), "Kerberos"),
        (AuthRequest::Other(6), "authentication method 6"),
    ] {
        match first_step(&all, &request) {
            Err(UpstreamError::Unsupported(m)) => assert!(m.contains(named), "{m}"),
            other => panic!("{request:?}: {other:?}"),
        }
    }
}

#[test]
fn an_allowed_method_needs_a_held_password_and_md5_does_not_send_it() {
    let mut auth = Authenticator::new(&[AuthMethod::Md5], "app", None);
    assert!(matches!(
        auth.step(&AuthRequest::Md5(*b"salt")),
        Err(UpstreamError::NoPassword)
    ));
    let mut auth = Authenticator::new(&[AuthMethod::Md5], "app", Some(PASSWORD));
    let Ok(AuthStep::Send(out)) = auth.step(&AuthRequest::Md5(*b"salt")) else {
        panic!("md5 allowed")
    };
    let hash = md5_hash(b"app", PASSWORD.as_bytes(), *b"salt");
    assert!(out.ends_with(format!("{hash}\0").as_bytes()), "{out:?}");
    assert!(matches!(
        auth.step(&AuthRequest::Ok),
        Ok(AuthStep::LoggedIn(AuthMethod::Md5))
    ));
}

#[test]
fn one_method_per_login_and_nothing_after_authentication_ok() {
    let all = AuthMethod::ALL;
    let mut auth = Authenticator::new(&all, "app", Some(PASSWORD));
    assert!(matches!(
        auth.step(&AuthRequest::Md5(*b"salt")),
        Ok(AuthStep::Send(_))
    ));
    // Answered with a hash, then asked for the password itself: no.
    assert!(matches!(
        auth.step(&AuthRequest::Cleartext),
        Err(UpstreamError::AuthAgain)
    ));
    let mut auth = Authenticator::new(&all, "app", Some(PASSWORD));
    assert!(matches!(
        auth.step(&AuthRequest::Ok),
        Ok(AuthStep::LoggedIn(AuthMethod::None))
    ));
    assert!(matches!(
        auth.step(&AuthRequest::Cleartext),
        Err(UpstreamError::AuthAgain)
    ));
    let mut auth = Authenticator::new(&all, "app", Some(PASSWORD));
    assert!(matches!(
        auth.step(&AuthRequest::SaslFinal(Bytes::from_static(b"v=x"))),
        Err(UpstreamError::Unexpected('R'))
    ));
}

/// A server that starts SCRAM, takes the client's proof and then says AuthenticationOk
/// without its signature has not shown it knows the password: refused, even where
/// "none" is allowed.
#[test]
fn a_scram_exchange_must_end_with_the_servers_signature() {
    for allowed in [&[AuthMethod::ScramSha256][..], &AuthMethod::ALL] {
        let mut auth = Authenticator::new(allowed, "app", Some(PASSWORD));
        let Ok(AuthStep::Send(first)) = auth.step(&sasl(&["SCRAM-SHA-256"])) else {
            panic!("SCRAM is allowed")
        };
        let at = first
            .windows(2)
            .position(|w| w == b"r=")
            .expect("client nonce");
        let nonce = String::from_utf8(first[at + 2..].to_vec()).unwrap();
        let server_first = format!("r={nonce}impostor,s=c2FsdHNhbHQ=,i=4096");
        let Ok(AuthStep::Send(proof)) =
            auth.step(&AuthRequest::SaslContinue(Bytes::from(server_first)))
        else {
            panic!("the client's final message")
        };
        assert!(proof.windows(2).any(|w| w == b"p="), "{proof:?}");
        assert!(
            matches!(
                auth.step(&AuthRequest::Ok),
                Err(UpstreamError::ScramIncomplete)
            ),
            "{allowed:?}"
        );
    }
}

#[test]
fn authentication_requests_parse_and_short_ones_are_malformed() {
    let msg = |code: i32, rest: &[u8]| [&code.to_be_bytes()[..], rest].concat();
    assert_eq!(AuthRequest::parse(&msg(0, b"")).unwrap(), AuthRequest::Ok);
    assert_eq!(
        AuthRequest::parse(&msg(3, b"")).unwrap(),
        AuthRequest::Cleartext
    );
    assert_eq!(
        AuthRequest::parse(&msg(5, b"abcd")).unwrap(),
        AuthRequest::Md5(*b"abcd")
    );
    assert_eq!(
        AuthRequest::parse(&msg(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")).unwrap(),
        sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
    );
    assert_eq!(
        AuthRequest::parse(&msg(7, b"")).unwrap(),
        AuthRequest::Other(7)
    );
    assert!(AuthRequest::parse(&msg(5, b"abc")).is_err());
    assert!(AuthRequest::parse(b"\0\0").is_err());
}

fn target(addresses: &[&str], pg: PostgresTarget) -> Target {
    Target {
        name: "orders-db".into(),
        addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        credentials: None,
        kind: TargetKind::Postgres(pg),
    }
}

#[test]
fn held_credentials_go_only_to_the_sockets_a_target_names() {
    let pg = PostgresTarget::default();
    let t = target(&["10.30.0.5:5432", "10.30.0.0/24"], pg.clone());
    let refusal = |t: &Target, pg: &PostgresTarget, dst: &str| {
        network_refusal(t, pg, OrigDstAddr(dst.parse().unwrap()))
    };
    assert_eq!(refusal(&t, &pg, "10.30.0.5:5432"), None);
    assert_eq!(refusal(&t, &pg, "[::ffff:10.30.0.5]:5432"), None);
    let message = refusal(&t, &pg, "10.30.0.7:5432").expect("another host in the network");
    for part in [
        "target orders-db: ",
        "10.30.0.7:5432",
        "10.30.0.0/24",
        "postgres.login_to_network = true",
    ] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
    assert!(refusal(&t, &pg, "10.30.0.5:6432").is_some(), "another port");
    let opted = PostgresTarget {
        login_to_network: true,
        ..PostgresTarget::default()
    };
    let t = target(&["10.30.0.0/24"], opted.clone());
    assert_eq!(refusal(&t, &opted, "10.30.0.7:5432"), None);
}
