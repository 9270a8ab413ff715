//! Validation of the HTTP routing kinds: Ingress and IngressClass as
//! Kubernetes' networking validation does it, GatewayClass, Gateway and
//! HTTPRoute as the Gateway API's schemas and CEL rules do.

use std::collections::BTreeSet;

use k8s_openapi::api::networking::v1 as networking;

use crate::field::{Errors, FieldError};
use crate::gateway_api as gw;
use crate::names;

/// A host name as Ingress and HTTPRoute take it: a DNS subdomain, with an
/// optional leading `*.` label, never an IP address.
fn check_host(field: String, host: &str, errs: &mut Errors) {
    if host.parse::<std::net::IpAddr>().is_ok() {
        errs.push(FieldError::invalid(
            field,
            host,
            "must be a DNS name, not an IP address",
        ));
        return;
    }
    let bare = host.strip_prefix("*.").unwrap_or(host);
    if let Err(detail) = names::dns1123_subdomain(bare) {
        errs.push(FieldError::invalid(field, host, detail));
    }
}

/// `example.com/some-controller`: a domain-prefixed path.
fn check_controller(field: &str, value: &str, errs: &mut Errors) {
    match value.split_once('/') {
        Some((domain, path)) if !path.is_empty() && names::dns1123_subdomain(domain).is_ok() => {}
        _ => errs.push(FieldError::invalid(
            field,
            value,
            "must be a domain-prefixed path (such as \"acme.io/foo\")",
        )),
    }
    if value.len() > 253 {
        errs.push(FieldError::invalid(
            field,
            value,
            "must be no more than 253 characters",
        ));
    }
}

fn check_regex(field: String, re: &str, errs: &mut Errors) {
    if let Err(e) = regex::Regex::new(re) {
        errs.push(FieldError::invalid(
            field,
            re,
            format!("must be a valid regular expression: {e}"),
        ));
    }
}

pub(super) fn validate_ingress(
    ing: &networking::Ingress,
    _old: Option<&networking::Ingress>,
    errs: &mut Errors,
) {
    let Some(spec) = &ing.spec else {
        errs.push(FieldError::required("spec", ""));
        return;
    };
    let rules = spec.rules.as_deref().unwrap_or_default();
    if spec.default_backend.is_none() && rules.is_empty() {
        errs.push(FieldError::invalid(
            "spec",
            "",
            "either `defaultBackend` or `rules` must be specified",
        ));
    }
    if let Some(class) = &spec.ingress_class_name
        && let Err(d) = names::dns1123_subdomain(class)
    {
        errs.push(FieldError::invalid("spec.ingressClassName", class, d));
    }
    if let Some(b) = &spec.default_backend {
        validate_ingress_backend("spec.defaultBackend", b, errs);
    }
    for (i, rule) in rules.iter().enumerate() {
        if let Some(host) = &rule.host {
            check_host(format!("spec.rules[{i}].host"), host, errs);
        }
        let Some(http) = &rule.http else { continue };
        if http.paths.is_empty() {
            errs.push(FieldError::required(
                format!("spec.rules[{i}].http.paths"),
                "",
            ));
        }
        for (j, p) in http.paths.iter().enumerate() {
            let at = format!("spec.rules[{i}].http.paths[{j}]");
            let path = p.path.as_deref().unwrap_or_default();
            match p.path_type.as_str() {
                "Exact" | "Prefix" => {
                    if !path.starts_with('/') {
                        errs.push(FieldError::invalid(
                            format!("{at}.path"),
                            path,
                            "must be an absolute path",
                        ));
                    }
                }
                "ImplementationSpecific" => {
                    if !path.is_empty() && !path.starts_with('/') {
                        errs.push(FieldError::invalid(
                            format!("{at}.path"),
                            path,
                            "must be an absolute path",
                        ));
                    }
                }
                "" => errs.push(FieldError::required(
                    format!("{at}.pathType"),
                    "pathType must be specified",
                )),
                other => errs.push(FieldError::not_supported(
                    format!("{at}.pathType"),
                    other,
                    &["Exact", "ImplementationSpecific", "Prefix"],
                )),
            }
            validate_ingress_backend(&format!("{at}.backend"), &p.backend, errs);
        }
    }
    for (i, tls) in spec.tls.iter().flatten().enumerate() {
        for (j, host) in tls.hosts.iter().flatten().enumerate() {
            check_host(format!("spec.tls[{i}].hosts[{j}]"), host, errs);
        }
    }
}

fn validate_ingress_backend(at: &str, b: &networking::IngressBackend, errs: &mut Errors) {
    match (&b.service, &b.resource) {
        (Some(_), Some(_)) => errs.push(FieldError::invalid(
            at,
            "",
            "cannot set both resource and service backends",
        )),
        (None, None) => errs.push(FieldError::invalid(
            at,
            "",
            "resource or service backend is required",
        )),
        (Some(svc), None) => {
            if let Err(d) = names::dns1035_label(&svc.name) {
                errs.push(FieldError::invalid(
                    format!("{at}.service.name"),
                    &svc.name,
                    d,
                ));
            }
            match svc.port.as_ref().map(|p| (&p.name, p.number)) {
                None | Some((None, None)) => errs.push(FieldError::required(
                    format!("{at}.service.port"),
                    "port name or number is required",
                )),
                Some((Some(_), Some(_))) => errs.push(FieldError::invalid(
                    format!("{at}.service.port"),
                    "",
                    "cannot set both port name & port number",
                )),
                Some((None, Some(n))) if !(1..=65535).contains(&n) => {
                    errs.push(FieldError::invalid(
                        format!("{at}.service.port.number"),
                        n,
                        "must be between 1 and 65535, inclusive",
                    ))
                }
                _ => {}
            }
        }
        (None, Some(_)) => {}
    }
}

pub(super) fn validate_ingress_class(
    class: &networking::IngressClass,
    old: Option<&networking::IngressClass>,
    errs: &mut Errors,
) {
    let controller = class
        .spec
        .as_ref()
        .and_then(|s| s.controller.as_deref())
        .unwrap_or_default();
    if controller.is_empty() {
        errs.push(FieldError::required("spec.controller", ""));
    } else {
        check_controller("spec.controller", controller, errs);
    }
    if let Some(old) = old {
        let before = old.spec.as_ref().and_then(|s| s.controller.as_deref());
        if before.unwrap_or_default() != controller {
            errs.push(FieldError::invalid(
                "spec.controller",
                controller,
                "field is immutable",
            ));
        }
    }
}

pub(super) fn validate_gateway_class(
    class: &gw::GatewayClass,
    old: Option<&gw::GatewayClass>,
    errs: &mut Errors,
) {
    let controller = &class.spec.controller_name;
    if controller.is_empty() {
        errs.push(FieldError::required("spec.controllerName", ""));
    } else {
        check_controller("spec.controllerName", controller, errs);
    }
    if let Some(old) = old
        && old.spec.controller_name != *controller
    {
        errs.push(FieldError::invalid(
            "spec.controllerName",
            controller,
            "Value is immutable",
        ));
    }
}

const PROTOCOLS: &[&str] = &["HTTP", "HTTPS", "TLS", "TCP", "UDP"];

pub(super) fn validate_gateway(g: &gw::Gateway, _old: Option<&gw::Gateway>, errs: &mut Errors) {
    let spec = &g.spec;
    if spec.gateway_class_name.is_empty() {
        errs.push(FieldError::required("spec.gatewayClassName", ""));
    }
    if spec.listeners.is_empty() || spec.listeners.len() > 64 {
        errs.push(FieldError::invalid(
            "spec.listeners",
            spec.listeners.len(),
            "must have between 1 and 64 listeners",
        ));
    }
    let mut names_seen = BTreeSet::new();
    let mut bindings = BTreeSet::new();
    for (i, l) in spec.listeners.iter().enumerate() {
        let at = format!("spec.listeners[{i}]");
        if let Err(d) = names::dns1123_subdomain(&l.name) {
            errs.push(FieldError::invalid(format!("{at}.name"), &l.name, d));
        } else if !names_seen.insert(l.name.as_str()) {
            errs.push(FieldError::duplicate(format!("{at}.name"), &l.name));
        }
        if !(1..=65535).contains(&l.port) {
            errs.push(FieldError::invalid(
                format!("{at}.port"),
                l.port,
                "must be between 1 and 65535, inclusive",
            ));
        }
        if !PROTOCOLS.contains(&l.protocol.as_str()) && !l.protocol.contains('/') {
            errs.push(FieldError::not_supported(
                format!("{at}.protocol"),
                &l.protocol,
                PROTOCOLS,
            ));
        }
        if let Some(host) = &l.hostname {
            check_host(format!("{at}.hostname"), host, errs);
        }
        match (l.protocol.as_str(), &l.tls) {
            ("HTTPS" | "TLS", None) => errs.push(FieldError::required(
                format!("{at}.tls"),
                "tls must be specified for protocols ['HTTPS', 'TLS']",
            )),
            ("HTTP" | "TCP" | "UDP", Some(_)) => errs.push(FieldError::forbidden(
                format!("{at}.tls"),
                "tls must not be specified for protocols ['HTTP', 'TCP', 'UDP']",
            )),
            (_, Some(tls)) => {
                let mode = tls.mode.as_deref().unwrap_or("Terminate");
                if !["Terminate", "Passthrough"].contains(&mode) {
                    errs.push(FieldError::not_supported(
                        format!("{at}.tls.mode"),
                        mode,
                        &["Terminate", "Passthrough"],
                    ));
                }
                if mode == "Terminate" && tls.certificate_refs.is_empty() && tls.options.is_none() {
                    errs.push(FieldError::required(
                        format!("{at}.tls.certificateRefs"),
                        "certificateRefs or options must be specified when mode is Terminate",
                    ));
                }
            }
            _ => {}
        }
        let from = l
            .allowed_routes
            .as_ref()
            .and_then(|a| a.namespaces.as_ref())
            .and_then(|n| n.from.as_deref())
            .unwrap_or("Same");
        if !["All", "Same", "Selector"].contains(&from) {
            errs.push(FieldError::not_supported(
                format!("{at}.allowedRoutes.namespaces.from"),
                from,
                &["All", "Same", "Selector"],
            ));
        }
        if !bindings.insert((l.port, l.hostname.clone().unwrap_or_default())) {
            errs.push(FieldError::invalid(
                at,
                &l.name,
                "Combination of port, protocol and hostname must be unique for each listener",
            ));
        }
    }
}

const FILTERS: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
    "RequestMirror",
    "ExtensionRef",
];

pub(super) fn validate_http_route(
    r: &gw::HTTPRoute,
    _old: Option<&gw::HTTPRoute>,
    errs: &mut Errors,
) {
    let spec = &r.spec;
    if spec.parent_refs.len() > 32 {
        errs.push(FieldError::invalid(
            "spec.parentRefs",
            spec.parent_refs.len(),
            "must have at most 32 items",
        ));
    }
    for (i, p) in spec.parent_refs.iter().enumerate() {
        if p.name.is_empty() {
            errs.push(FieldError::required(
                format!("spec.parentRefs[{i}].name"),
                "",
            ));
        }
    }
    for (i, h) in spec.hostnames.iter().enumerate() {
        check_host(format!("spec.hostnames[{i}]"), h, errs);
    }
    if spec.rules.len() > 16 {
        errs.push(FieldError::invalid(
            "spec.rules",
            spec.rules.len(),
            "must have at most 16 items",
        ));
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if rule.matches.len() > 64 {
            errs.push(FieldError::invalid(
                format!("{at}.matches"),
                rule.matches.len(),
                "must have at most 64 items",
            ));
        }
        for (j, m) in rule.matches.iter().enumerate() {
            validate_match(&format!("{at}.matches[{j}]"), m, errs);
        }
        validate_filters(&format!("{at}.filters"), &rule.filters, rule, errs);
        for (j, b) in rule.backend_refs.iter().enumerate() {
            let at = format!("{at}.backendRefs[{j}]");
            if b.name.is_empty() {
                errs.push(FieldError::required(format!("{at}.name"), ""));
            }
            let weight = b.weight.unwrap_or(1);
            if !(0..=1_000_000).contains(&weight) {
                errs.push(FieldError::invalid(
                    format!("{at}.weight"),
                    weight,
                    "must be between 0 and 1000000, inclusive",
                ));
            }
            let core_service = b.group.as_deref().unwrap_or_default().is_empty()
                && b.kind.as_deref().unwrap_or("Service") == "Service";
            if core_service && b.port.is_none() {
                errs.push(FieldError::required(
                    format!("{at}.port"),
                    "Must have port for Service reference",
                ));
            }
            if let Some(port) = b.port
                && !(1..=65535).contains(&port)
            {
                errs.push(FieldError::invalid(
                    format!("{at}.port"),
                    port,
                    "must be between 1 and 65535, inclusive",
                ));
            }
            validate_filters(&format!("{at}.filters"), &b.filters, rule, errs);
        }
    }
}

fn validate_match(at: &str, m: &gw::HTTPRouteMatch, errs: &mut Errors) {
    if let Some(path) = &m.path {
        let ty = path.type_.as_deref().unwrap_or("PathPrefix");
        let value = path.value.as_deref().unwrap_or("/");
        match ty {
            "Exact" | "PathPrefix" => {
                if !value.starts_with('/') {
                    errs.push(FieldError::invalid(
                        format!("{at}.path.value"),
                        value,
                        "value must be an absolute path and start with '/' when type one of ['Exact', 'PathPrefix']",
                    ));
                }
                if value.contains("//") || value.contains("/./") || value.contains("/../") {
                    errs.push(FieldError::invalid(
                        format!("{at}.path.value"),
                        value,
                        "must not contain '//', '/./' or '/../' when type one of ['Exact', 'PathPrefix']",
                    ));
                }
            }
            "RegularExpression" => check_regex(format!("{at}.path.value"), value, errs),
            other => errs.push(FieldError::not_supported(
                format!("{at}.path.type"),
                other,
                &["Exact", "PathPrefix", "RegularExpression"],
            )),
        }
    }
    for (what, list) in [("headers", &m.headers), ("queryParams", &m.query_params)] {
        let mut seen = BTreeSet::new();
        for (k, h) in list.iter().enumerate() {
            let at = format!("{at}.{what}[{k}]");
            let key = if what == "headers" {
                h.name.to_ascii_lowercase()
            } else {
                h.name.clone()
            };
            if h.name.is_empty() || !h.name.bytes().all(is_token_byte) {
                errs.push(FieldError::invalid(
                    format!("{at}.name"),
                    &h.name,
                    "must be a valid HTTP header or query parameter name",
                ));
            } else if !seen.insert(key) {
                errs.push(FieldError::duplicate(format!("{at}.name"), &h.name));
            }
            match h.type_.as_deref().unwrap_or("Exact") {
                "Exact" => {}
                "RegularExpression" => check_regex(format!("{at}.value"), &h.value, errs),
                other => errs.push(FieldError::not_supported(
                    format!("{at}.type"),
                    other,
                    &["Exact", "RegularExpression"],
                )),
            }
        }
    }
    const METHODS: &[&str] = &[
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    if let Some(method) = &m.method
        && !METHODS.contains(&method.as_str())
    {
        errs.push(FieldError::not_supported(
            format!("{at}.method"),
            method,
            METHODS,
        ));
    }
}

/// RFC 7230 token characters.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn validate_filters(
    at: &str,
    filters: &[gw::HTTPRouteFilter],
    rule: &gw::HTTPRouteRule,
    errs: &mut Errors,
) {
    let mut types = BTreeSet::new();
    for (k, f) in filters.iter().enumerate() {
        let at = format!("{at}[{k}]");
        let set = [
            ("RequestHeaderModifier", f.request_header_modifier.is_some()),
            (
                "ResponseHeaderModifier",
                f.response_header_modifier.is_some(),
            ),
            ("RequestRedirect", f.request_redirect.is_some()),
            ("URLRewrite", f.url_rewrite.is_some()),
            ("RequestMirror", f.request_mirror.is_some()),
            ("ExtensionRef", f.extension_ref.is_some()),
        ];
        if !FILTERS.contains(&f.type_.as_str()) {
            errs.push(FieldError::not_supported(
                format!("{at}.type"),
                &f.type_,
                FILTERS,
            ));
            continue;
        }
        for (name, present) in set {
            let field = format!("{at}.{}", lower_first(name));
            if name == f.type_ && !present {
                errs.push(FieldError::required(
                    field,
                    format!(
                        "filter.{} must be specified for {name} filter.type",
                        lower_first(name)
                    ),
                ));
            } else if name != f.type_ && present {
                errs.push(FieldError::forbidden(
                    field,
                    format!(
                        "filter.{} must be nil if the filter.type is not {name}",
                        lower_first(name)
                    ),
                ));
            }
        }
        if f.type_ != "RequestMirror"
            && f.type_ != "ExtensionRef"
            && !types.insert(f.type_.as_str())
        {
            errs.push(FieldError::invalid(
                format!("{at}.type"),
                &f.type_,
                "may be specified at most once per rule, except RequestMirror and ExtensionRef",
            ));
        }
        for (what, modifier) in [
            ("requestHeaderModifier", &f.request_header_modifier),
            ("responseHeaderModifier", &f.response_header_modifier),
        ] {
            for (j, h) in modifier
                .iter()
                .flat_map(|m| m.set.iter().chain(&m.add))
                .enumerate()
            {
                if h.name.is_empty() || !h.name.bytes().all(is_token_byte) {
                    errs.push(FieldError::invalid(
                        format!("{at}.{what}[{j}].name"),
                        &h.name,
                        "must be a valid HTTP header name",
                    ));
                }
            }
        }
        let path_modifier = f
            .request_redirect
            .as_ref()
            .and_then(|r| r.path.as_ref())
            .or_else(|| f.url_rewrite.as_ref().and_then(|r| r.path.as_ref()));
        if let Some(p) = path_modifier {
            match p.type_.as_str() {
                "ReplaceFullPath" if p.replace_full_path.is_none() => errs.push(
                    FieldError::required(format!("{at}.path.replaceFullPath"), ""),
                ),
                "ReplacePrefixMatch" => {
                    if p.replace_prefix_match.is_none() {
                        errs.push(FieldError::required(
                            format!("{at}.path.replacePrefixMatch"),
                            "",
                        ));
                    }
                    let prefixes_only = rule.matches.iter().all(|m| {
                        m.path
                            .as_ref()
                            .and_then(|p| p.type_.as_deref())
                            .unwrap_or("PathPrefix")
                            == "PathPrefix"
                    });
                    if !prefixes_only {
                        errs.push(FieldError::invalid(
                            format!("{at}.path.type"),
                            "ReplacePrefixMatch",
                            "ReplacePrefixMatch must be used with a PathPrefix path match",
                        ));
                    }
                }
                "ReplaceFullPath" => {}
                other => errs.push(FieldError::not_supported(
                    format!("{at}.path.type"),
                    other,
                    &["ReplaceFullPath", "ReplacePrefixMatch"],
                )),
            }
        }
        if let Some(code) = f.request_redirect.as_ref().and_then(|r| r.status_code)
            && ![301, 302, 303, 307, 308].contains(&code)
        {
            errs.push(FieldError::not_supported(
                format!("{at}.requestRedirect.statusCode"),
                &code.to_string(),
                &["301", "302", "303", "307", "308"],
            ));
        }
    }
    if types.contains("RequestRedirect") && types.contains("URLRewrite") {
        errs.push(FieldError::invalid(
            at,
            "",
            "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite, but not both",
        ));
    }
}

fn lower_first(s: &str) -> String {
    if s == "URLRewrite" {
        return "urlRewrite".into();
    }
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_ascii_lowercase().to_string() + c.as_str())
        .unwrap_or_default()
}
