//! Turning a request path into what it addresses, as Kubernetes'
//! `RequestInfoFactory` does: group, version, namespace, resource, name and
//! subresource.

use wasmkube_api::Subresource;
use wasmkube_api::registry::{self, ResourceType};

use crate::error::{ApiError, ApiResult};

/// What a resource path addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    pub rt: &'static ResourceType,
    /// `None` for cluster-scoped types and for all-namespace lists.
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    pub subresource: Option<Subresource>,
}

/// Parses `/api/v1/...` and `/apis/{group}/{version}/...` resource paths.
/// Discovery paths (`/api`, `/apis/apps/v1`) are not resource paths and give `Ok(None)`.
pub fn parse(path: &str) -> ApiResult<Option<Target<'_>>> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Ok(None),
    };
    if rest.is_empty() {
        return Ok(None);
    }
    let mut rest = rest;
    let mut namespace = None;
    if rest[0] == "namespaces" && rest.len() > 1 {
        namespace = Some(rest[1]);
        // `namespaces/{name}/status|finalize` address the namespace itself.
        if rest.len() > 2
            && Subresource::parse(rest[2])
                .is_none_or(|s| !matches!(s, Subresource::Status | Subresource::Finalize))
        {
            rest = &rest[2..];
        }
    }
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return Err(ApiError::NoRoute),
    };
    let rt = registry::lookup(group, version, plural).ok_or(ApiError::NoRoute)?;
    let subresource = match sub {
        None => None,
        Some(s) => match Subresource::parse(s) {
            Some(s) if rt.has(s) => Some(s),
            _ => return Err(ApiError::NoRoute),
        },
    };
    if !rt.namespaced {
        namespace = None;
    }
    for segment in [namespace, name].into_iter().flatten() {
        if segment.is_empty() {
            return Err(ApiError::NoRoute);
        }
    }
    Ok(Some(Target {
        rt,
        namespace,
        name,
        subresource,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(path: &str) -> String {
        match parse(path) {
            Ok(Some(t)) => format!(
                "{}/{} ns={:?} name={:?} sub={:?}",
                t.rt.api_version(),
                t.rt.plural,
                t.namespace,
                t.name,
                t.subresource.map(|s| s.name())
            ),
            Ok(None) => "discovery".into(),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn paths() {
        let cases = [
            ("/api", "discovery"),
            ("/api/v1", "discovery"),
            ("/apis/apps/v1", "discovery"),
            ("/api/v1/pods", "v1/pods ns=None name=None sub=None"),
            (
                "/api/v1/namespaces/default/pods",
                "v1/pods ns=Some(\"default\") name=None sub=None",
            ),
            (
                "/api/v1/namespaces/default/pods/web/status",
                "v1/pods ns=Some(\"default\") name=Some(\"web\") sub=Some(\"status\")",
            ),
            (
                "/api/v1/namespaces/default/pods/web/binding",
                "v1/pods ns=Some(\"default\") name=Some(\"web\") sub=Some(\"binding\")",
            ),
            (
                "/api/v1/namespaces",
                "v1/namespaces ns=None name=None sub=None",
            ),
            (
                "/api/v1/namespaces/kube-system",
                "v1/namespaces ns=None name=Some(\"kube-system\") sub=None",
            ),
            (
                "/api/v1/namespaces/x/finalize",
                "v1/namespaces ns=None name=Some(\"x\") sub=Some(\"finalize\")",
            ),
            (
                "/api/v1/nodes/n1/status",
                "v1/nodes ns=None name=Some(\"n1\") sub=Some(\"status\")",
            ),
            (
                "/apis/apps/v1/namespaces/a/deployments/d/scale",
                "apps/v1/deployments ns=Some(\"a\") name=Some(\"d\") sub=Some(\"scale\")",
            ),
            (
                "/apis/apps/v1/namespaces/a/deployments/d/binding",
                "error: the server could not find the requested resource",
            ),
            (
                "/api/v1/widgets",
                "error: the server could not find the requested resource",
            ),
            (
                "/api/v1/namespaces/a/pods/b/c/d",
                "error: the server could not find the requested resource",
            ),
        ];
        for (path, want) in cases {
            assert_eq!(show(path), want, "{path}");
        }
    }
}
