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
    /// Items identified by these keys together (a custom resource's
    /// `x-kubernetes-list-map-keys`) are merged one by one.
    Map(&'static [serde_json::Value]),
    /// A set of scalars (`finalizers`).
    Set,
}

impl ListKind {
    /// The keys that identify an item, for the keyed kinds.
    pub fn keys(self) -> Option<Vec<&'static str>> {
        match self {
            ListKind::Keyed(k) => Some(vec![k]),
            ListKind::Map(keys) => Some(keys.iter().filter_map(|k| k.as_str()).collect()),
            ListKind::Atomic | ListKind::Set => None,
        }
    }
}

/// Whose list markers apply: a built-in kind's (by its registry id), or a
/// custom kind's structural schema.
#[derive(Clone, Copy, Debug)]
pub enum Lists {
    Builtin(&'static str),
    Schema(&'static serde_json::Value),
}

impl Lists {
    pub fn of(rt: &wasmkube_api::registry::ResourceType) -> Self {
        match rt.custom {
            Some(custom) => Lists::Schema(&custom.schema),
            None => Lists::Builtin(rt.id()),
        }
    }
}

/// The list kind of the field at `path` (field names only, no indices) in
/// an object whose lists `lists` describes. A custom resource's lists are
/// as its schema marks them (`x-kubernetes-list-type`: `map` with its
/// `x-kubernetes-list-map-keys`, `set`, or `atomic`, the default); its
/// metadata's as any object's.
pub fn list_kind_of(lists: Lists, path: &[&str]) -> ListKind {
    match lists {
        Lists::Builtin(kind) => list_kind(kind, path),
        Lists::Schema(_) if path.first() == Some(&"metadata") => list_kind("custom", path),
        Lists::Schema(schema) => {
            let mut at = schema;
            for name in path {
                if at["type"] == "array" {
                    at = &at["items"];
                }
                at = match at["properties"].get(*name) {
                    Some(field) => field,
                    None => &at["additionalProperties"],
                };
                if at.is_null() {
                    return ListKind::Atomic;
                }
            }
            match at["x-kubernetes-list-type"].as_str() {
                Some("set") => ListKind::Set,
                Some("map") => match at["x-kubernetes-list-map-keys"].as_array() {
                    Some(keys) if keys.len() == 1 && keys[0].is_string() => {
                        ListKind::Keyed(keys[0].as_str().expect("a string"))
                    }
                    Some(keys) if !keys.is_empty() => ListKind::Map(keys.as_slice()),
                    _ => ListKind::Atomic,
                },
                _ => ListKind::Atomic,
            }
        }
    }
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
