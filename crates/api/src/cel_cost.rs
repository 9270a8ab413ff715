//! What a CustomResourceDefinition's CEL rules may cost, estimated when the
//! CRD is written, as Kubernetes estimates it: a rule whose worst case is
//! too expensive is refused then, so no object can later make the API
//! server spend unbounded time checking it.
//!
//! The estimate is in evaluation steps: one per operation, and for each
//! macro that iterates (`all`, `exists`, `exists_one`, `map`, `filter`)
//! the cost of its body times the most elements its list or map can hold.
//! That bound comes from the schema (`maxItems`, `maxProperties`), else from
//! the largest request the API takes: a list of unknown size is counted at
//! what fits in 3 MiB at two bytes an element. A rule costs at most
//! [`PER_CALL_LIMIT`]; a rule under lists or maps runs once per element, and
//! all of a CRD's rules, so multiplied, cost at most [`PER_CRD_LIMIT`]
//! (Kubernetes' `PerCallLimit` and `StaticEstimatedCRDCostLimit`).

use std::collections::HashMap;

use cel_parser::{Expression, Member};
use serde_json::Value;

/// The most a single rule's evaluation may be estimated to cost.
pub const PER_CALL_LIMIT: u64 = 1_000_000;
/// The most all of a CRD's rules, each times how often it runs, may cost.
pub const PER_CRD_LIMIT: u64 = 100_000_000;
/// Elements of a list or map with no declared bound: what a 3 MiB request
/// holds at two bytes each.
const UNBOUNDED: u64 = 3 * 1024 * 1024 / 2;

/// The macros that evaluate their body once per element.
const ITERATING: &[&str] = &["all", "exists", "exists_one", "map", "filter"];

/// The estimated cost of `rule` with `self` of `schema`; `None` if it does
/// not parse (its compilation error is reported on its own).
pub fn estimate(rule: &str, schema: &Value) -> Option<u64> {
    let expression = std::panic::catch_unwind(|| cel_parser::parse(rule))
        .ok()?
        .ok()?;
    let mut scope = HashMap::new();
    scope.insert("self".to_owned(), Some(schema));
    scope.insert("oldSelf".to_owned(), Some(schema));
    Some(cost(&expression, &scope))
}

/// How many elements a value of `schema` can have (`None`: not known).
pub fn bound(schema: Option<&Value>) -> u64 {
    let Some(schema) = schema else {
        return UNBOUNDED;
    };
    let declared = match schema["type"].as_str() {
        Some("array") => schema["maxItems"].as_u64(),
        Some("object") => schema["maxProperties"].as_u64(),
        _ => None,
    };
    declared.unwrap_or(UNBOUNDED)
}

type Scope<'a> = HashMap<String, Option<&'a Value>>;

fn cost(e: &Expression, scope: &Scope<'_>) -> u64 {
    match e {
        Expression::FunctionCall(function, target, args) => {
            let name = match function.as_ref() {
                Expression::Ident(n) => n.as_str(),
                _ => "",
            };
            match (ITERATING.contains(&name), target, args.split_first()) {
                (true, Some(target), Some((Expression::Ident(var), body))) => {
                    let over = schema_of(target, scope);
                    let mut inner = scope.clone();
                    inner.insert(var.to_string(), over.and_then(element));
                    let per_element = body
                        .iter()
                        .fold(1u64, |sum, b| sum.saturating_add(cost(b, &inner)));
                    cost(target, scope).saturating_add(bound(over).saturating_mul(per_element))
                }
                _ => {
                    let mut sum = 1u64.saturating_add(cost(function, scope));
                    if let Some(t) = target {
                        sum = sum.saturating_add(cost(t, scope));
                    }
                    args.iter()
                        .fold(sum, |sum, a| sum.saturating_add(cost(a, scope)))
                }
            }
        }
        Expression::Arithmetic(a, _, b)
        | Expression::Relation(a, _, b)
        | Expression::Or(a, b)
        | Expression::And(a, b) => 1u64
            .saturating_add(cost(a, scope))
            .saturating_add(cost(b, scope)),
        Expression::Ternary(a, b, c) => 1u64
            .saturating_add(cost(a, scope))
            .saturating_add(cost(b, scope).max(cost(c, scope))),
        Expression::Unary(_, a) => 1u64.saturating_add(cost(a, scope)),
        Expression::Member(base, member) => {
            let inner = match member.as_ref() {
                Member::Index(i) => cost(i, scope),
                Member::Fields(fields) => fields
                    .iter()
                    .fold(0u64, |sum, (_, v)| sum.saturating_add(cost(v, scope))),
                Member::Attribute(_) => 0,
            };
            1u64.saturating_add(cost(base, scope)).saturating_add(inner)
        }
        Expression::List(items) => items
            .iter()
            .fold(1u64, |sum, i| sum.saturating_add(cost(i, scope))),
        Expression::Map(entries) => entries.iter().fold(1u64, |sum, (k, v)| {
            sum.saturating_add(cost(k, scope))
                .saturating_add(cost(v, scope))
        }),
        Expression::Atom(_) | Expression::Ident(_) => 1,
    }
}

/// The schema of what `e` evaluates to, where it names a part of `self`.
fn schema_of<'a>(e: &Expression, scope: &Scope<'a>) -> Option<&'a Value> {
    match e {
        Expression::Ident(name) => scope.get(name.as_str()).copied().flatten(),
        Expression::Member(base, member) => {
            let base = schema_of(base, scope)?;
            match member.as_ref() {
                Member::Attribute(name) => base["properties"]
                    .get(name.as_str())
                    .or_else(|| base.get("additionalProperties").filter(|a| a.is_object())),
                Member::Index(_) => element(base),
                Member::Fields(_) => None,
            }
        }
        _ => None,
    }
}

/// The schema of a list's items, or of a map's keys (what a macro over the
/// map binds).
fn element(schema: &Value) -> Option<&Value> {
    match schema["type"].as_str() {
        Some("array") => schema.get("items"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn iteration_costs_its_body_times_the_bound() {
        let list = json!({"type": "array", "maxItems": 10, "items": {"type": "integer"}});
        let cheap = estimate("self.all(x, x > 0)", &list).unwrap();
        assert!(cheap < 100, "{cheap}");
        // Nested over the same list: the product.
        let nested = estimate("self.all(x, self.all(y, x <= y))", &list).unwrap();
        assert!(nested > 10 * cheap / 2 && nested < 1_000, "{nested}");
        // Unbounded: estimated at the request size.
        let open = json!({"type": "array", "items": {"type": "integer"}});
        assert!(estimate("self.all(x, x > 0)", &open).unwrap() > PER_CALL_LIMIT);
        assert!(estimate("size(self) < 5", &open).unwrap() < 10);
    }

    #[test]
    fn members_find_the_bounds_of_nested_lists() {
        let schema = json!({"type": "object", "properties": {
            "items": {"type": "array", "maxItems": 100, "items": {"type": "object", "properties": {
                "tags": {"type": "array", "maxItems": 5, "items": {"type": "string"}}}}}}});
        let c = estimate("self.items.all(i, i.tags.all(t, t != ''))", &schema).unwrap();
        // 100 items, each 5 tags of a few steps.
        assert!((500..10_000).contains(&c), "{c}");
    }
}
