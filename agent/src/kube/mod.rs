//! Kubernetes: what the apiserver reads from each request ([`request_info`]), in the terms
//! Kubernetes rules are written in (verb, resource, subresource, namespace, name); the refusal
//! kubectl prints ([`status`]); the exec stream's channels read for the record ([`channel`]);
//! the kubeconfig `bulkhead run` hands a governed kubectl ([`kubeconfig`]). The HTTP gateway
//! (`proxy/http`) serves Kubernetes targets with these.

pub mod channel;
pub mod kubeconfig;
pub mod request_info;
pub mod status;
#[cfg(test)]
mod tests;

pub use request_info::{parse, KubeAction, KubeRequestError, RequestInfo, ResourceRequest};
