//! Registry credentials from `kubernetes.io/dockerconfigjson` secrets.

use base64::Engine;

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The credentials a `.dockerconfigjson` document holds for `registry`
/// (matched on the host, with or without a scheme and path, as the
/// kubelet's keyring matches), from `auth` or `username`/`password`.
pub fn credentials_for(docker_config_json: &[u8], registry: &str) -> Option<Credentials> {
    let doc: serde_json::Value = serde_json::from_slice(docker_config_json).ok()?;
    let auths = doc.get("auths")?.as_object()?;
    let host = |key: &str| -> String {
        let key = key
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        key.split('/').next().unwrap_or_default().to_owned()
    };
    let wanted = if registry == "docker.io" {
        "index.docker.io"
    } else {
        registry
    };
    let entry = auths.iter().find_map(|(k, v)| {
        let h = host(k);
        (h == registry || h == wanted).then_some(v)
    })?;
    if let (Some(u), Some(p)) = (
        entry.get("username").and_then(|v| v.as_str()),
        entry.get("password").and_then(|v| v.as_str()),
    ) {
        return Some(Credentials {
            username: u.into(),
            password: p.into(),
        });
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry.get("auth")?.as_str()?)
        .ok()?;
    let (u, p) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(Credentials {
        username: u.into(),
        password: p.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_auth_and_username_password_entries() {
        let doc = br#"{"auths":{"https://127.0.0.1:5000/v2/":{"auth":"YWxpY2U6czNjcmV0"},"other.example":{"username":"bob","password":"pw"}}}"#;
        let c = credentials_for(doc, "127.0.0.1:5000").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret")
        );
        assert_eq!(
            credentials_for(doc, "other.example").unwrap().username,
            "bob"
        );
        assert!(credentials_for(doc, "elsewhere.example").is_none());
        assert!(credentials_for(b"not json", "x").is_none());
    }
}
