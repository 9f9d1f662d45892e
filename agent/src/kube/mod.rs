//! Kubernetes API requests: what the apiserver reads from each one ([`request_info`]), in the
//! terms Kubernetes rules are written in (verb, resource, subresource, namespace, name).

pub mod request_info;
#[cfg(test)]
mod tests;

pub use request_info::{parse, KubeAction, KubeRequestError, RequestInfo, ResourceRequest};
