//! How lists merge, per field: the `patchMergeKey`/`patchStrategy` and
//! `listType`/`listMapKeys` markers of the Kubernetes types we serve, used by
//! strategic merge patch and server-side apply alike.

/// How a list at some path combines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListKind {
    /// Replaced whole.
    Atomic,
    /// Items identified by this key are merged one by one.
    Keyed(&'static str),
    /// A set of scalars (`finalizers`).
    Set,
}

/// The list kind of the field at `path` (field names only, no indices) in an
/// object of `kind`.
pub fn list_kind(kind: &str, path: &[&str]) -> ListKind {
    let Some((&field, parents)) = path.split_last() else {
        return ListKind::Atomic;
    };
    let parent = parents.last().copied();
    match field {
        "containers" | "initContainers" | "ephemeralContainers" => ListKind::Keyed("name"),
        "env" | "imagePullSecrets" | "resourceClaims" => ListKind::Keyed("name"),
        "volumes" if parent == Some("spec") => ListKind::Keyed("name"),
        "volumeMounts" => ListKind::Keyed("mountPath"),
        "volumeDevices" => ListKind::Keyed("devicePath"),
        "ports"
            if matches!(
                parent,
                Some("containers" | "initContainers" | "ephemeralContainers")
            ) =>
        {
            ListKind::Keyed("containerPort")
        }
        "ports" if kind == "Service" && path == ["spec", "ports"] => ListKind::Keyed("port"),
        "conditions" => ListKind::Keyed("type"),
        "ownerReferences" => ListKind::Keyed("uid"),
        "finalizers" if parent == Some("metadata") => ListKind::Set,
        "hostAliases" => ListKind::Keyed("ip"),
        "topologySpreadConstraints" => ListKind::Keyed("topologyKey"),
        "addresses" if kind == "Node" => ListKind::Keyed("type"),
        _ => ListKind::Atomic,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_kinds() {
        let cases: &[(&str, &[&str], ListKind)] = &[
            (
                "Deployment",
                &["spec", "template", "spec", "containers"],
                ListKind::Keyed("name"),
            ),
            (
                "Pod",
                &["spec", "containers", "ports"],
                ListKind::Keyed("containerPort"),
            ),
            ("Service", &["spec", "ports"], ListKind::Keyed("port")),
            ("Pod", &["spec", "containers", "args"], ListKind::Atomic),
            ("Pod", &["spec", "tolerations"], ListKind::Atomic),
            ("Pod", &["metadata", "finalizers"], ListKind::Set),
            ("Pod", &["status", "conditions"], ListKind::Keyed("type")),
        ];
        for (kind, path, want) in cases {
            assert_eq!(list_kind(kind, path), *want, "{kind} {path:?}");
        }
    }
}
