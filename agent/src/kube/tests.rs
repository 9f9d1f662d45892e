use std::path::Path;

use clap::Parser;
use proptest::prelude::*;

use super::{parse, KubeRequestError, RequestInfo};
use crate::{
    config::Config,
    identity::ProcessIdentity,
    policy::{cli::TestArgs, load_dir, PolicySet, Request, TargetRef},
    protocol::Protocol,
};

/// (method, url, verb, api prefix, group, version, namespace, resource, subresource, name)
type Case = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

/// `TestGetAPIRequestInfo`'s success cases from k8s.io/apiserver's requestinfo_test.go, then
/// what kubectl sends.
#[rustfmt::skip]
const APISERVER_CASES: &[Case] = &[
    // resource paths
    ("GET", "/api/v1/namespaces", "list", "api", "", "v1", "", "namespaces", "", ""),
    ("GET", "/api/v1/namespaces/other", "get", "api", "", "v1", "other", "namespaces", "", "other"),
    ("GET", "/api/v1/namespaces/other/pods", "list", "api", "", "v1", "other", "pods", "", ""),
    ("GET", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "", "foo"),
    ("HEAD", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "", "foo"),
    ("GET", "/api/v1/pods", "list", "api", "", "v1", "", "pods", "", ""),
    ("HEAD", "/api/v1/pods", "list", "api", "", "v1", "", "pods", "", ""),
    // special verbs
    ("GET", "/api/v1/proxy/namespaces/other/pods/foo", "proxy", "api", "", "v1", "other", "pods", "", "foo"),
    ("GET", "/api/v1/proxy/namespaces/other/pods/foo/subpath/not/a/subresource", "proxy", "api", "", "v1", "other", "pods", "", "foo"),
    ("GET", "/api/v1/watch/pods", "watch", "api", "", "v1", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=true", "watch", "api", "", "v1", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=false", "list", "api", "", "v1", "", "pods", "", ""),
    ("GET", "/api/v1/watch/namespaces/other/pods", "watch", "api", "", "v1", "other", "pods", "", ""),
    ("GET", "/api/v1/namespaces/other/pods?watch=1", "watch", "api", "", "v1", "other", "pods", "", ""),
    ("GET", "/api/v1/namespaces/other/pods?watch=0", "list", "api", "", "v1", "other", "pods", "", ""),
    // subresource identification
    ("GET", "/api/v1/namespaces/other/pods/foo/status", "get", "api", "", "v1", "other", "pods", "status", "foo"),
    ("GET", "/api/v1/namespaces/other/pods/foo/proxy/subpath", "get", "api", "", "v1", "other", "pods", "proxy", "foo"),
    ("PUT", "/api/v1/namespaces/other/finalize", "update", "api", "", "v1", "other", "namespaces", "finalize", "other"),
    ("PUT", "/api/v1/namespaces/other/status", "update", "api", "", "v1", "other", "namespaces", "status", "other"),
    // verb identification
    ("PATCH", "/api/v1/namespaces/other/pods/foo", "patch", "api", "", "v1", "other", "pods", "", "foo"),
    ("DELETE", "/api/v1/namespaces/other/pods/foo", "delete", "api", "", "v1", "other", "pods", "", "foo"),
    ("POST", "/api/v1/namespaces/other/pods", "create", "api", "", "v1", "other", "pods", "", ""),
    // deletecollection verb identification
    ("DELETE", "/api/v1/nodes", "deletecollection", "api", "", "v1", "", "nodes", "", ""),
    ("DELETE", "/api/v1/namespaces", "deletecollection", "api", "", "v1", "", "namespaces", "", ""),
    ("DELETE", "/api/v1/namespaces/other/pods", "deletecollection", "api", "", "v1", "other", "pods", "", ""),
    ("DELETE", "/apis/extensions/v1/namespaces/other/pods", "deletecollection", "apis", "extensions", "v1", "other", "pods", "", ""),
    // api group identification
    ("POST", "/apis/extensions/v1/namespaces/other/pods", "create", "apis", "extensions", "v1", "other", "pods", "", ""),
    // api version identification
    ("POST", "/apis/extensions/v1beta3/namespaces/other/pods", "create", "apis", "extensions", "v1beta3", "other", "pods", "", ""),
    // what kubectl sends
    ("POST", "/api/v1/namespaces/web/pods/web-1/exec", "create", "api", "", "v1", "web", "pods", "exec", "web-1"),
    ("GET", "/api/v1/namespaces/web/pods/web-1/exec", "get", "api", "", "v1", "web", "pods", "exec", "web-1"),
    ("GET", "/api/v1/namespaces/web/pods/web-1/log", "get", "api", "", "v1", "web", "pods", "log", "web-1"),
    ("GET", "/apis/apps/v1/namespaces/web/deployments/web/scale", "get", "apis", "apps", "v1", "web", "deployments", "scale", "web"),
];

/// (method, url, verb, name): `TestSelectorParsing`, then kubectl's `get pod x -w`
/// (percent-encoded), `==`, `!=`, a name no URL could carry, `watch` without a value.
#[rustfmt::skip]
const SELECTOR_CASES: &[(&str, &str, &str, &str)] = &[
    ("GET", "/apis/group/version/resource", "list", ""),
    ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1", "list", "name1"),
    ("GET", "/apis/group/version/resource?watch=true&fieldSelector=metadata.name=name1", "watch", "name1"),
    ("GET", "/apis/group/version/resource?fieldSelector=foo=bar&labelSelector=baz=qux", "list", ""),
    ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo", "list", ""),
    ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo&watch=true", "watch", ""),
    ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo&watch=false", "list", ""),
    ("DELETE", "/apis/group/version/resource?fieldSelector=foo=bar&labelSelector=baz=qux", "deletecollection", ""),
    ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=foo&fieldSelector=metadata.name=bar", "list", "foo"),
    ("GET", "/apis/group/version/resource/name?fieldSelector=foo=bar&labelSelector=foo=bar", "get", "name"),
    ("GET", "/apis/group/version/watch/resource?fieldSelector=metadata.name=foo", "watch", ""),
    ("GET", "/apis/group/version/watch/resource/name?fieldSelector=metadata.name=foo", "watch", "name"),
    ("GET", "/api/v1/namespaces/web/pods?fieldSelector=metadata.name%3Dweb-1&watch=true", "watch", "web-1"),
    ("GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1%2Cmetadata.name%3D%3Dweb-2", "list", "web-2"),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name%21%3Dweb-2", "list", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name%3D..", "list", ""),
    ("GET", "/api/v1/pods?watch", "watch", ""),
    ("GET", "/api/v1/pods?watch=FALSE", "list", ""),
    ("GET", "/api/v1/pods?watch=yes", "watch", ""),
];

fn split(url: &str) -> (&str, Option<&str>) {
    match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    }
}

fn resource(method: &str, url: &str) -> super::ResourceRequest<'static> {
    let (path, query) = split(url);
    match parse(method, path, query) {
        Ok(RequestInfo::Resource(r)) => r.into_owned_resource(),
        other => panic!("{method} {url}: expected a resource request, got {other:?}"),
    }
}

impl super::ResourceRequest<'_> {
    fn into_owned_resource(self) -> super::ResourceRequest<'static> {
        match RequestInfo::Resource(self).into_owned() {
            RequestInfo::Resource(r) => r,
            RequestInfo::NonResource { .. } => unreachable!(),
        }
    }
}

#[test]
fn apiserver_request_info_table() {
    for &(method, url, verb, prefix, group, version, ns, res, sub, name) in APISERVER_CASES {
        let r = resource(method, url);
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        assert_eq!(
            (
                r.verb,
                r.api_prefix,
                r.api_group.as_ref(),
                r.api_version.as_ref(),
                r.namespace.as_deref().map(str::to_string),
                r.resource.as_ref(),
                r.subresource.as_deref().map(str::to_string),
                r.name.as_deref().map(str::to_string),
            ),
            (
                verb,
                prefix,
                group,
                version,
                opt(ns),
                res,
                opt(sub),
                opt(name)
            ),
            "{method} {url}"
        );
    }
}

/// `TestGetAPIRequestInfo`'s error cases and `TestGetNonAPIRequestInfo`: not resource requests.
#[test]
fn apiserver_non_resource_paths() {
    let non_resource = [
        "/",
        "/api/version/",
        "/apis/group/version/",
        "/badprefix/version/resource",
        "/apis/version/resource",
        "/not-api/version/resource",
        "/apis/extensions/v1beta1",
        "/apis/extensions/v1beta1/",
        "/api/version",
        "/api",
        "/apis",
        "/version",
        "/openapi/v2",
        "/openapi/v3/api/v1",
        "/healthz",
    ];
    for path in non_resource {
        match parse("GET", path, None) {
            Ok(RequestInfo::NonResource {
                verb: "get",
                path: p,
            }) => assert_eq!(p, path),
            other => panic!("{path}: {other:?}"),
        }
    }
    let resource_paths = [
        "/api/version/resource",
        "/apis/group/version/resource/name/subresource",
        "/api/version/resource/name/subresource",
        "/apis/batch/v1/job",
        "/apis/batch/v1/job/foo",
        "/apis/batch/v1/job/foo/scale",
    ];
    for path in resource_paths {
        assert!(
            matches!(parse("GET", path, None), Ok(RequestInfo::Resource(_))),
            "{path}"
        );
    }
    // Non-resource verbs are the lowercased method.
    assert!(matches!(
        parse("POST", "/apis", None),
        Ok(RequestInfo::NonResource { verb: "post", .. })
    ));
}

/// A list or watch whose field selector requires one `metadata.name` is about that name.
#[test]
fn apiserver_selector_cases() {
    for &(method, url, verb, name) in SELECTOR_CASES {
        let r = resource(method, url);
        assert_eq!(
            (r.verb, r.name.as_deref().unwrap_or("")),
            (verb, name),
            "{method} {url}"
        );
    }
}

#[test]
fn unreadable_requests_are_unknown() {
    let cases = [
        (
            "GET",
            "/api/v1/namespaces/a%2Fb/pods",
            KubeRequestError::PathEncoding,
        ),
        (
            "GET",
            "/api/v1/namespaces/a%2fb/pods",
            KubeRequestError::PathEncoding,
        ),
        (
            "GET",
            "/api/v1/namespaces/a%5Cb/pods",
            KubeRequestError::PathEncoding,
        ),
        (
            "GET",
            "/api/v1/namespaces/a%25b/pods",
            KubeRequestError::PathEncoding,
        ),
        (
            "GET",
            "/api/v1/namespaces/a%zzb/pods",
            KubeRequestError::PathEncoding,
        ),
        (
            "GET",
            "/api/v1/namespaces/a%ffb/pods",
            KubeRequestError::PathEncoding,
        ),
        (
            "GET",
            "/api/v1/namespaces/a%00/pods",
            KubeRequestError::PathEncoding,
        ),
        (
            "GET",
            "/api/v1/namespaces/a%/pods",
            KubeRequestError::PathEncoding,
        ),
        (
            "GET",
            "/api/v1/namespaces/a\\b/pods",
            KubeRequestError::PathEncoding,
        ),
        ("GET", "/api//v1/pods", KubeRequestError::PathSegment),
        (
            "GET",
            "/api/v1/namespaces/prod/../dev/pods",
            KubeRequestError::PathSegment,
        ),
        (
            "GET",
            "/api/v1/namespaces/./pods",
            KubeRequestError::PathSegment,
        ),
        (
            "GET",
            "/api/v1/namespaces/%2E%2E/pods",
            KubeRequestError::PathSegment,
        ),
        ("GET", "api/v1/pods", KubeRequestError::NotAbsolute),
        ("GET", "/api/v1/watch", KubeRequestError::SpecialVerb),
        ("GET", "/apis/apps/v1/proxy/", KubeRequestError::SpecialVerb),
        ("OPTIONS", "/api/v1/pods", KubeRequestError::Method),
        ("TRACE", "/version", KubeRequestError::Method),
        ("get", "/api/v1/pods", KubeRequestError::Method),
        (
            "GET",
            "/api/v1/pods?watch=true;x=1",
            KubeRequestError::QueryEncoding,
        ),
        (
            "GET",
            "/api/v1/pods?watch=%zz",
            KubeRequestError::QueryEncoding,
        ),
    ];
    for (method, url, error) in cases {
        let (path, query) = split(url);
        assert_eq!(parse(method, path, query), Err(error), "{method} {url}");
    }
}

#[test]
fn decoding_matches_go_url_path() {
    // Percent-encoded characters in a segment are decoded, as in Go's URL.Path.
    let r = resource("DELETE", "/api/v1/namespaces/pr%6Fd/pods/x");
    assert_eq!(
        (r.namespace.as_deref(), r.name.as_deref(), r.verb),
        (Some("prod"), Some("x"), "delete")
    );
    // A trailing slash is trimmed as splitPath does.
    assert_eq!(resource("GET", "/api/v1/pods/").verb, "list");
}

#[test]
fn policy_view_of_requests() {
    let action = |method: &str, url: &str| {
        let (path, query) = split(url);
        let info = parse(method, path, query).unwrap().into_owned();
        let a = info.action();
        (
            a.verb.to_string(),
            a.resource.to_string(),
            a.subresource.map(str::to_string),
            a.namespace.map(str::to_string),
            a.name.map(str::to_string),
        )
    };
    let s = |x: &str| Some(x.to_string());
    // The WebSocket exec upgrade is a GET; the policy judges it as create, as the apiserver's
    // authorization of the upgrade does.
    for method in ["GET", "POST"] {
        assert_eq!(
            action(method, "/api/v1/namespaces/prod/pods/web-1/exec?command=sh"),
            (
                "create".into(),
                "pods".into(),
                s("exec"),
                s("prod"),
                s("web-1")
            )
        );
    }
    assert_eq!(
        action("GET", "/api/v1/namespaces/prod/pods/web-1/portforward").0,
        "create"
    );
    assert_eq!(
        action("GET", "/api/v1/namespaces/prod/pods/web-1/log").0,
        "get"
    );
    assert_eq!(
        action("GET", "/version"),
        ("get".into(), "/version".into(), None, None, None)
    );
}

/// Everything `--kube` of `policy test` can say, and the path kubectl would send for it.
fn kube_policies() -> (tempfile::TempDir, PolicySet) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kube.toml"),
        r#"
[[target]]
name = "prod-cluster"
protocol = "kubernetes"
default = "deny"

[[rule]]
id = "read"
verdict = "allow"
target = { name = ["prod-cluster"] }
kube = { verb = ["get", "list", "watch"], namespace = ["*"] }

[[rule]]
id = "dev-all"
verdict = "allow"
target = { name = ["prod-cluster"] }
kube = { namespace = ["dev*"] }

[[rule]]
id = "no-delete-prod"
verdict = "deny"
message = "no deletes in prod"
target = { name = ["prod-cluster"] }
kube = { verb = ["delete", "deletecollection"], namespace = ["prod"] }

[[rule]]
id = "exec-approve"
verdict = "approve"
target = { name = ["prod-cluster"] }
kube = { resource = ["pods"], subresource = ["exec", "attach"] }

[[rule]]
id = "no-secrets"
verdict = "deny"
target = { name = ["prod-cluster"] }
kube = { resource = ["secrets"], name = ["db-*"] }

[[rule]]
id = "no-apps-delete"
verdict = "deny"
message = "no deletes of apps"
target = { name = ["prod-cluster"] }
kube = { verb = ["delete"], group = ["apps"], resource = ["deployments"] }

[[rule]]
id = "scale-web"
verdict = "allow"
target = { name = ["prod-cluster"] }
kube = { verb = ["update", "patch"], resource = ["deployments"], subresource = ["scale"], name = ["web"] }
"#,
    )
    .unwrap();
    let set = load_dir(dir.path()).unwrap();
    (dir, set)
}

#[test]
fn rules_can_name_the_api_group() {
    let (_dir, set) = kube_policies();
    let identity = ProcessIdentity::default();
    let judge = |method: &str, path: &str| {
        let info = parse(method, path, None).unwrap();
        let d = set.evaluate(&Request {
            target: TargetRef {
                name: "prod-cluster",
                protocol: Protocol::Kubernetes,
            },
            identity: &identity,
            action: info.action().to_policy(),
        });
        (d.verdict, d.rules)
    };
    // `dev-all` allows anything in dev; `no-apps-delete` names the apps group only.
    assert_eq!(
        judge("DELETE", "/apis/apps/v1/namespaces/dev/deployments/web"),
        (
            crate::policy::Verdict::Deny,
            vec!["no-apps-delete".to_string()]
        )
    );
    for other in [
        "/apis/example.com/v1/namespaces/dev/deployments/web",
        "/api/v1/namespaces/dev/deployments/web",
    ] {
        assert_eq!(
            judge("DELETE", other),
            (crate::policy::Verdict::Allow, vec!["dev-all".to_string()]),
            "{other}"
        );
    }
    // A request about no resource is in no group.
    let info = parse("GET", "/apis/apps", None).unwrap();
    assert_eq!(info.action().group, None);
    assert_eq!(
        parse("GET", "/api/v1/pods", None).unwrap().action().group,
        Some("")
    );
}

#[derive(Parser)]
struct PolicyTestCli {
    #[command(flatten)]
    args: TestArgs,
}

fn method_for(verb: &str) -> &'static str {
    match verb {
        "create" => "POST",
        "update" => "PUT",
        "patch" => "PATCH",
        "delete" | "deletecollection" => "DELETE",
        _ => "GET",
    }
}

proptest! {
    /// The gateway's decision for a request kubectl sends equals `policy test --kube` for the
    /// same verb, resource, name and namespace: both go through `policy::cli::decide`'s
    /// evaluation, the CLI from its own arguments, the gateway from the parsed path.
    #[test]
    fn gateway_decision_agrees_with_policy_test(
        verb in prop::sample::select(vec!["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]),
        resource in prop::sample::select(vec!["pods", "secrets", "deployments", "configmaps"]),
        subresource in prop::option::of(prop::sample::select(vec!["exec", "attach", "log", "scale", "status"])),
        namespace in prop::option::of(prop::sample::select(vec!["prod", "dev", "dev-2", "web", "kube-system"])),
        name in prop::sample::select(vec!["web", "web-1", "db-main", "x"]),
        group in prop::sample::select(vec!["", "apps"]),
        websocket in any::<bool>(),
    ) {
        let (dir, set) = kube_policies();
        // What kubectl sends for this request.
        let collection = matches!(verb, "list" | "watch" | "create" | "deletecollection");
        let subresource = if collection { None } else { subresource };
        let verb = match subresource {
            // The apiserver reads a stream subresource of pods as create (see action()).
            Some("exec" | "attach") if resource == "pods" => "create",
            _ => verb,
        };
        let prefix = if group.is_empty() { "/api/v1".to_string() } else { format!("/apis/{group}/v1") };
        let ns = namespace.map(|n| format!("/namespaces/{n}")).unwrap_or_default();
        let mut path = format!("{prefix}{ns}/{resource}");
        if !collection {
            path = format!("{path}/{name}");
            if let Some(sub) = subresource {
                path = format!("{path}/{sub}");
            }
        }
        let query = (verb == "watch").then_some("watch=true");
        // kubectl's WebSocket exec is a GET, its SPDY exec a POST.
        let method = if verb == "create" && websocket && subresource.is_some() { "GET" } else { method_for(verb) };
        let info = parse(method, &path, query).unwrap();
        let action = info.action();
        prop_assert_eq!(action.verb, verb);

        let identity = ProcessIdentity { comm: "bash".into(), ..ProcessIdentity::default() };
        let gateway = set.evaluate(&Request {
            target: TargetRef { name: "prod-cluster", protocol: Protocol::Kubernetes },
            identity: &identity,
            action: action.to_policy(),
        });

        // kubectl's RESOURCE.GROUP for a group other than the core one.
        let dotted = if group.is_empty() { String::new() } else { format!(".{group}") };
        let mut words = format!("{verb} {resource}{dotted}");
        if !collection {
            words = format!("{words}/{name}");
            if let Some(sub) = subresource {
                words = format!("{words}/{sub}");
            }
        }
        let mut argv = vec![
            "policy-test".to_string(),
            "--dir".into(),
            dir.path().display().to_string(),
            "--target".into(),
            "prod-cluster".into(),
            "--protocol".into(),
            "kubernetes".into(),
            "--kube".into(),
            words,
        ];
        if let Some(n) = namespace {
            argv.extend(["-n".to_string(), n.to_string()]);
        }
        let cli = PolicyTestCli::try_parse_from(&argv).unwrap();
        let config = Config::embedded_default();
        let (_, _, expected) = crate::policy::cli::decide(&config, &set, &cli.args).unwrap();
        prop_assert_eq!(gateway.verdict, expected.verdict, "{} {:?}", path, query);
        prop_assert_eq!(&gateway.rules, &expected.rules);
        prop_assert_eq!(&gateway.message, &expected.message);
        prop_assert_eq!(gateway.basis, expected.basis);
    }

    /// No input panics, and every path that reads as a resource request keeps its parts.
    #[test]
    fn any_request_reads_or_is_unknown(
        method in prop::sample::select(vec!["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "X"]),
        path in "(/[a-z.%0-9A-F]{0,6}){0,7}/?",
        query in prop::option::of("[a-zA-Z=&%;.,+0-9]{0,30}"),
    ) {
        if let Ok(info) = parse(method, &path, query.as_deref()) {
            let a = info.action();
            prop_assert!(!a.verb.is_empty());
            prop_assert!(!a.resource.is_empty());
        }
    }
}

#[test]
fn example_policy_denies_exec_whatever_the_method() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let set = load_dir(&dir).unwrap();
    let identity = ProcessIdentity::default();
    for method in ["GET", "POST"] {
        let info = parse(
            method,
            "/api/v1/namespaces/web/pods/web-1/exec",
            Some("command=sh"),
        )
        .unwrap();
        let d = set.evaluate(&Request {
            target: TargetRef {
                name: "prod-cluster",
                protocol: Protocol::Kubernetes,
            },
            identity: &identity,
            action: info.action().to_policy(),
        });
        assert_eq!(d.verdict, crate::policy::Verdict::Deny, "{method}: {d:?}");
        assert_eq!(d.rules, vec!["kube-no-exec".to_string()]);
    }
}
