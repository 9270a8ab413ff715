//! Role-based access control (`rbac.authorization.k8s.io/v1`): the stored
//! Roles, ClusterRoles and their bindings, followed from the store into an
//! in-memory policy, and the decision for a request's attributes.
//!
//! A write of an RBAC object through this server is in the policy before
//! the write is acknowledged (`wait_for`), so a client that grants and then
//! acts is never refused by a policy that lags behind its own write.
//! ClusterRoles with an `aggregationRule` get the rules of every ClusterRole
//! their selectors match, evaluated as the policy is built.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use wasmkube_store::SharedStore;

use super::{Attributes, UserInfo};
use crate::follow::Followed;

/// Where every RBAC object is stored.
const PREFIX: &str = "/registry/rbac.authorization.k8s.io/";

/// The policy as of one revision.
#[derive(Default)]
struct Policy {
    cluster_roles: HashMap<String, ClusterRole>,
    /// (namespace, name)
    roles: HashMap<(String, String), Role>,
    cluster_bindings: Vec<ClusterRoleBinding>,
    /// namespace → its RoleBindings
    bindings: HashMap<String, Vec<RoleBinding>>,
    /// The rules of each ClusterRole, aggregation applied.
    cluster_rules: HashMap<String, Vec<PolicyRule>>,
}

/// Objects by store key, from which the policy is rebuilt.
struct Objects<'a>(&'a std::collections::BTreeMap<String, serde_json::Value>);

impl Objects<'_> {
    fn policy(&self) -> Policy {
        let mut policy = Policy::default();
        for (key, obj) in self.0 {
            let rest = key.trim_start_matches(PREFIX);
            let decoded = match rest.split('/').next() {
                Some("clusterroles") => {
                    serde_json::from_value::<ClusterRole>(obj.clone()).map(|r| {
                        policy
                            .cluster_roles
                            .insert(r.metadata.name.clone().unwrap_or_default(), r);
                    })
                }
                Some("roles") => serde_json::from_value::<Role>(obj.clone()).map(|r| {
                    let id = (
                        r.metadata.namespace.clone().unwrap_or_default(),
                        r.metadata.name.clone().unwrap_or_default(),
                    );
                    policy.roles.insert(id, r);
                }),
                Some("clusterrolebindings") => {
                    serde_json::from_value::<ClusterRoleBinding>(obj.clone())
                        .map(|b| policy.cluster_bindings.push(b))
                }
                Some("rolebindings") => {
                    serde_json::from_value::<RoleBinding>(obj.clone()).map(|b| {
                        policy
                            .bindings
                            .entry(b.metadata.namespace.clone().unwrap_or_default())
                            .or_default()
                            .push(b)
                    })
                }
                _ => Ok(()),
            };
            if let Err(e) = decoded {
                tracing::warn!(key, error = %e, "unreadable RBAC object; ignored");
            }
        }
        policy.cluster_rules = policy
            .cluster_roles
            .iter()
            .map(|(name, role)| (name.clone(), aggregated_rules(&policy.cluster_roles, role)))
            .collect();
        policy
    }
}

/// A ClusterRole's own rules, or with an aggregation rule those of every
/// ClusterRole its selectors match, themselves aggregated (`edit` takes
/// `view`, which is aggregated too); a cycle adds nothing twice.
fn aggregated_rules(all: &HashMap<String, ClusterRole>, role: &ClusterRole) -> Vec<PolicyRule> {
    let mut rules = Vec::new();
    let mut seen = std::collections::HashSet::new();
    collect_rules(all, role, &mut seen, &mut rules);
    rules
}

fn collect_rules<'a>(
    all: &'a HashMap<String, ClusterRole>,
    role: &'a ClusterRole,
    seen: &mut std::collections::HashSet<&'a str>,
    rules: &mut Vec<PolicyRule>,
) {
    if !seen.insert(role.metadata.name.as_deref().unwrap_or_default()) {
        return;
    }
    let Some(aggregation) = &role.aggregation_rule else {
        for rule in role.rules.iter().flatten() {
            if !rules.contains(rule) {
                rules.push(rule.clone());
            }
        }
        return;
    };
    let selectors = aggregation
        .cluster_role_selectors
        .as_deref()
        .unwrap_or_default();
    let mut matched: Vec<(&String, &ClusterRole)> = all
        .iter()
        .filter(|(_, other)| {
            let labels = other.metadata.labels.clone().unwrap_or_default();
            selectors.iter().any(|s| selector_matches(s, &labels))
        })
        .collect();
    matched.sort_by_key(|(name, _)| *name);
    for (_, other) in matched {
        collect_rules(all, other, seen, rules);
    }
}

fn selector_matches(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

fn subject_matches(subject: &Subject, user: &UserInfo, binding_namespace: &str) -> bool {
    match subject.kind.as_str() {
        "User" => subject.name == user.name,
        "Group" => user.groups.contains(&subject.name),
        "ServiceAccount" => {
            let ns = subject.namespace.as_deref().unwrap_or(binding_namespace);
            user.name == format!("system:serviceaccount:{ns}:{}", subject.name)
        }
        _ => false,
    }
}

fn has(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

/// Whether `rule` allows the request `attrs` describes.
pub(crate) fn rule_allows(rule: &PolicyRule, attrs: &Attributes) -> bool {
    if !has(&rule.verbs, &attrs.verb) {
        return false;
    }
    let Some(resource) = &attrs.resource else {
        return rule.non_resource_urls.iter().flatten().any(|url| {
            url == "*"
                || *url == attrs.path
                || url
                    .strip_suffix('*')
                    .is_some_and(|prefix| attrs.path.starts_with(prefix))
        });
    };
    if !has(
        rule.api_groups.as_deref().unwrap_or_default(),
        &resource.group,
    ) {
        return false;
    }
    let resources = rule.resources.as_deref().unwrap_or_default();
    // `pods`, `pods/log`, `*` or `*/log` (compared without allocating: this
    // runs for every rule a request is checked against).
    let resource_ok = resources.iter().any(|r| {
        r == "*"
            || match (&resource.subresource, r.split_once('/')) {
                (None, None) => *r == resource.resource,
                (Some(sub), Some((res, rsub))) => {
                    rsub == sub && (res == "*" || res == resource.resource)
                }
                _ => false,
            }
    });
    if !resource_ok {
        return false;
    }
    match rule.resource_names.as_deref() {
        None | Some([]) => true,
        Some(names) => resource.name.as_ref().is_some_and(|n| names.contains(n)),
    }
}

/// Why a request was allowed (or that it was not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

impl Policy {
    fn role_rules(&self, role_ref: &RoleRef, namespace: &str) -> &[PolicyRule] {
        match role_ref.kind.as_str() {
            "ClusterRole" => self
                .cluster_rules
                .get(&role_ref.name)
                .map(Vec::as_slice)
                .unwrap_or_default(),
            "Role" => self
                .roles
                .get(&(namespace.to_owned(), role_ref.name.clone()))
                .and_then(|r| r.rules.as_deref())
                .unwrap_or_default(),
            _ => &[],
        }
    }

    /// Every rule granted to `user`, with the binding that grants it:
    /// cluster-wide, then in `namespace`. (What grants a rule is only
    /// rendered for the one that decides: this runs on every request.)
    fn rules_of<'a>(
        &'a self,
        user: &'a UserInfo,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a PolicyRule, Grant<'a>)> + 'a {
        let cluster = self
            .cluster_bindings
            .iter()
            .filter(|b| {
                b.subjects
                    .iter()
                    .flatten()
                    .any(|s| subject_matches(s, user, ""))
            })
            .flat_map(|b| {
                self.role_rules(&b.role_ref, "")
                    .iter()
                    .map(move |r| (r, Grant::Cluster(b)))
            });
        let local = namespace
            .and_then(|ns| self.bindings.get(ns).map(|list| (ns, list)))
            .into_iter()
            .flat_map(move |(ns, list)| {
                list.iter()
                    .filter(move |b| {
                        b.subjects
                            .iter()
                            .flatten()
                            .any(|s| subject_matches(s, user, ns))
                    })
                    .flat_map(move |b| {
                        self.role_rules(&b.role_ref, ns)
                            .iter()
                            .map(move |r| (r, Grant::Namespaced(b)))
                    })
            });
        cluster.chain(local)
    }
}

/// The binding a rule comes from.
enum Grant<'a> {
    Cluster(&'a ClusterRoleBinding),
    Namespaced(&'a RoleBinding),
}

impl std::fmt::Display for Grant<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Grant::Cluster(b) => write!(
                f,
                "ClusterRoleBinding \"{}\" of ClusterRole \"{}\"",
                b.metadata.name.as_deref().unwrap_or_default(),
                b.role_ref.name
            ),
            Grant::Namespaced(b) => write!(
                f,
                "RoleBinding \"{}/{}\" of {} \"{}\"",
                b.metadata.name.as_deref().unwrap_or_default(),
                b.metadata.namespace.as_deref().unwrap_or_default(),
                b.role_ref.kind,
                b.role_ref.name
            ),
        }
    }
}

/// The RBAC authorizer: the policy kept in step with the store.
pub(crate) struct Rbac {
    policy: Arc<Followed<Policy>>,
}

impl Rbac {
    /// Loads the stored policy and follows its changes.
    pub(crate) async fn start(store: SharedStore) -> Arc<Self> {
        let policy = Followed::start(store, PREFIX.to_owned(), "the RBAC policy", |all| {
            Objects(all).policy()
        })
        .await;
        Arc::new(Self { policy })
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy.current()
    }

    /// Waits until the policy reflects the store at `revision` (a write of
    /// an RBAC object this server just made).
    pub(crate) async fn wait_for(&self, revision: u64) {
        self.policy.wait_for(revision).await
    }

    /// Whether a request is allowed (the per-request path: nothing is
    /// rendered).
    pub(crate) fn allows(&self, attrs: &Attributes) -> bool {
        let namespace = attrs.resource.as_ref().and_then(|r| r.namespace.as_deref());
        self.policy()
            .rules_of(&attrs.user, namespace)
            .any(|(rule, _)| rule_allows(rule, attrs))
    }

    /// Decides a request and says why (for reviews).
    pub(crate) fn authorize(&self, attrs: &Attributes) -> Decision {
        let policy = self.policy();
        let namespace = attrs.resource.as_ref().and_then(|r| r.namespace.as_deref());
        match policy
            .rules_of(&attrs.user, namespace)
            .find(|(rule, _)| rule_allows(rule, attrs))
        {
            Some((_, by)) => Decision {
                allowed: true,
                reason: format!("RBAC: allowed by {by}"),
            },
            None => Decision {
                allowed: false,
                reason: String::new(),
            },
        }
    }

    /// The rules a binding's `roleRef` grants in `namespace`.
    pub(crate) fn rules_of_role(&self, role_ref: &RoleRef, namespace: &str) -> Vec<PolicyRule> {
        self.policy().role_rules(role_ref, namespace).to_vec()
    }

    /// The rules `user` has in `namespace` (cluster-wide ones included).
    pub(crate) fn rules_for(&self, user: &UserInfo, namespace: &str) -> Vec<PolicyRule> {
        let policy = self.policy();
        let mut rules: Vec<PolicyRule> = Vec::new();
        for (rule, _) in policy.rules_of(user, Some(namespace)) {
            if !rules.contains(rule) {
                rules.push(rule.clone());
            }
        }
        rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::ResourceAttributes;

    fn rule(v: serde_json::Value) -> PolicyRule {
        serde_json::from_value(v).unwrap()
    }

    fn attrs(
        verb: &str,
        group: &str,
        resource: &str,
        sub: Option<&str>,
        name: Option<&str>,
    ) -> Attributes {
        Attributes {
            user: UserInfo::default(),
            verb: verb.into(),
            path: String::new(),
            resource: Some(ResourceAttributes {
                group: group.into(),
                resource: resource.into(),
                subresource: sub.map(Into::into),
                namespace: Some("a".into()),
                name: name.map(Into::into),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn rules_match_verbs_groups_resources_subresources_and_names() {
        let pods = rule(
            serde_json::json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}),
        );
        assert!(rule_allows(&pods, &attrs("list", "", "pods", None, None)));
        assert!(!rule_allows(
            &pods,
            &attrs("delete", "", "pods", None, Some("p"))
        ));
        assert!(!rule_allows(
            &pods,
            &attrs("get", "apps", "pods", None, Some("p"))
        ));
        // A subresource is its own resource.
        assert!(!rule_allows(
            &pods,
            &attrs("get", "", "pods", Some("log"), Some("p"))
        ));
        let logs = rule(
            serde_json::json!({"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}),
        );
        assert!(rule_allows(
            &logs,
            &attrs("get", "", "pods", Some("log"), Some("p"))
        ));
        let any_scale =
            rule(serde_json::json!({"apiGroups": ["*"], "resources": ["*/scale"], "verbs": ["*"]}));
        assert!(rule_allows(
            &any_scale,
            &attrs("update", "apps", "deployments", Some("scale"), Some("d"))
        ));
        assert!(!rule_allows(
            &any_scale,
            &attrs("update", "apps", "deployments", None, Some("d"))
        ));
        let named = rule(
            serde_json::json!({"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["c"], "verbs": ["get", "list"]}),
        );
        assert!(rule_allows(
            &named,
            &attrs("get", "", "configmaps", None, Some("c"))
        ));
        assert!(!rule_allows(
            &named,
            &attrs("get", "", "configmaps", None, Some("d"))
        ));
        // A list names no object: resourceNames cannot allow it.
        assert!(!rule_allows(
            &named,
            &attrs("list", "", "configmaps", None, None)
        ));
    }

    #[test]
    fn aggregated_roles_take_the_rules_of_aggregated_roles() {
        let role = |v: serde_json::Value| -> ClusterRole { serde_json::from_value(v).unwrap() };
        let mut all = HashMap::new();
        for r in [
            role(
                serde_json::json!({"metadata": {"name": "edit", "labels": {"to-admin": "true"}},
                "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"to-edit": "true"}}]}}),
            ),
            role(
                serde_json::json!({"metadata": {"name": "view", "labels": {"to-edit": "true"}},
                "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"to-view": "true"}}]}}),
            ),
            role(
                serde_json::json!({"metadata": {"name": "view-pods", "labels": {"to-view": "true"}},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}),
            ),
            role(
                serde_json::json!({"metadata": {"name": "edit-pods", "labels": {"to-edit": "true"}},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}]}),
            ),
        ] {
            all.insert(r.metadata.name.clone().unwrap(), r);
        }
        let verbs: Vec<String> = aggregated_rules(&all, &all["edit"])
            .into_iter()
            .flat_map(|r| r.verbs)
            .collect();
        assert_eq!(verbs, ["create", "get"]);
    }

    #[test]
    fn non_resource_urls_match_exactly_or_by_prefix() {
        let r =
            rule(serde_json::json!({"nonResourceURLs": ["/healthz", "/apis/*"], "verbs": ["get"]}));
        let at = |path: &str| Attributes {
            user: UserInfo::default(),
            verb: "get".into(),
            path: path.into(),
            resource: None,
        };
        assert!(rule_allows(&r, &at("/healthz")));
        assert!(rule_allows(&r, &at("/apis/apps/v1")));
        assert!(!rule_allows(&r, &at("/metrics")));
        assert!(!rule_allows(&r, &attrs("get", "", "pods", None, None)));
    }
}
