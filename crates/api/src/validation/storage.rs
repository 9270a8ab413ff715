//! Validation of PersistentVolumes, PersistentVolumeClaims and
//! StorageClasses, as Kubernetes' core and storage validation: access modes
//! and sizes are present and known, a volume names exactly one source (a
//! `local` one with node affinity), and what Kubernetes freezes after
//! creation stays as it was.

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::storage::v1::StorageClass;

use crate::field::{Errors, FieldError};
use crate::names;
use crate::quantity;

const ACCESS_MODES: &[&str] = &[
    "ReadWriteOnce",
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOncePod",
];
const VOLUME_MODES: &[&str] = &["Block", "Filesystem"];
const RECLAIM: &[&str] = &["Retain", "Delete", "Recycle"];
const CLASS_RECLAIM: &[&str] = &["Delete", "Retain"];
const BINDING_MODES: &[&str] = &["Immediate", "WaitForFirstConsumer"];

fn access_modes(modes: Option<&Vec<String>>, path: &str, errs: &mut Errors) {
    let modes = modes.map(Vec::as_slice).unwrap_or_default();
    if modes.is_empty() {
        errs.push(FieldError::required(
            path,
            "at least 1 access mode is required",
        ));
    }
    for (i, m) in modes.iter().enumerate() {
        if !ACCESS_MODES.contains(&m.as_str()) {
            errs.push(FieldError::not_supported(
                format!("{path}[{i}]"),
                m,
                ACCESS_MODES,
            ));
        }
    }
    if modes.len() > 1 && modes.iter().any(|m| m == "ReadWriteOncePod") {
        errs.push(FieldError::forbidden(
            path,
            "may not use ReadWriteOncePod with other access modes",
        ));
    }
}

fn volume_mode(mode: Option<&String>, path: &str, errs: &mut Errors) {
    if let Some(m) = mode
        && !VOLUME_MODES.contains(&m.as_str())
    {
        errs.push(FieldError::not_supported(path, m, VOLUME_MODES));
    }
}

/// A storage size: present and greater than zero.
fn storage(
    map: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >,
    path: &str,
    errs: &mut Errors,
) {
    let field = format!("{path}[storage]");
    match map.and_then(|m| m.get("storage")) {
        None => errs.push(FieldError::required(field, "")),
        Some(q) => match quantity::parse(&q.0) {
            Ok(v) if v.millis() <= 0 => errs.push(FieldError::invalid(
                field,
                &q.0,
                "must be greater than zero",
            )),
            Ok(_) => {}
            Err(e) => errs.push(FieldError::invalid(field, &q.0, e)),
        },
    }
}

fn class_name(name: Option<&String>, path: &str, errs: &mut Errors) {
    if let Some(n) = name.filter(|n| !n.is_empty())
        && let Err(e) = names::dns1123_subdomain(n)
    {
        errs.push(FieldError::invalid(path, n, e));
    }
}

/// The volume sources a PersistentVolume names, by field name.
fn sources(spec: &core::PersistentVolumeSpec) -> Vec<&'static str> {
    let set = [
        ("hostPath", spec.host_path.is_some()),
        ("local", spec.local.is_some()),
        ("nfs", spec.nfs.is_some()),
        ("csi", spec.csi.is_some()),
        ("iscsi", spec.iscsi.is_some()),
        ("fc", spec.fc.is_some()),
        ("rbd", spec.rbd.is_some()),
        ("cephfs", spec.cephfs.is_some()),
        ("cinder", spec.cinder.is_some()),
        ("glusterfs", spec.glusterfs.is_some()),
        ("flexVolume", spec.flex_volume.is_some()),
        ("azureDisk", spec.azure_disk.is_some()),
        ("azureFile", spec.azure_file.is_some()),
        (
            "awsElasticBlockStore",
            spec.aws_elastic_block_store.is_some(),
        ),
        ("gcePersistentDisk", spec.gce_persistent_disk.is_some()),
        ("vsphereVolume", spec.vsphere_volume.is_some()),
        ("portworxVolume", spec.portworx_volume.is_some()),
        ("scaleIO", spec.scale_io.is_some()),
        ("storageos", spec.storageos.is_some()),
        ("quobyte", spec.quobyte.is_some()),
        ("flocker", spec.flocker.is_some()),
        (
            "photonPersistentDisk",
            spec.photon_persistent_disk.is_some(),
        ),
    ];
    set.into_iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| n)
        .collect()
}

pub(super) fn validate_persistent_volume(
    pv: &core::PersistentVolume,
    old: Option<&core::PersistentVolume>,
    errs: &mut Errors,
) {
    let Some(spec) = &pv.spec else {
        errs.push(FieldError::required("spec", ""));
        return;
    };
    access_modes(spec.access_modes.as_ref(), "spec.accessModes", errs);
    storage(spec.capacity.as_ref(), "spec.capacity", errs);
    volume_mode(spec.volume_mode.as_ref(), "spec.volumeMode", errs);
    class_name(
        spec.storage_class_name.as_ref(),
        "spec.storageClassName",
        errs,
    );
    if let Some(p) = &spec.persistent_volume_reclaim_policy
        && !RECLAIM.contains(&p.as_str())
    {
        errs.push(FieldError::not_supported(
            "spec.persistentVolumeReclaimPolicy",
            p,
            RECLAIM,
        ));
    }
    let named = sources(spec);
    match named.as_slice() {
        [] => errs.push(FieldError::required("spec", "must specify a volume type")),
        [_] => {}
        [_, more @ ..] => {
            for m in more {
                errs.push(FieldError::forbidden(
                    format!("spec.{m}"),
                    "may not specify more than 1 volume type",
                ));
            }
        }
    }
    if let Some(h) = &spec.host_path
        && !h.path.starts_with('/')
    {
        errs.push(FieldError::invalid(
            "spec.hostPath.path",
            &h.path,
            "must be an absolute path",
        ));
    }
    if let Some(l) = &spec.local {
        if !l.path.starts_with('/') {
            errs.push(FieldError::invalid(
                "spec.local.path",
                &l.path,
                "must be an absolute path",
            ));
        }
        if spec
            .node_affinity
            .as_ref()
            .and_then(|a| a.required.as_ref())
            .is_none()
        {
            errs.push(FieldError::required(
                "spec.nodeAffinity",
                "Local volume requires node affinity",
            ));
        }
    }
    if let Some(old) = old.and_then(|o| o.spec.as_ref()) {
        let source = |s: &core::PersistentVolumeSpec| {
            (
                s.host_path.clone(),
                s.local.clone(),
                s.nfs.clone(),
                s.csi.clone(),
            )
        };
        if source(old) != source(spec) {
            errs.push(FieldError::forbidden(
                "spec.persistentvolumesource",
                "spec.persistentvolumesource is immutable after creation",
            ));
        }
        if old.volume_mode != spec.volume_mode {
            errs.push(FieldError::invalid(
                "spec.volumeMode",
                spec.volume_mode.as_deref().unwrap_or_default(),
                "field is immutable",
            ));
        }
        if old.node_affinity.is_some() && old.node_affinity != spec.node_affinity {
            errs.push(FieldError::invalid(
                "spec.nodeAffinity",
                "",
                "field is immutable",
            ));
        }
    }
}

/// The spec of a claim, or of a StatefulSet's claim template, at `path`.
pub(crate) fn validate_claim_spec(
    spec: Option<&core::PersistentVolumeClaimSpec>,
    path: &str,
    errs: &mut Errors,
) {
    let Some(spec) = spec else {
        errs.push(FieldError::required(path, ""));
        return;
    };
    access_modes(
        spec.access_modes.as_ref(),
        &format!("{path}.accessModes"),
        errs,
    );
    storage(
        spec.resources.as_ref().and_then(|r| r.requests.as_ref()),
        &format!("{path}.resources.requests"),
        errs,
    );
    volume_mode(
        spec.volume_mode.as_ref(),
        &format!("{path}.volumeMode"),
        errs,
    );
    class_name(
        spec.storage_class_name.as_ref(),
        &format!("{path}.storageClassName"),
        errs,
    );
}

fn pvc_phase(claim: Option<&core::PersistentVolumeClaim>) -> Option<&str> {
    claim?.status.as_ref()?.phase.as_deref()
}

pub(super) fn validate_persistent_volume_claim(
    pvc: &core::PersistentVolumeClaim,
    old: Option<&core::PersistentVolumeClaim>,
    errs: &mut Errors,
) {
    validate_claim_spec(pvc.spec.as_ref(), "spec", errs);
    let old_claim = old;
    let (Some(old), Some(spec)) = (old.and_then(|o| o.spec.as_ref()), pvc.spec.as_ref()) else {
        return;
    };
    // As Kubernetes: a claim's spec is frozen, apart from its requests (which
    // may grow), its volume name once (binding) and a class set where there
    // was none.
    let mut frozen = spec.clone();
    let bound = pvc_phase(old_claim) == Some("Bound");
    if bound {
        frozen.resources = old.resources.clone();
    }
    if old.volume_name.as_deref().unwrap_or_default().is_empty() {
        frozen.volume_name = old.volume_name.clone();
    }
    if old.storage_class_name.is_none() {
        frozen.storage_class_name = None;
    }
    if frozen != *old {
        errs.push(FieldError::forbidden(
            "spec",
            "spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims",
        ));
    }
    let size = crate::storage::spec_request_bytes;
    if let (Some(before), Some(now)) = (size(old), size(spec))
        && now < before
    {
        errs.push(FieldError::forbidden(
            "spec.resources.requests.storage",
            "field can not be less than previous value",
        ));
    }
}

pub(super) fn validate_storage_class(
    sc: &StorageClass,
    old: Option<&StorageClass>,
    errs: &mut Errors,
) {
    if sc.provisioner.is_empty() {
        errs.push(FieldError::required("provisioner", ""));
    } else {
        if let Err(e) = names::qualified_name(&sc.provisioner) {
            errs.push(FieldError::invalid("provisioner", &sc.provisioner, e));
        }
    }
    if let Some(p) = &sc.reclaim_policy
        && !CLASS_RECLAIM.contains(&p.as_str())
    {
        errs.push(FieldError::not_supported("reclaimPolicy", p, CLASS_RECLAIM));
    }
    if let Some(m) = &sc.volume_binding_mode
        && !BINDING_MODES.contains(&m.as_str())
    {
        errs.push(FieldError::not_supported(
            "volumeBindingMode",
            m,
            BINDING_MODES,
        ));
    }
    if let Some(old) = old {
        // As Kubernetes: what a class provisions by is frozen.
        for (field, changed) in [
            ("parameters", old.parameters != sc.parameters),
            ("provisioner", old.provisioner != sc.provisioner),
            ("reclaimPolicy", old.reclaim_policy != sc.reclaim_policy),
            (
                "volumeBindingMode",
                old.volume_binding_mode != sc.volume_binding_mode,
            ),
        ] {
            if changed {
                errs.push(FieldError::forbidden(
                    field,
                    format!("updates to {field} are forbidden."),
                ));
            }
        }
    }
}
