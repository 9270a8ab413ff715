//! The cluster's certificate authority: its key and certificate, the
//! certificates it issues (API server serving, client identities, signed
//! CSRs), who a client certificate names, the rustls configurations that
//! serve and verify them, and accepting a TLS connection (`accept.rs`).
//!
//! Identities follow Kubernetes' x509 convention: the subject's common name
//! is the user, each organization a group (`O=system:masters` is the
//! cluster administrators' group).

mod accept;
pub use accept::{accept, next_connection};

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;

/// Why a certificate could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("a certificate names at most two groups (organizations); {0} asked")]
    TooManyGroups(usize),
    #[error(
        "cannot open sealed data: the secret is not the one it was sealed with, or the data is damaged"
    )]
    Unseal,
    #[error("an AES-GCM key is 16 or 32 bytes, not {0}")]
    KeyLength(usize),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

pub type Result<T> = std::result::Result<T, PkiError>;

/// Who a certificate names: the user (common name) and groups
/// (organizations).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

impl Identity {
    pub fn new(user: &str, groups: &[&str]) -> Self {
        Self {
            user: user.to_owned(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    /// The subject: `O=` each group, then `CN=` the user. rcgen keeps one
    /// value per attribute type, so the second group is written under a
    /// custom type with the organization's own OID; a third is refused.
    fn distinguished_name(&self) -> Result<DistinguishedName> {
        let mut dn = DistinguishedName::new();
        let types = [
            DnType::OrganizationName,
            DnType::CustomDnType(vec![2, 5, 4, 10]),
        ];
        if self.groups.len() > types.len() {
            return Err(PkiError::TooManyGroups(self.groups.len()));
        }
        for (group, ty) in self.groups.iter().zip(types) {
            dn.push(ty, group.as_str());
        }
        dn.push(DnType::CommonName, self.user.as_str());
        Ok(dn)
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What a serving certificate is valid for.
#[derive(Clone, Debug, Default)]
pub struct ServingNames {
    pub dns: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
}

impl ServingNames {
    /// The subject alternative names a certificate for these names carries.
    fn sans(&self) -> Vec<SanType> {
        self.dns
            .iter()
            .filter_map(|n| n.clone().try_into().ok().map(SanType::DnsName))
            .chain(self.ips.iter().map(|ip| SanType::IpAddress(*ip)))
            .collect()
    }
}

/// The cluster's certificate authority.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("hash", &self.hash()).finish()
    }
}

/// How long the CA is valid (kubeadm: 10 years).
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `contents` to `path` readable by its owner only (0600), through a
/// temporary file renamed into place.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// A leaf certificate's parameters for `who`, for one use, valid for
/// `lifetime`.
fn leaf_params(
    who: &Identity,
    usage: ExtendedKeyUsagePurpose,
    lifetime: Duration,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = who.distinguished_name()?;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, lifetime);
    Ok(params)
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks a few minutes apart, at most half the
    // lifetime: a short-lived certificate stays mostly in the future, so
    // renewing at 80 % of its span is still ahead of its end.
    let slack = Duration::from_secs(300).min(lifetime / 2);
    params.not_before = now - slack;
    params.not_after = now + lifetime;
}

impl Ca {
    /// A new CA named `name` (its common name).
    pub fn create(name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        Self::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// The CA from its certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::Pem(e.to_string()))?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    /// The CA kept in `dir` as `ca.crt` and `ca.key` (0600), made there on
    /// first use.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<Self> {
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        if cert_path.exists() && key_path.exists() {
            let cert = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            return Self::from_pem(&cert, &key);
        }
        let ca = Self::create(name)?;
        write_private(&key_path, &ca.key_pem())?;
        write_private(&cert_path, &ca.cert_pem)?;
        Ok(ca)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The SHA-256 of the CA certificate (DER), hex: what a join token pins.
    pub fn hash(&self) -> String {
        hash_der(&self.cert_der)
    }

    /// A serving certificate for `names`, with a new key.
    pub fn issue_serving(&self, common_name: &str, names: &ServingNames) -> Result<Issued> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.subject_alt_names = names.sans();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, Duration::from_secs(365 * 24 * 3600));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A client certificate for `who`, with a new key.
    pub fn issue_client(&self, who: &Identity, lifetime: Duration) -> Result<Issued> {
        let key = KeyPair::generate()?;
        let cert = self
            .client_params(who, lifetime)?
            .signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    fn client_params(&self, who: &Identity, lifetime: Duration) -> Result<CertificateParams> {
        leaf_params(who, ExtendedKeyUsagePurpose::ClientAuth, lifetime)
    }

    /// Signs a PKCS#10 request (PEM) as a client certificate for the
    /// identity its subject names, valid for `lifetime`. The request's own
    /// extensions are not copied: the certificate is for client
    /// authentication only.
    pub fn sign_client_csr(&self, csr_pem: &str, lifetime: Duration) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let who = csr_identity(csr_pem)?;
        let request = CertificateSigningRequestParams {
            params: self.client_params(&who, lifetime)?,
            public_key: csr.public_key,
        };
        Ok(request.signed_by(&self.issuer)?.pem())
    }

    /// Signs a PKCS#10 request (PEM) as a serving certificate for the
    /// names it asks for (see [`csr_serving_names`]; the caller decides
    /// whether they are the requester's to have), valid for `lifetime`,
    /// its subject the identity the request names.
    pub fn sign_serving_csr(&self, csr_pem: &str, lifetime: Duration) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let who = csr_identity(csr_pem)?;
        let mut params = leaf_params(&who, ExtendedKeyUsagePurpose::ServerAuth, lifetime)?;
        params.subject_alt_names = csr.params.subject_alt_names.clone();
        let request = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        Ok(request.signed_by(&self.issuer)?.pem())
    }

    /// The rustls configuration serving `serving` and verifying client
    /// certificates against this CA; clients without one are let through
    /// (to bearer tokens or anonymous access). Offers HTTP/2 and HTTP/1.1.
    pub fn server_tls(&self, serving: &Issued) -> Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()?;
        let (chain, key) = parse_pair(serving)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn parse_pair(pair: &Issued) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes())
        .map_err(|e| PkiError::Pem(e.to_string()))?;
    Ok((chain, key))
}

/// The SHA-256 of a DER certificate, hex.
pub fn hash_der(der: &[u8]) -> String {
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The SHA-256 (hex) of the first certificate in `pem`.
pub fn hash_pem(pem: &str) -> Result<String> {
    let der =
        CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Pem(e.to_string()))?;
    Ok(hash_der(&der))
}

fn names_of(name: &x509_parser::x509::X509Name<'_>) -> Identity {
    let text =
        |attr: &x509_parser::x509::AttributeTypeAndValue<'_>| attr.as_str().ok().map(str::to_owned);
    Identity {
        user: name.iter_common_name().find_map(text).unwrap_or_default(),
        groups: name.iter_organization().filter_map(text).collect(),
    }
}

/// Who a (verified) client certificate names; `None` when it cannot be
/// parsed or names no one.
pub fn identity_of(cert_der: &[u8]) -> Option<Identity> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let who = names_of(cert.subject());
    (!who.user.is_empty()).then_some(who)
}

/// When a certificate (PEM) stops being valid, as seconds since the epoch.
pub fn not_after(cert_pem: &str) -> Result<i64> {
    valid_between(cert_pem).map(|(_, until)| until)
}

/// When a certificate valid from `issued` to `expires` is renewed: at 80 %
/// of its lifetime (as the kubelet renews its certificates).
pub fn renew_at(
    issued: std::time::SystemTime,
    expires: std::time::SystemTime,
) -> std::time::SystemTime {
    let lifetime = expires.duration_since(issued).unwrap_or_default();
    issued + lifetime.mul_f64(0.8)
}

/// When a certificate (PEM) starts and stops being valid, as seconds since
/// the epoch.
pub fn valid_between(cert_pem: &str) -> Result<(i64, i64)> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| PkiError::Pem(e.to_string()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Pem(e.to_string()))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Who a PKCS#10 request (PEM) asks to be; its signature is checked.
pub fn csr_identity(csr_pem: &str) -> Result<Identity> {
    use x509_parser::prelude::FromDer;
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| PkiError::Pem(e.to_string()))?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| PkiError::Pem(e.to_string()))?;
    csr.verify_signature()
        .map_err(|_| PkiError::Cert(rcgen::Error::InvalidCertificationRequestSignature))?;
    Ok(names_of(&csr.certification_request_info.subject))
}

/// The names a PKCS#10 request (PEM) asks a serving certificate for.
pub fn csr_serving_names(csr_pem: &str) -> Result<ServingNames> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
    let mut names = ServingNames::default();
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::DnsName(n) => names.dns.push(n.as_str().to_owned()),
            SanType::IpAddress(ip) => names.ips.push(*ip),
            // Anything else (mail, URI) is not asked for by a node.
            _ => names.dns.push(format!("{san:?}")),
        }
    }
    Ok(names)
}

/// A new key and a PKCS#10 request (PEM) for a serving certificate of
/// `who` valid for `names`: (request, key).
pub fn new_serving_csr(who: &Identity, names: &ServingNames) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = who.distinguished_name()?;
    params.subject_alt_names = names.sans();
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// The identity the API server presents to node agents (kubeadm's
/// `kube-apiserver-kubelet-client`): agents serve their endpoint to a
/// client certificate of the cluster CA naming it, and to nothing else.
pub const AGENT_CLIENT: &str = "kube-apiserver-kubelet-client";

/// A client trusting the system's root certificates and those in
/// `extra_pem` (a cluster CA), presenting none. HTTP/1.1.
pub fn client_tls_system_roots(extra_pem: Option<&str>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(pem) = extra_pem {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.map_err(|e| PkiError::Pem(e.to_string()))?)?;
        }
    }
    if roots.is_empty() {
        return Err(PkiError::Pem(
            "no trusted certificate: the system has none and none was given".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn roots(ca_pem: &str) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| PkiError::Pem(e.to_string()))?)?;
    }
    Ok(roots)
}

/// A node agent's endpoint: serves `serving` and demands a client
/// certificate of the CA in `ca_pem` (checking whom it names is the
/// caller's). HTTP/1.1 (the exec and port-forward upgrades).
pub fn agent_server_tls(ca_pem: &str, serving: &Issued) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(ca_pem)?),
        provider.clone(),
    )
    .build()?;
    let (chain, key) = parse_pair(serving)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client of node agents: trusts only the CA in `ca_pem` for their
/// serving certificates and presents `client`. HTTP/1.1.
pub fn agent_client_tls(ca_pem: &str, client: &Issued) -> Result<Arc<rustls::ClientConfig>> {
    client_tls(ca_pem, Some(client))
}

/// A client trusting only the CA(s) in `ca_pem`, presenting `client` when
/// given. HTTP/1.1.
pub fn client_tls(ca_pem: &str, client: Option<&Issued>) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?);
    let mut config = match client {
        Some(client) => {
            let (chain, key) = parse_pair(client)?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client certificate that can be replaced while clients hold it: every
/// TLS handshake presents the one current then (as the kubelet's
/// certificate manager does for its rotating client certificate).
#[derive(Debug)]
pub struct ClientCertSlot {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl ClientCertSlot {
    pub fn new(client: &Issued) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            current: std::sync::RwLock::new(certified(client)?),
        }))
    }

    /// Presents `client` from the next handshake on.
    pub fn replace(&self, client: &Issued) -> Result<()> {
        let next = certified(client)?;
        *self.current.write().expect("certificate slot") = next;
        Ok(())
    }
}

impl rustls::client::ResolvesClientCert for ClientCertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().expect("certificate slot").clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn certified(pair: &Issued) -> Result<Arc<rustls::sign::CertifiedKey>> {
    let (chain, key) = parse_pair(pair)?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let key = provider.key_provider.load_private_key(key)?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(chain, key)))
}

/// A client trusting only the CA(s) in `ca_pem`, presenting whatever
/// certificate `slot` holds at each handshake. HTTP/2 (a node agent's API
/// connection).
pub fn client_tls_rotating(
    ca_pem: &str,
    slot: Arc<ClientCertSlot>,
) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_cert_resolver(slot);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A new key and a PKCS#10 request (PEM) for `who`: (request, key).
pub fn new_csr(who: &Identity) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = who.distinguished_name()?;
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// Signs and verifies service-account tokens: JWTs (ES256) with the
/// cluster's service-account key.
pub struct TokenSigner {
    key_pem: String,
    encoding: jsonwebtoken::EncodingKey,
    decoding: jsonwebtoken::DecodingKey,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner")
    }
}

/// A token that is not one of ours, or no longer valid.
#[derive(Debug, thiserror::Error)]
#[error("invalid token: {0}")]
pub struct TokenError(String);

impl TokenSigner {
    /// A signer with a new ECDSA P-256 key.
    pub fn generate() -> Result<Self> {
        Self::from_pem(&KeyPair::generate()?.serialize_pem())
    }

    /// The signer of a PKCS#8 PEM ECDSA P-256 key.
    pub fn from_pem(key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem)?;
        let pem_err = |e: jsonwebtoken::errors::Error| PkiError::Pem(e.to_string());
        Ok(Self {
            key_pem: key_pem.to_owned(),
            encoding: jsonwebtoken::EncodingKey::from_ec_pem(key_pem.as_bytes())
                .map_err(pem_err)?,
            decoding: jsonwebtoken::DecodingKey::from_ec_pem(key.public_key_pem().as_bytes())
                .map_err(pem_err)?,
        })
    }

    /// The signer kept in `path` (0600), made there on first use.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        if let Ok(pem) = std::fs::read_to_string(path) {
            return Self::from_pem(&pem);
        }
        let signer = Self::generate()?;
        write_private(path, &signer.key_pem)?;
        Ok(signer)
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A signed token of `claims`.
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String> {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            claims,
            &self.encoding,
        )
        .map_err(|e| PkiError::Pem(e.to_string()))
    }

    /// The claims of `token` if this signer signed it, it is for one of
    /// `audiences`, from `issuer`, and not expired.
    pub fn verify(
        &self,
        token: &str,
        issuer: &str,
        audiences: &[&str],
    ) -> std::result::Result<serde_json::Value, TokenError> {
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.set_issuer(&[issuer]);
        validation.set_audience(audiences);
        validation.leeway = 0;
        jsonwebtoken::decode::<serde_json::Value>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|e| TokenError(e.to_string()))
    }
}

/// PBKDF2 rounds that turn a secret into a sealing key (OWASP's figure
/// for HMAC-SHA256 is 600,000; sealing happens once per server start).
const SEAL_ROUNDS: u32 = 600_000;

fn sealing_key(secret: &str, salt: &[u8]) -> aws_lc_rs::aead::LessSafeKey {
    let mut key = [0u8; 32];
    aws_lc_rs::pbkdf2::derive(
        aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(SEAL_ROUNDS).expect("non-zero"),
        salt,
        secret.as_bytes(),
        &mut key,
    );
    let unbound = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &key)
        .expect("a 256-bit key");
    aws_lc_rs::aead::LessSafeKey::new(unbound)
}

/// Encrypts `plaintext` with a key derived from `secret` (PBKDF2-HMAC-SHA256
/// with a random salt, then AES-256-GCM): JSON with the salt, nonce and
/// ciphertext, base64.
pub fn seal(secret: &str, plaintext: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; 12];
    aws_lc_rs::rand::fill(&mut salt).expect("random bytes");
    aws_lc_rs::rand::fill(&mut nonce).expect("random bytes");
    let mut data = plaintext.to_vec();
    sealing_key(secret, &salt)
        .seal_in_place_append_tag(
            aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
            aws_lc_rs::aead::Aad::empty(),
            &mut data,
        )
        .expect("AES-GCM seals any length");
    serde_json::to_vec(&serde_json::json!({
        "sealed": "pbkdf2-sha256-aes256gcm",
        "salt": b64.encode(salt),
        "nonce": b64.encode(nonce),
        "data": b64.encode(data),
    }))
    .expect("JSON")
}

/// Decrypts what [`seal`] made with the same `secret`.
pub fn unseal(secret: &str, sealed: &[u8]) -> Result<Vec<u8>> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let v: serde_json::Value = serde_json::from_slice(sealed).map_err(|_| PkiError::Unseal)?;
    let field = |k: &str| {
        v[k].as_str()
            .and_then(|s| b64.decode(s).ok())
            .ok_or(PkiError::Unseal)
    };
    let (salt, nonce, mut data) = (field("salt")?, field("nonce")?, field("data")?);
    let nonce: [u8; 12] = nonce.try_into().map_err(|_| PkiError::Unseal)?;
    let plain = sealing_key(secret, &salt)
        .open_in_place(
            aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
            aws_lc_rs::aead::Aad::empty(),
            &mut data,
        )
        .map_err(|_| PkiError::Unseal)?;
    Ok(plain.to_vec())
}

/// AES-GCM with a raw key of 16 or 32 bytes (Kubernetes' `aesgcm`
/// encryption provider): a random 12-byte nonce, then the ciphertext and
/// its tag.
pub fn aes_gcm_encrypt(key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let key = aes_gcm_key(key)?;
    let mut nonce = [0u8; 12];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| PkiError::Unseal)?;
    let mut data = plaintext.to_vec();
    key.seal_in_place_append_tag(
        aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
        aws_lc_rs::aead::Aad::empty(),
        &mut data,
    )
    .map_err(|_| PkiError::Unseal)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&data);
    Ok(out)
}

/// Opens what [`aes_gcm_encrypt`] made with the same key.
pub fn aes_gcm_decrypt(key: &[u8], data: &[u8]) -> Result<Vec<u8>> {
    if data.len() < 12 + 16 {
        return Err(PkiError::Unseal);
    }
    let key = aes_gcm_key(key)?;
    let nonce: [u8; 12] = data[..12].try_into().map_err(|_| PkiError::Unseal)?;
    let mut body = data[12..].to_vec();
    let plain = key
        .open_in_place(
            aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
            aws_lc_rs::aead::Aad::empty(),
            &mut body,
        )
        .map_err(|_| PkiError::Unseal)?;
    Ok(plain.to_vec())
}

/// NaCl's secretbox (XSalsa20-Poly1305) with a 32-byte key, laid out as
/// Kubernetes' `secretbox` encryption provider keeps values: a random
/// 24-byte nonce, then the Poly1305 tag, then the ciphertext (what Go's
/// `secretbox.Seal` appends).
pub fn secretbox_encrypt(key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let mut nonce = [0u8; 24];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| PkiError::Unseal)?;
    secretbox_seal(key, &nonce, plaintext)
}

fn secretbox_seal(key: &[u8], nonce: &[u8; 24], plaintext: &[u8]) -> Result<Vec<u8>> {
    use crypto_secretbox::aead::{AeadInPlace, KeyInit};
    let cipher = crypto_secretbox::XSalsa20Poly1305::new_from_slice(key)
        .map_err(|_| PkiError::KeyLength(key.len()))?;
    let mut body = plaintext.to_vec();
    let tag = cipher
        .encrypt_in_place_detached(nonce.into(), b"", &mut body)
        .map_err(|_| PkiError::Unseal)?;
    let mut out = Vec::with_capacity(24 + 16 + body.len());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&tag);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens what [`secretbox_encrypt`] (or Kubernetes' `secretbox`
/// provider) made with the same key.
pub fn secretbox_decrypt(key: &[u8], data: &[u8]) -> Result<Vec<u8>> {
    use crypto_secretbox::aead::{AeadInPlace, KeyInit};
    if data.len() < 24 + 16 {
        return Err(PkiError::Unseal);
    }
    let cipher = crypto_secretbox::XSalsa20Poly1305::new_from_slice(key)
        .map_err(|_| PkiError::KeyLength(key.len()))?;
    let (nonce, rest) = data.split_at(24);
    let (tag, body) = rest.split_at(16);
    let mut body = body.to_vec();
    cipher
        .decrypt_in_place_detached(nonce.into(), b"", &mut body, tag.into())
        .map_err(|_| PkiError::Unseal)?;
    Ok(body)
}

fn aes_gcm_key(key: &[u8]) -> Result<aws_lc_rs::aead::LessSafeKey> {
    let algorithm = match key.len() {
        16 => &aws_lc_rs::aead::AES_128_GCM,
        32 => &aws_lc_rs::aead::AES_256_GCM,
        n => return Err(PkiError::KeyLength(n)),
    };
    let unbound = aws_lc_rs::aead::UnboundKey::new(algorithm, key)
        .map_err(|_| PkiError::KeyLength(key.len()))?;
    Ok(aws_lc_rs::aead::LessSafeKey::new(unbound))
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut out).expect("random bytes");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS handshake in memory; the identity the server verified.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
        name: &str,
    ) -> std::result::Result<Option<Identity>, rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut c = rustls::ClientConnection::new(client, name)?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
        }
        Ok(s.peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| identity_of(leaf)))
    }

    #[test]
    fn agents_serve_the_api_server_over_mutual_tls_for_their_own_names() {
        let ca = Ca::create("test").unwrap();
        let node = Identity::new("system:node:n1", &["system:nodes"]);
        let names = ServingNames {
            dns: vec!["n1".into()],
            ips: vec!["10.0.0.7".parse().unwrap()],
        };
        let (csr, key_pem) = new_serving_csr(&node, &names).unwrap();
        let asked = csr_serving_names(&csr).unwrap();
        assert_eq!(
            (asked.dns, asked.ips),
            (names.dns.clone(), names.ips.clone())
        );
        let serving = Issued {
            cert_pem: ca
                .sign_serving_csr(&csr, Duration::from_secs(3600))
                .unwrap(),
            key_pem,
        };
        let server = agent_server_tls(ca.cert_pem(), &serving).unwrap();
        let api = ca
            .issue_client(&Identity::new(AGENT_CLIENT, &[]), Duration::from_secs(3600))
            .unwrap();
        let client = agent_client_tls(ca.cert_pem(), &api).unwrap();
        // The API server dials the node's address and knows who it reached;
        // the agent knows the API server.
        let who = handshake(client.clone(), server.clone(), "10.0.0.7").unwrap();
        assert_eq!(who.unwrap().user, AGENT_CLIENT);
        // Not for an address the certificate does not name.
        assert!(handshake(client, server.clone(), "10.0.0.8").is_err());
        // A client of another CA is refused by the agent; a server of
        // another CA by the API server.
        let other = Ca::create("other").unwrap();
        let stranger = other
            .issue_client(&Identity::new(AGENT_CLIENT, &[]), Duration::from_secs(3600))
            .unwrap();
        let foreign = agent_client_tls(ca.cert_pem(), &stranger).unwrap();
        assert!(handshake(foreign, server, "10.0.0.7").is_err());
        let impostor = other.issue_serving("n1", &names).unwrap();
        let fake = agent_server_tls(ca.cert_pem(), &impostor).unwrap();
        let client = agent_client_tls(ca.cert_pem(), &api).unwrap();
        assert!(handshake(client, fake, "10.0.0.7").is_err());
    }

    #[test]
    fn tokens_verify_only_as_signed() {
        let signer = TokenSigner::generate().unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims =
            serde_json::json!({"iss": "i", "aud": ["a"], "sub": "s", "exp": now + 60, "iat": now});
        let token = signer.sign(&claims).unwrap();
        assert_eq!(signer.verify(&token, "i", &["a"]).unwrap()["sub"], "s");
        assert!(signer.verify(&token, "i", &["other"]).is_err());
        assert!(signer.verify(&token, "other", &["a"]).is_err());
        let again = TokenSigner::from_pem(signer.key_pem()).unwrap();
        assert!(again.verify(&token, "i", &["a"]).is_ok());
        assert!(
            TokenSigner::generate()
                .unwrap()
                .verify(&token, "i", &["a"])
                .is_err()
        );
        let expired = signer
            .sign(&serde_json::json!({"iss": "i", "aud": ["a"], "exp": now - 10}))
            .unwrap();
        assert!(signer.verify(&expired, "i", &["a"]).is_err());
    }

    #[test]
    fn aes_gcm_round_trips_and_refuses_another_key() {
        let (k1, k2) = (random_bytes(32), random_bytes(16));
        let sealed = aes_gcm_encrypt(&k1, b"password").unwrap();
        assert_eq!(aes_gcm_decrypt(&k1, &sealed).unwrap(), b"password");
        assert!(aes_gcm_decrypt(&k2, &sealed).is_err());
        assert!(aes_gcm_encrypt(&random_bytes(24), b"x").is_err());
    }

    #[test]
    fn secretbox_is_nacl_s_and_refuses_another_key() {
        // NaCl's layout, checked against PyNaCl's SecretBox with the same
        // key, nonce and message: nonce, tag, ciphertext.
        let key: Vec<u8> = (0..32).collect();
        let nonce: [u8; 24] = std::array::from_fn(|i| 100 + i as u8);
        let sealed = secretbox_seal(&key, &nonce, b"wasmkube secret").unwrap();
        let hex: String = sealed.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "6465666768696a6b6c6d6e6f707172737475767778797a7b2e87033505ca2e9058193d80c3cdd91475d8eaa451c3ac8c908e46f745e1d7"
        );
        assert_eq!(
            secretbox_decrypt(&key, &sealed).unwrap(),
            b"wasmkube secret"
        );
        let fresh = secretbox_encrypt(&key, b"password").unwrap();
        assert_eq!(secretbox_decrypt(&key, &fresh).unwrap(), b"password");
        assert!(secretbox_decrypt(&random_bytes(32), &fresh).is_err());
        assert!(secretbox_encrypt(&random_bytes(16), b"x").is_err());
    }

    #[test]
    fn sealed_data_opens_with_its_secret_only() {
        let sealed = seal("s3cret", b"the CA key");
        assert!(!String::from_utf8_lossy(&sealed).contains("the CA key"));
        assert_eq!(unseal("s3cret", &sealed).unwrap(), b"the CA key");
        assert!(unseal("guess", &sealed).is_err());
        assert!(unseal("s3cret", b"{}").is_err());
    }

    #[test]
    fn a_client_certificate_names_its_user_and_groups() {
        let ca = Ca::create("test-ca").unwrap();
        let who = Identity::new("alice", &["dev", "system:authenticated"]);
        let issued = ca.issue_client(&who, Duration::from_secs(3600)).unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(identity_of(&der), Some(who));
    }

    #[test]
    fn a_signed_request_keeps_the_requested_identity_and_key() {
        let ca = Ca::create("test-ca").unwrap();
        let who = Identity::new("system:node:n1", &["system:nodes"]);
        let (csr, key) = new_csr(&who).unwrap();
        assert_eq!(csr_identity(&csr).unwrap(), who);
        let cert = ca.sign_client_csr(&csr, Duration::from_secs(60)).unwrap();
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert_eq!(identity_of(&der), Some(who));
        // The certificate carries the request's key.
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let key = KeyPair::from_pem(&key).unwrap();
        assert_eq!(
            parsed.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key)
        );
        let expires = not_after(&cert).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!((now..now + 120).contains(&expires), "{expires} vs {now}");
    }

    #[test]
    fn a_tampered_request_is_refused() {
        let (csr, _) = new_csr(&Identity::new("bob", &[])).unwrap();
        // Change one character of the signature (the last line of data).
        let mut lines: Vec<String> = csr.lines().map(str::to_owned).collect();
        let last = lines.len() - 2;
        let flipped: String = lines[last]
            .chars()
            .enumerate()
            .map(|(i, c)| match (i, c) {
                (2, 'A') => 'B',
                (2, _) => 'A',
                _ => c,
            })
            .collect();
        lines[last] = flipped;
        assert!(csr_identity(&lines.join("\n")).is_err());
    }

    #[test]
    fn the_ca_is_kept_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = Ca::load_or_create(dir.path(), "c").unwrap();
        let again = Ca::load_or_create(dir.path(), "c").unwrap();
        assert_eq!(first.hash(), again.hash());
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
