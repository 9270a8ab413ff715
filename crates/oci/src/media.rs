//! Media types, and telling Wasm from Linux images by them.

/// The CNCF Wasm OCI artifact's config and layer media types.
pub const WASM_CONFIG_MEDIA_TYPE: &str = oci_wasm::WASM_MANIFEST_CONFIG_MEDIA_TYPE;
pub const WASM_LAYER_MEDIA_TYPE: &str = oci_wasm::WASM_LAYER_MEDIA_TYPE;
/// The older layer type used by wasm-to-oci and early shims.
pub const WASM_LEGACY_LAYER_MEDIA_TYPE: &str = "application/vnd.wasm.content.layer.v1+wasm";

/// Whether Wasm bytes are a component (layer 1 of the binary format) rather
/// than a core module.
pub fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[6..8] == [1, 0]
}

/// Whether bytes look like Wasm at all.
pub(crate) fn is_wasm(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm"
}

pub(crate) fn is_wasm_layer(media_type: &str) -> bool {
    media_type == WASM_LAYER_MEDIA_TYPE || media_type == WASM_LEGACY_LAYER_MEDIA_TYPE
}

pub(crate) fn is_tar_layer(media_type: &str) -> bool {
    media_type.contains(".tar") || media_type.ends_with(".rootfs.diff.tar.gzip")
}

pub(crate) fn is_gzip(media_type: &str) -> bool {
    media_type.ends_with("gzip")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_and_components_are_told_apart() {
        assert!(is_component(b"\0asm\x0d\0\x01\0"));
        assert!(!is_component(b"\0asm\x01\0\0\0"));
        assert!(is_wasm(b"\0asm\x01\0\0\0"));
        assert!(!is_wasm(b"\x7fELF\x02\x01\x01\0"));
        assert!(is_tar_layer("application/vnd.oci.image.layer.v1.tar+gzip"));
        assert!(is_tar_layer(
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        ));
        assert!(is_wasm_layer("application/wasm"));
    }
}
