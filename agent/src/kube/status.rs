//! What a Kubernetes client is told when the gateway refuses a request: a `Status` object, as
//! the apiserver answers, so `kubectl` prints `Error from server (Forbidden): MESSAGE`.

/// A `Status` (403 Forbidden) carrying the rule's message and naming the deciding rules.
pub fn forbidden(message: &str, rules: &[String]) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": if rules.is_empty() {
            format!("bulkhead: {message}")
        } else {
            format!("bulkhead: {message} (rule {})", rules.join(", "))
        },
        "reason": "Forbidden",
        "details": { "causes": rules.iter().map(|r| serde_json::json!({"reason": "BulkheadRule", "message": r})).collect::<Vec<_>>() },
        "code": 403,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_refusal_is_a_status_kubectl_prints() {
        let s = super::forbidden("no deletes in prod", &["no-delete-prod".into()]);
        assert_eq!(s["kind"], "Status");
        assert_eq!(s["reason"], "Forbidden");
        assert_eq!(s["code"], 403);
        assert_eq!(
            s["message"],
            "bulkhead: no deletes in prod (rule no-delete-prod)"
        );
    }
}
