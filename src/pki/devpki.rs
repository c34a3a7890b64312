//! The development PKI: a root and one issuing CA per key type, written to `keys-dev/`.
//! Every certificate carries the organisation [`DEV_PKI_ORGANIZATION`], which is how the engine
//! recognises (and, outside `mode = "dev"`, refuses) them.

use std::path::Path;

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::symm::Cipher;
use openssl::x509::extension::{AuthorityKeyIdentifier, BasicConstraints, KeyUsage, SubjectKeyIdentifier};
use openssl::x509::{X509Builder, X509NameBuilder, X509};

use super::ca::DEV_PKI_ORGANIZATION;
use super::vocabulary::KeyType;

/// The passphrase of every dev key. It is in the repository on purpose: these keys protect
/// nothing, and the engine refuses them outside dev mode.
pub const DEV_KEY_PASSPHRASE: &str = "castellum-dev-only";

/// The issuing CAs of the dev PKI: (id, key type).
pub const DEV_ISSUERS: &[(&str, KeyType)] = &[
    ("ica-p256", KeyType::EcdsaP256),
    ("ica-p384", KeyType::EcdsaP384),
    ("ica-rsa3072", KeyType::Rsa),
    ("ica-ed25519", KeyType::Ed25519),
];

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub fn generate_key(kind: KeyType) -> Result<PKey<Private>> {
    let ec = |curve: Nid| -> Result<PKey<Private>> {
        let group = EcGroup::from_curve_name(curve)?;
        Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
    };
    match kind {
        KeyType::EcdsaP256 => ec(Nid::X9_62_PRIME256V1),
        KeyType::EcdsaP384 => ec(Nid::SECP384R1),
        KeyType::EcdsaP521 => ec(Nid::SECP521R1),
        KeyType::Rsa => Ok(PKey::from_rsa(Rsa::generate(3072)?)?),
        KeyType::Ed25519 => Ok(PKey::generate_ed25519()?),
    }
}

fn digest_for(key: &PKey<Private>) -> MessageDigest {
    match key.id() {
        openssl::pkey::Id::ED25519 => MessageDigest::null(),
        openssl::pkey::Id::EC if key.bits() > 256 => MessageDigest::sha384(),
        _ => MessageDigest::sha256(),
    }
}

fn ca_certificate(
    common_name: &str,
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    days: u32,
    path_len: Option<u32>,
) -> Result<X509> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COUNTRYNAME, "XX")?;
    name.append_entry_by_nid(Nid::ORGANIZATIONNAME, DEV_PKI_ORGANIZATION)?;
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    let name = name.build();

    let mut b = X509Builder::new()?;
    b.set_version(2)?;
    let mut serial = [0u8; 16];
    openssl::rand::rand_bytes(&mut serial)?;
    serial[0] &= 0x7f;
    let serial = BigNum::from_slice(&serial)?;
    let serial = Asn1Integer::from_bn(&serial)?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(issuer.map(|(c, _)| c.subject_name()).unwrap_or(&name))?;
    b.set_pubkey(key)?;
    let not_before = Asn1Time::days_from_now(0)?;
    let not_after = Asn1Time::days_from_now(days)?;
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;
    let mut bc = BasicConstraints::new();
    bc.critical().ca();
    if let Some(n) = path_len {
        bc.pathlen(n);
    }
    b.append_extension(bc.build()?)?;
    b.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().digital_signature().build()?)?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(issuer.map(|(c, _)| c.as_ref()), None))?;
    b.append_extension(ski)?;
    if issuer.is_some() {
        let aki = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&b.x509v3_context(issuer.map(|(c, _)| c.as_ref()), None))?;
        b.append_extension(aki)?;
    }
    let signing_key = issuer.map(|(_, k)| k).unwrap_or(key);
    b.sign(signing_key, digest_for(signing_key))?;
    Ok(b.build())
}

fn write(path: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(path, data).map_err(|e| format!("{}: {e}", path.display()).into())
}

fn write_key(path: &Path, key: &PKey<Private>) -> Result<()> {
    let pem = key.private_key_to_pem_pkcs8_passphrase(Cipher::aes_256_cbc(), DEV_KEY_PASSPHRASE.as_bytes())?;
    write(path, &pem)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Write a fresh dev PKI into `dir`: `root.crt`, `root.key`, for each issuing CA `<id>.crt`,
/// `<id>.key` and `<id>.chain.pem` (its certificate then the root), and the development
/// identity key-encryption key `identity-kek.hex`.
pub fn generate(dir: &Path, mut progress: impl FnMut(&str)) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    progress("identity key-encryption key (the public dev KEK)");
    let kek = format!(
        "# castellum DEVELOPMENT identity key-encryption key: public on purpose, refused unless mode = \"dev\".\n{}\n",
        hex::encode(super::kek::dev_kek())
    );
    write(&dir.join("identity-kek.hex"), kek.as_bytes())?;
    progress("root CA (ECDSA P-384)");
    let root_key = generate_key(KeyType::EcdsaP384)?;
    let root = ca_certificate("castellum DEV Root CA", &root_key, None, 20 * 365, None)?;
    write(&dir.join("root.crt"), &root.to_pem()?)?;
    write_key(&dir.join("root.key"), &root_key)?;
    for (id, kind) in DEV_ISSUERS {
        progress(&format!("issuing CA {id} ({kind:?})"));
        let key = generate_key(*kind)?;
        let cert = ca_certificate(
            &format!("castellum DEV Issuing CA {id}"),
            &key,
            Some((&root, &root_key)),
            10 * 365,
            Some(0),
        )?;
        write(&dir.join(format!("{id}.crt")), &cert.to_pem()?)?;
        write_key(&dir.join(format!("{id}.key")), &key)?;
        let mut chain = cert.to_pem()?;
        chain.extend(root.to_pem()?);
        write(&dir.join(format!("{id}.chain.pem")), &chain)?;
    }
    Ok(())
}
