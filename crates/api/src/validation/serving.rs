//! Validation of the Knative Serving kinds, as Knative's webhook does it:
//! the revision template (one serving container with an image, bounds on
//! concurrency and timeout, the autoscaling annotations), traffic targets
//! (exactly one destination each, percentages that sum to 100, unique tags)
//! and the immutability of a Revision's spec.

use std::collections::{BTreeMap, BTreeSet};

use crate::field::{Errors, FieldError};
use crate::knative::{self as kn, autoscaling};
use crate::names;

/// The longest request timeout a revision may ask for (Knative's
/// `max-revision-timeout-seconds` default).
const MAX_TIMEOUT_SECONDS: i64 = 600;

fn check_revision_spec(spec: &kn::RevisionSpec, path: &str, errs: &mut Errors) {
    let containers = &spec.pod.containers;
    if containers.is_empty() {
        errs.push(FieldError::required(
            format!("{path}.containers"),
            "a revision needs a container",
        ));
    }
    let mut names_seen = BTreeSet::new();
    let mut with_ports = 0;
    for (i, c) in containers.iter().enumerate() {
        let at = format!("{path}.containers[{i}]");
        if c.image.as_deref().is_none_or(str::is_empty) {
            errs.push(FieldError::required(format!("{at}.image"), ""));
        }
        if !c.name.is_empty() && !names_seen.insert(c.name.clone()) {
            errs.push(FieldError::duplicate(format!("{at}.name"), &c.name));
        }
        let ports = c.ports.as_deref().unwrap_or_default();
        if ports.len() > 1 {
            errs.push(FieldError::invalid(
                format!("{at}.ports"),
                "",
                "a container may expose at most one port",
            ));
        }
        if let Some(p) = ports.first() {
            with_ports += 1;
            if !(1..=65535).contains(&p.container_port) {
                errs.push(FieldError::invalid(
                    format!("{at}.ports[0].containerPort"),
                    p.container_port.to_string(),
                    "must be between 1 and 65535, inclusive",
                ));
            }
        }
    }
    if containers.len() > 1 && with_ports != 1 {
        errs.push(FieldError::invalid(
            format!("{path}.containers"),
            "",
            "exactly one container must expose a port when there are several",
        ));
    }
    if let Some(cc) = spec.container_concurrency
        && !(0..=1000).contains(&cc)
    {
        errs.push(FieldError::invalid(
            format!("{path}.containerConcurrency"),
            cc.to_string(),
            "must be between 0 and 1000, inclusive",
        ));
    }
    for (field, value) in [
        ("timeoutSeconds", spec.timeout_seconds),
        (
            "responseStartTimeoutSeconds",
            spec.response_start_timeout_seconds,
        ),
        ("idleTimeoutSeconds", spec.idle_timeout_seconds),
    ] {
        if let Some(v) = value
            && !(0..=MAX_TIMEOUT_SECONDS).contains(&v)
        {
            errs.push(FieldError::invalid(
                format!("{path}.{field}"),
                v.to_string(),
                format!("must be between 0 and {MAX_TIMEOUT_SECONDS}, inclusive"),
            ));
        }
    }
}

/// The autoscaling annotations, checked as Knative's autoscaler reads them.
fn check_scaling(annotations: &BTreeMap<String, String>, path: &str, errs: &mut Errors) {
    let at = |key: &str| format!("{path}.annotations[{key}]");
    let int = |key: &str, errs: &mut Errors| -> Option<i32> {
        let v = annotations.get(key)?;
        match v.trim().parse::<i32>() {
            Ok(n) if n >= 0 => Some(n),
            _ => {
                errs.push(FieldError::invalid(
                    at(key),
                    v,
                    "must be a non-negative integer",
                ));
                None
            }
        }
    };
    let min = int(autoscaling::MIN_SCALE, errs);
    let max = int(autoscaling::MAX_SCALE, errs);
    int(autoscaling::INITIAL_SCALE, errs);
    if let (Some(min), Some(max)) = (min, max)
        && max > 0
        && min > max
    {
        errs.push(FieldError::invalid(
            at(autoscaling::MAX_SCALE),
            max.to_string(),
            format!("must be at least min-scale ({min})"),
        ));
    }
    if let Some(v) = annotations.get(autoscaling::TARGET)
        && !v.trim().parse::<f64>().is_ok_and(|t| t >= 0.01)
    {
        errs.push(FieldError::invalid(
            at(autoscaling::TARGET),
            v,
            "must be a number of at least 0.01",
        ));
    }
    if let Some(v) = annotations.get(autoscaling::METRIC)
        && !matches!(v.as_str(), "concurrency" | "rps")
    {
        errs.push(FieldError::not_supported(
            at(autoscaling::METRIC),
            v,
            &["concurrency", "rps"],
        ));
    }
    for key in [autoscaling::WINDOW, autoscaling::RETENTION] {
        let Some(v) = annotations.get(key) else {
            continue;
        };
        match kn::parse_duration(v) {
            None => errs.push(FieldError::invalid(
                at(key),
                v,
                "must be a duration such as 60s or 2m",
            )),
            Some(d)
                if key == autoscaling::WINDOW
                    && !(std::time::Duration::from_secs(6)
                        ..=std::time::Duration::from_secs(3600))
                        .contains(&d) =>
            {
                errs.push(FieldError::invalid(at(key), v, "must be between 6s and 1h"))
            }
            Some(_) => {}
        }
    }
}

fn check_template(
    template: &kn::RevisionTemplateSpec,
    owner: Option<&str>,
    path: &str,
    errs: &mut Errors,
) {
    if let (Some(name), Some(owner)) = (template.metadata.name.as_deref(), owner)
        && !name.starts_with(&format!("{owner}-"))
    {
        errs.push(FieldError::invalid(
            format!("{path}.metadata.name"),
            name,
            format!("must have prefix \"{owner}-\""),
        ));
    }
    check_scaling(
        template
            .metadata
            .annotations
            .as_ref()
            .unwrap_or(&BTreeMap::new()),
        &format!("{path}.metadata"),
        errs,
    );
    check_revision_spec(&template.spec, &format!("{path}.spec"), errs);
}

/// Traffic targets: in a Service (`in_service`) a target names a revision or
/// the latest one, in a Route a revision or a configuration.
fn check_traffic(traffic: &[kn::TrafficTarget], in_service: bool, path: &str, errs: &mut Errors) {
    let mut total = 0i64;
    let mut tags = BTreeSet::new();
    for (i, t) in traffic.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let latest = t.latest_revision.unwrap_or(t.revision_name.is_none());
        match (&t.revision_name, latest) {
            (Some(_), true) => errs.push(FieldError::invalid(
                format!("{at}.latestRevision"),
                "true",
                "may not set revisionName together with latestRevision: true",
            )),
            (None, false) => errs.push(FieldError::required(
                format!("{at}.revisionName"),
                "latestRevision: false needs a revisionName",
            )),
            _ => {}
        }
        match (&t.configuration_name, in_service) {
            (Some(_), true) => errs.push(FieldError::forbidden(
                format!("{at}.configurationName"),
                "a Service's traffic names revisions; its configuration is its own",
            )),
            (Some(_), false) if t.revision_name.is_some() => errs.push(FieldError::invalid(
                format!("{at}.configurationName"),
                "",
                "expected exactly one of revisionName and configurationName",
            )),
            (None, false) if t.revision_name.is_none() => errs.push(FieldError::required(
                format!("{at}.revisionName"),
                "expected exactly one of revisionName and configurationName",
            )),
            _ => {}
        }
        if let Some(name) = &t.revision_name
            && let Err(detail) = names::dns1123_subdomain(name)
        {
            errs.push(FieldError::invalid(
                format!("{at}.revisionName"),
                name,
                detail,
            ));
        }
        let percent = t.percent.unwrap_or(0);
        if !(0..=100).contains(&percent) {
            errs.push(FieldError::invalid(
                format!("{at}.percent"),
                percent.to_string(),
                "must be between 0 and 100, inclusive",
            ));
        }
        total += percent;
        if let Some(tag) = &t.tag {
            if let Err(detail) = names::dns1035_label(tag) {
                errs.push(FieldError::invalid(format!("{at}.tag"), tag, detail));
            }
            if !tags.insert(tag.clone()) {
                errs.push(FieldError::duplicate(format!("{at}.tag"), tag));
            }
        }
        if t.url.is_some() {
            errs.push(FieldError::forbidden(
                format!("{at}.url"),
                "url is set by the system",
            ));
        }
    }
    if !traffic.is_empty() && total != 100 {
        errs.push(FieldError::invalid(
            path,
            total.to_string(),
            format!("traffic targets sum to {total}, want 100"),
        ));
    }
}

pub(super) fn validate_service(svc: &kn::Service, _old: Option<&kn::Service>, errs: &mut Errors) {
    check_template(
        &svc.spec.template,
        svc.metadata.name.as_deref(),
        "spec.template",
        errs,
    );
    check_traffic(&svc.spec.traffic, true, "spec.traffic", errs);
}

pub(super) fn validate_configuration(
    cfg: &kn::Configuration,
    _old: Option<&kn::Configuration>,
    errs: &mut Errors,
) {
    check_template(
        &cfg.spec.template,
        cfg.metadata.name.as_deref(),
        "spec.template",
        errs,
    );
}

pub(super) fn validate_revision(rev: &kn::Revision, old: Option<&kn::Revision>, errs: &mut Errors) {
    check_scaling(
        rev.metadata
            .annotations
            .as_ref()
            .unwrap_or(&BTreeMap::new()),
        "metadata",
        errs,
    );
    check_revision_spec(&rev.spec, "spec", errs);
    if let Some(old) = old
        && old.spec != rev.spec
    {
        errs.push(FieldError::forbidden(
            "spec",
            "a Revision is immutable: change its Configuration to make a new one",
        ));
    }
}

pub(super) fn validate_route(rt: &kn::Route, _old: Option<&kn::Route>, errs: &mut Errors) {
    check_traffic(&rt.spec.traffic, false, "spec.traffic", errs);
}
