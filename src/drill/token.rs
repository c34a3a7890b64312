//! CA keys on SoftHSM tokens for the incident-003 drill (`--keys-on-token`, issue 17): the
//! healthy CAs sign through the dev token, the CAs the drill fails through a token of their own,
//! and the fault is that token's storage going away (its key objects moved out of SoftHSM's
//! token directory), which every engine sharing the token sees at once, as with a network HSM.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::DrillError;

/// Where Debian's softhsm2 package puts the module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The token holding every dev CA key (the healthy CAs sign through it).
pub const DEV_TOKEN: &str = "castellum-dev";

/// The drill's tokens, in a SoftHSM configuration of their own.
pub struct DrillTokens {
    /// The SoftHSM configuration engines are started with (`SOFTHSM2_CONF`).
    pub conf: PathBuf,
    /// The label of the token the failing CAs sign through.
    pub failing_label: String,
    failing_cas: Vec<String>,
    /// The directory SoftHSM keeps the failing token in.
    failing_store: PathBuf,
    /// Where the fault puts that token's key objects.
    away: PathBuf,
}

impl DrillTokens {
    /// Make the dev token and a token `failing_label` holding `failing_cas`' keys, in `dir`,
    /// with `keys_dev/pkcs11-dev-token` (the documented command).
    pub fn create(keys_dev: &Path, dir: &Path, failing_label: &str, failing_cas: &[&str]) -> Result<Self, DrillError> {
        let conf = dev_token(keys_dev, dir)?;
        let mut args = vec![failing_label];
        args.extend_from_slice(failing_cas);
        let failing_store = PathBuf::from(dev_token_script(keys_dev, dir, &args)?);
        Ok(DrillTokens {
            conf,
            failing_label: failing_label.to_string(),
            failing_cas: failing_cas.iter().map(|c| c.to_string()).collect(),
            failing_store,
            away: dir.join("objects-away"),
        })
    }

    /// Point every CA of `config` at its key on a token (the failing CAs at the failing token).
    pub fn configure(&self, config: &mut toml::Table) {
        keys_on_tokens(
            config,
            |id| if self.failing_cas.iter().any(|c| c == id) { &self.failing_label } else { DEV_TOKEN },
        );
    }

    /// The fault: the failing token's key objects leave its storage (the token's own object
    /// stays: SoftHSM only knows tokens present when the module starts). Returns how many files
    /// were moved; a second call moves none.
    pub fn take_keys_away(&self) -> Result<usize, DrillError> {
        std::fs::create_dir_all(&self.away)?;
        let mut moved = 0;
        for entry in std::fs::read_dir(&self.failing_store)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let key_object = (name.ends_with(".object") || name.ends_with(".lock"))
                && !matches!(name, "token.object" | "token.lock");
            if key_object {
                std::fs::rename(&path, self.away.join(name))?;
                moved += 1;
            }
        }
        Ok(moved)
    }
}

/// The dev token (every dev CA key, labelled by CA id) in a SoftHSM configuration of its own in
/// `dir`; the configuration's path, for `SOFTHSM2_CONF`.
pub fn dev_token(keys_dev: &Path, dir: &Path) -> Result<PathBuf, DrillError> {
    if !Path::new(SOFTHSM_MODULE).exists() {
        return Err(DrillError::Setup(format!(
            "CA keys on a token need SoftHSM2 ({SOFTHSM_MODULE}): apt-get install softhsm2, or run .ci/prepare"
        )));
    }
    dev_token_script(keys_dev, dir, &[])?;
    Ok(dir.join("softhsm2.conf"))
}

/// `keys_dev/pkcs11-dev-token dir args…`; the last line it printed (the new token's directory).
fn dev_token_script(keys_dev: &Path, dir: &Path, args: &[&str]) -> Result<String, DrillError> {
    let script = keys_dev.join("pkcs11-dev-token");
    let out = Command::new(&script)
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| DrillError::Setup(format!("{}: {e}", script.display())))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        return Err(DrillError::Setup(format!("{}: {}", script.display(), said.trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string())
}

/// Every CA of `config` signing through its key on the token `token_for(id)` (key labelled by CA
/// id, as `pkcs11-dev-token` makes them), with the dev PIN file beside the configuration.
pub fn keys_on_tokens<'a>(config: &mut toml::Table, token_for: impl Fn(&str) -> &'a str) {
    let Some(cas) = config.get_mut("cas").and_then(toml::Value::as_array_mut) else { return };
    for ca in cas.iter_mut().filter_map(toml::Value::as_table_mut) {
        let Some(id) = ca.get("id").and_then(toml::Value::as_str).map(str::to_string) else { continue };
        ca.remove("key_file");
        ca.remove("key_passphrase");
        let mut pkcs11 = toml::Table::new();
        pkcs11.insert("module".into(), SOFTHSM_MODULE.into());
        pkcs11.insert("token_label".into(), token_for(&id).into());
        pkcs11.insert("key_label".into(), id.into());
        pkcs11.insert("pin_file".into(), "pkcs11-dev-pin".into());
        let mut key = toml::Table::new();
        key.insert("pkcs11".into(), pkcs11.into());
        ca.insert("key".into(), key.into());
    }
}
