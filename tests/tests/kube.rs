//! Kubernetes: the real `kubectl` against the test API server (`bh-kube-apiserver`) on the
//! target host. First directly, without the gateway, so that what the gateway tests rely on is
//! known to work: discovery, pods listed across all namespaces and in one, get, delete, and an
//! exec over the WebSocket channel protocol.
//!
//! Each test builds its own namespaces (see `bulkhead_tests::Topology`) and needs root.

use bulkhead_tests::{
    kube::{missing_kubectl, write_kubeconfig},
    require_root, Side, Topology,
};

fn text(out: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn skip_without_kubectl() -> bool {
    if let Some(why) = missing_kubectl() {
        eprintln!("SKIPPED: {why}");
        return true;
    }
    false
}

#[test]
fn kubectl_works_against_the_test_apiserver_directly() {
    require_root();
    if skip_without_kubectl() {
        return;
    }
    let topo = Topology::new("");
    let mut api = topo.kube_apiserver();
    let kubeconfig = topo.dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, &api.url, &api.ca, Some(&api.token));

    let out = topo.output(
        Side::Host,
        topo.kubectl(&kubeconfig, &["get", "pods", "-A"]),
    );
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    for (ns, pod) in [
        ("prod", "web-1"),
        ("dev", "api-1"),
        ("kube-system", "coredns-1"),
    ] {
        assert!(
            all.lines()
                .any(|l| l.split_whitespace().take(2).eq([ns, pod])),
            "{ns}/{pod} listed: {all}"
        );
    }

    let out = topo.output(
        Side::Host,
        topo.kubectl(&kubeconfig, &["get", "pods", "-n", "prod"]),
    );
    let prod = text(&out);
    assert!(
        out.status.success() && prod.contains("web-1") && !prod.contains("api-1"),
        "{prod}"
    );

    let out = topo.output(
        Side::Host,
        topo.kubectl(
            &kubeconfig,
            &["get", "pod", "web-1", "-n", "prod", "-o", "json"],
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    let pod: serde_json::Value = serde_json::from_slice(&out.stdout).expect("pod JSON");
    assert_eq!(pod["metadata"]["name"], "web-1");

    let out = topo.output(
        Side::Host,
        topo.kubectl(
            &kubeconfig,
            &[
                "exec", "web-1", "-n", "prod", "--", "echo", "hello", "from", "exec",
            ],
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from exec\n");

    let out = topo.output(
        Side::Host,
        topo.kubectl(&kubeconfig, &["delete", "pod", "x", "-n", "prod"]),
    );
    let deleted = text(&out);
    assert!(
        out.status.success() && deleted.contains("pod \"x\" deleted"),
        "{deleted}"
    );
    let out = topo.output(
        Side::Host,
        topo.kubectl(&kubeconfig, &["get", "pod", "x", "-n", "prod"]),
    );
    assert!(!out.status.success(), "x is gone: {}", text(&out));

    let requests = api.requests();
    assert!(
        requests.iter().all(|r| r["authorized"] == true),
        "every request carried the token: {requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r["upgrade"] == true && r["path"] == "/api/v1/namespaces/prod/pods/web-1/exec"),
        "exec went over a WebSocket upgrade: {requests:?}"
    );

    // Without the token the cluster refuses: the test server checks the credential.
    let anonymous = topo.dir.join("kubeconfig-anonymous");
    write_kubeconfig(&anonymous, &api.url, &api.ca, None);
    let out = topo.output(Side::Host, topo.kubectl(&anonymous, &["get", "pods", "-A"]));
    assert!(!out.status.success(), "{}", text(&out));
}
