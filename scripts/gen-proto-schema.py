#!/usr/bin/env python3
"""Generates crates/apiserver/src/protobuf/schema.rs: the protobuf field
numbers of the Kubernetes messages the API server accepts as
`application/vnd.kubernetes.protobuf` bodies, with each field's JSON name.

Field numbers and types come from the k8s-pb crate's prost definitions; JSON
names from the k8s-openapi crate's deserializers (they match prost's snake
case identifiers). Both crates are read from the local cargo registry, so run
`cargo fetch` first. Re-run when either crate is upgraded:

    python3 scripts/gen-proto-schema.py > crates/apiserver/src/protobuf/schema.rs
"""

import glob
import os
import re
import sys

REGISTRY = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/"))
K8S_PB = "k8s-pb-0.9.0"
K8S_OPENAPI = "k8s-openapi-0.29.0"
# JSON names are read from the newest API version k8s-openapi has, so fields
# newer than the version we serve still get their real names.
OPENAPI_VERSION = None

# Messages a client may send as a body; everything they reach is included.
ROOTS = [
    "k8s.io.api.core.v1." + k
    for k in ["Namespace", "Pod", "Node", "Service", "Endpoints", "ConfigMap", "Secret", "Event", "ServiceAccount", "Binding", "ResourceQuota", "LimitRange", "PersistentVolume", "PersistentVolumeClaim"]
] + [
    "k8s.io.api.apps.v1.Deployment",
    "k8s.io.api.apps.v1.ReplicaSet",
    "k8s.io.api.apps.v1.DaemonSet",
    "k8s.io.api.apps.v1.StatefulSet",
    "k8s.io.api.apps.v1.ControllerRevision",
    "k8s.io.api.batch.v1.Job",
    "k8s.io.api.batch.v1.CronJob",
    "k8s.io.api.coordination.v1.Lease",
    "k8s.io.api.discovery.v1.EndpointSlice",
    "k8s.io.api.node.v1.RuntimeClass",
    "k8s.io.api.scheduling.v1.PriorityClass",
    "k8s.io.api.admissionregistration.v1.MutatingWebhookConfiguration",
    "k8s.io.api.admissionregistration.v1.ValidatingWebhookConfiguration",
    "k8s.io.api.admissionregistration.v1.ValidatingAdmissionPolicy",
    "k8s.io.api.admissionregistration.v1.ValidatingAdmissionPolicyBinding",
    "k8s.io.api.storage.v1.StorageClass",
    "k8s.io.api.autoscaling.v1.Scale",
    "k8s.io.api.autoscaling.v1.HorizontalPodAutoscaler",
    "k8s.io.api.autoscaling.v2.HorizontalPodAutoscaler",
    "k8s.io.api.networking.v1.Ingress",
    "k8s.io.api.networking.v1.IngressClass",
    "k8s.io.api.networking.v1.NetworkPolicy",
    "k8s.io.api.policy.v1.PodDisruptionBudget",
    "k8s.io.api.policy.v1.Eviction",
    "k8s.io.api.certificates.v1.CertificateSigningRequest",
    "k8s.io.api.rbac.v1.Role",
    "k8s.io.api.rbac.v1.ClusterRole",
    "k8s.io.api.rbac.v1.RoleBinding",
    "k8s.io.api.rbac.v1.ClusterRoleBinding",
    "k8s.io.api.authentication.v1.SelfSubjectReview",
    "k8s.io.api.authentication.v1.TokenRequest",
    "k8s.io.api.authorization.v1.SubjectAccessReview",
    "k8s.io.api.authorization.v1.SelfSubjectAccessReview",
    "k8s.io.api.authorization.v1.LocalSubjectAccessReview",
    "k8s.io.api.authorization.v1.SelfSubjectRulesReview",
    "k8s.io.apimachinery.pkg.apis.meta.v1.DeleteOptions",
]

# Messages the decoder maps by hand (their JSON form is not an object).
SPECIAL = {
    "k8s.io.apimachinery.pkg.apis.meta.v1.Time",
    "k8s.io.apimachinery.pkg.apis.meta.v1.MicroTime",
    "k8s.io.apimachinery.pkg.apis.meta.v1.Duration",
    "k8s.io.apimachinery.pkg.apis.meta.v1.FieldsV1",
    "k8s.io.apimachinery.pkg.api.resource.Quantity",
    "k8s.io.apimachinery.pkg.util.intstr.IntOrString",
    "k8s.io.apimachinery.pkg.runtime.RawExtension",
}

SCALARS = {"string", "bytes", "int32", "int64", "bool", "double", "float", "uint32", "uint64", "sint32", "sint64", "fixed32", "fixed64"}


def find(name):
    for r in REGISTRY:
        p = os.path.join(r, name)
        if os.path.isdir(p):
            return p
    sys.exit(f"{name} not in the cargo registry: run `cargo fetch` first")


def norm(ident):
    """Rust idents of one field differ between the crates (`r#type`/`type_`,
    `pod_cid_rs`/`pod_cidrs`); they agree without underscores and case."""
    return ident.removeprefix("r#").replace("_", "").lower()


def camel(ident):
    ident = ident.removeprefix("r#")
    head, *rest = ident.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def openapi_names():
    """(package, lowercased type name) -> {rust ident: json name}."""
    base = os.path.join(find(K8S_OPENAPI), "src")
    version = OPENAPI_VERSION or max(
        (d for d in os.listdir(base) if re.fullmatch(r"v1_\d+", d)), key=lambda d: int(d[3:])
    )
    root = os.path.join(base, version)
    out = {}
    for path in glob.glob(os.path.join(root, "**", "*.rs"), recursive=True):
        rel = os.path.relpath(os.path.dirname(path), root).replace(os.sep, ".")
        text = open(path).read()
        for m in re.finditer(r"Deserialize<'de> for (\w+) \{(.*?)\n\}\n", text, re.S):
            fields = dict((norm(ident), js) for js, ident in re.findall(r'"([^"]+)" => Field::Key_(\w+),', m.group(2)))
            out[("k8s.io." + rel, m.group(1).lower())] = fields
    return out


def pb_messages():
    """full proto name -> [(tag, ident, kind, type, repeated, map)]."""
    root = os.path.join(find(K8S_PB), "src")
    msgs = {}
    for path in glob.glob(os.path.join(root, "**", "mod.rs"), recursive=True):
        rel = os.path.relpath(os.path.dirname(path), root)
        parts = rel.split(os.sep)
        pkg = "k8s.io." + ".".join(parts)
        text = open(path).read()
        for m in re.finditer(r"pub struct (\w+) \{(.*?)\n\}", text, re.S):
            fields = []
            for chunk in m.group(2).split("#[prost(")[1:]:
                attrs, _, rest = chunk.partition(")]")
                code = " ".join(l.strip() for l in rest.splitlines() if l.strip() and not l.strip().startswith(("///", "#[")))
                a = re.match(r"pub (r#\w+|\w+):\s*(.*?),?\s*$", code)
                ident, ty = a.group(1), re.sub(r",\s*>", ">", a.group(2))
                tag = int(re.search(r'tag = "(\d+)"', attrs).group(1))
                repeated = "repeated" in attrs
                mm = re.search(r'(?:btree_)?map = "(\w+), (\w+)(?:\(.*?\))?"', attrs)
                if mm:
                    key, val = mm.group(1), mm.group(2)
                    vtype = ""
                    if val == "message":
                        vtype = resolve(parts, ty.rsplit(",", 1)[-1].strip().rstrip(">").strip().rstrip(","))
                    fields.append((tag, ident, "map_" + val, vtype, False))
                    continue
                kind = re.match(r"\s*(\w+)", attrs).group(1)
                if kind == "message":
                    fields.append((tag, ident, "message", resolve(parts, ty), repeated))
                elif kind in SCALARS:
                    fields.append((tag, ident, kind, "", repeated))
                else:
                    sys.exit(f"unhandled prost kind {kind} in {pkg}.{m.group(1)}")
            msgs[pkg + "." + m.group(1)] = fields
    return msgs


def resolve(parts, ty):
    """A Rust type path relative to module `parts` -> full proto name."""
    ty = re.sub(r"::core::option::Option<|::prost::alloc::vec::Vec<|::prost::alloc::boxed::Box<|>", "", ty).strip()
    segs = ty.split("::")
    base = list(parts)
    while segs and segs[0] == "super":
        base.pop()
        segs.pop(0)
    return "k8s.io." + ".".join(base + segs)


def main():
    names = openapi_names()
    msgs = pb_messages()
    seen, todo = [], list(ROOTS)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in msgs:
            sys.exit(f"message {name} not found in {K8S_PB}")
        seen.append(name)
        todo.extend(t for (_, _, _, t, _) in msgs[name] if t)
    # The same Rust ident has the same JSON name everywhere in the API; this
    # names fields of messages that have no k8s-openapi struct of their own
    # (those Kubernetes inlines into a parent, such as VolumeSource).
    global_names = {}
    for fields in names.values():
        for ident, js in fields.items():
            global_names.setdefault(ident, js)
    print("//! Generated by scripts/gen-proto-schema.py from the k8s-pb and k8s-openapi")
    print("//! crates: protobuf field numbers of the messages accepted as request bodies,")
    print("//! with their JSON names. Do not edit by hand.")
    print()
    print("use super::{Field, Kind};")
    print()
    print("pub(super) static MESSAGES: &[(&str, &[Field])] = &[")
    for name in sorted(seen):
        pkg, _, short = name.rpartition(".")
        own = names.get((pkg, short.lower()))
        print(f'    ("{name}", &[')
        for tag, ident, kind, ty, repeated in msgs[name]:
            bare = norm(ident)
            # A message field its parent's JSON form does not have is inlined.
            inline = own is not None and bare not in own and kind == "message"
            js = (own or {}).get(bare) or global_names.get(bare)
            if js is None:
                js = camel(ident)
                if not inline and name not in SPECIAL:
                    print(f"warning: guessed JSON name {js} for {name}.{ident}", file=sys.stderr)
            k = {"map_string": "MapString", "map_bytes": "MapBytes", "map_message": "MapMessage"}.get(kind) or kind.capitalize()
            print(f'        Field {{ tag: {tag}, json: "{js}", kind: Kind::{k}, message: "{ty}", repeated: {str(repeated).lower()}, inline: {str(inline).lower()} }},')
        print("    ]),")
    print("];")


main()
