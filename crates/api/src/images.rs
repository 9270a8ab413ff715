//! The built-in image registry's place in the API: how its repositories are
//! named to RBAC, and the token audience its clients ask for.
//!
//! A repository `NAMESPACE/NAME…` belongs to the namespace: pulling is
//! `get`, pushing `create` and deleting `delete` on
//! `repositories.registry.wasmkube.dev` there, so `edit` and `admin` push
//! and `view` pulls, and a namespace's service accounts pull what it holds
//! (the `system:image-pullers` RoleBinding every namespace gets). A
//! repository of one path segment is shared: every authenticated user pulls
//! it, and pushing it needs the verbs cluster-wide. The catalog is `list`
//! cluster-wide.

/// The API group of the registry's virtual resource (nothing is stored).
pub const GROUP: &str = "registry.wasmkube.dev";
/// The resource RBAC rules name for repositories.
pub const RESOURCE: &str = "repositories";
/// The audience of tokens meant only for the registry: a node pulls a pod's
/// images with a token of the pod's service account for this audience,
/// which the API server itself does not accept.
pub const AUDIENCE: &str = "wasmkube-registry";
/// Where a client of the API server gets a token for the registry
/// (`GET`, as any authenticated user).
pub const TOKEN_PATH: &str = "/registry/token";
/// The ClusterRole that pulls a namespace's repositories.
pub const PULLER_ROLE: &str = "system:image-puller";
/// The RoleBinding in every namespace that grants [`PULLER_ROLE`] to its
/// service accounts.
pub const PULLERS_BINDING: &str = "system:image-pullers";

/// The namespace a repository belongs to and its name within it; `None`
/// for a shared repository of one segment.
pub fn split(repository: &str) -> (Option<&str>, &str) {
    match repository.split_once('/') {
        Some((namespace, rest)) => (Some(namespace), rest),
        None => (None, repository),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_belong_to_their_first_segment() {
        assert_eq!(split("team/app/web"), (Some("team"), "app/web"));
        assert_eq!(split("hello"), (None, "hello"));
    }
}
