//! Secrets at rest, by envelope encryption.
//!
//! A secret the suite must read back (a webhook signing secret, the unsubscribe-link key) is
//! stored *sealed*: encrypted with a data key of its own (XChaCha20-Poly1305, random
//! 192-bit nonce), and that data key encrypted ("wrapped") with a master key from
//! configuration. The stored text names the master key by id:
//!
//! ```text
//! sealed:v1:<key id>:<base64url(nonce ‖ wrapped data key)>:<base64url(nonce ‖ ciphertext)>
//! ```
//!
//! Both encryptions are bound to a *context* (what the secret belongs to: tenant, row), so a
//! sealed value copied into another row does not open there.
//!
//! **Rotation without downtime**: a [`Keyring`] holds the current master key (seals) and
//! retired ones (open only). Rolling out a new key takes two deployments: first add it as a
//! retired key everywhere (every replica can then open what it will seal), then make it the
//! current key with the old one retired. Each service re-wraps what it finds under a
//! retired key ([`Keyring::rewrap`]: only the data key is re-encrypted; the secret's own
//! ciphertext stays), so once `tessera_sealed_secrets{state="retired"}` is 0 the old key can
//! go.
//!
//! A value without the `sealed:` prefix was written before secrets were sealed: it opens as
//! it is, and the re-wrap seals it.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::Rng;

use crate::Error;

const PREFIX: &str = "sealed:v1:";
const NONCE: usize = 24;
const KEY: usize = 32;

/// The master keys: the current one seals, every one opens.
#[derive(Clone)]
pub struct Keyring {
    current: String,
    keys: HashMap<String, [u8; KEY]>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// How a stored value stands against the keyring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Sealed under the current master key.
    Current,
    /// Sealed under a retired master key (to re-wrap).
    Retired,
    /// Written before sealing (to seal).
    Plain,
}

/// Parses one master key: `<id>:<base64 of 32 bytes>` (standard or URL-safe alphabet).
pub fn parse_key(text: &str) -> Result<(String, [u8; KEY]), String> {
    let (id, b64) = text
        .trim()
        .split_once(':')
        .ok_or("must be `<id>:<base64 of 32 bytes>`")?;
    if id.is_empty()
        || id.len() > 32
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err("the key id must be 1 to 32 letters, digits, `-` or `_`".into());
    }
    let b64 = b64.trim_end_matches('=');
    let bytes = URL_SAFE_NO_PAD
        .decode(b64.replace('+', "-").replace('/', "_"))
        .map_err(|e| format!("the key is not base64: {e}"))?;
    let key: [u8; KEY] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("the key must be 32 bytes, not {}", b.len()))?;
    Ok((id.to_string(), key))
}

/// A new master key in the form [`parse_key`] reads.
pub fn new_key_text(id: &str) -> String {
    let mut key = [0u8; KEY];
    rand::rng().fill(&mut key);
    format!("{id}:{}", URL_SAFE_NO_PAD.encode(key))
}

fn cipher(key: &[u8; KEY]) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(key.into())
}

fn seal_with(key: &[u8; KEY], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE];
    rand::rng().fill(&mut nonce);
    let sealed = cipher(key)
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("XChaCha20-Poly1305 encrypts any length this suite stores");
    [nonce.as_slice(), &sealed].concat()
}

fn open_with(key: &[u8; KEY], sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE);
    let nonce: [u8; NONCE] = nonce.try_into().ok()?;
    cipher(key)
        .decrypt(&XNonce::from(nonce), Payload { msg: body, aad })
        .ok()
}

/// The parts of a sealed value.
struct Sealed<'a> {
    key_id: &'a str,
    wrapped: Vec<u8>,
    body: Vec<u8>,
}

fn parse(stored: &str) -> Option<Result<Sealed<'_>, Error>> {
    let rest = stored.strip_prefix(PREFIX)?;
    let bad = || Error::internal("a sealed secret is malformed");
    let mut parts = rest.splitn(3, ':');
    let (Some(key_id), Some(wrapped), Some(body)) = (parts.next(), parts.next(), parts.next())
    else {
        return Some(Err(bad()));
    };
    let (Ok(wrapped), Ok(body)) = (
        URL_SAFE_NO_PAD.decode(wrapped),
        URL_SAFE_NO_PAD.decode(body),
    ) else {
        return Some(Err(bad()));
    };
    Some(Ok(Sealed {
        key_id,
        wrapped,
        body,
    }))
}

impl Keyring {
    /// A keyring from the current master key and retired ones (each `<id>:<base64>`).
    pub fn new(current: &str, retired: &[String]) -> Result<Self, String> {
        let (id, key) = parse_key(current)?;
        let mut keys = HashMap::from([(id.clone(), key)]);
        for text in retired.iter().filter(|t| !t.trim().is_empty()) {
            let (rid, rkey) = parse_key(text)?;
            if keys.get(&rid).is_some_and(|k| *k != rkey) {
                return Err(format!("two different keys have the id `{rid}`"));
            }
            keys.insert(rid, rkey);
        }
        Ok(Self { current: id, keys })
    }

    /// The keyring of `config`. Without a configured master key, an embedded installation
    /// (SQLite under `data_dir`) keeps one in `data_dir/master.key`, made on first use; with
    /// a shared database every replica derives the same one from the suite's
    /// `internal_secret` (a separate `master_key` is better: rotating the internal secret
    /// then leaves sealed secrets alone), and a single process without one (`tessera up` on
    /// PostgreSQL) keeps a key file like the embedded installation.
    pub fn from_config(config: &crate::Config) -> anyhow::Result<Self> {
        let retired: Vec<String> = config
            .secrets
            .retired_master_keys
            .split(',')
            .map(str::to_string)
            .collect();
        let current = match &config.secrets.master_key {
            Some(key) => key.clone(),
            None if config.database.url.is_none() => key_file(&config.data_dir)?,
            None => match config.internal_secret.as_deref() {
                Some(secret) => derived_key(secret),
                // One process on a shared database (`tessera up` on PostgreSQL): its own
                // key file. Replicas (`tessera serve`) always have the internal secret.
                None => key_file(&config.data_dir)?,
            },
        };
        Self::new(&current, &retired).map_err(|e| anyhow::anyhow!("secrets.master_key: {e}"))
    }

    /// The id of the key that seals.
    pub fn current_id(&self) -> &str {
        &self.current
    }

    /// Seals `plaintext` for `context`.
    pub fn seal(&self, plaintext: &[u8], context: &str) -> String {
        let mut data_key = [0u8; KEY];
        rand::rng().fill(&mut data_key);
        let master = &self.keys[&self.current];
        let wrapped = seal_with(
            master,
            &data_key,
            wrap_aad(&self.current, context).as_bytes(),
        );
        let body = seal_with(&data_key, plaintext, context.as_bytes());
        format!(
            "{PREFIX}{}:{}:{}",
            self.current,
            URL_SAFE_NO_PAD.encode(wrapped),
            URL_SAFE_NO_PAD.encode(body)
        )
    }

    /// Opens a stored value of `context` (a value written before sealing opens as it is).
    pub fn open(&self, stored: &str, context: &str) -> Result<Vec<u8>, Error> {
        let Some(sealed) = parse(stored) else {
            return Ok(stored.as_bytes().to_vec());
        };
        let sealed = sealed?;
        let data_key = self.data_key(&sealed, context)?;
        open_with(&data_key, &sealed.body, context.as_bytes())
            .ok_or_else(|| Error::internal("a sealed secret does not open for its context"))
    }

    /// Opens a stored text secret.
    pub fn open_text(&self, stored: &str, context: &str) -> Result<String, Error> {
        String::from_utf8(self.open(stored, context)?)
            .map_err(|_| Error::internal("a sealed text secret is not UTF-8"))
    }

    fn data_key(&self, sealed: &Sealed<'_>, context: &str) -> Result<[u8; KEY], Error> {
        let master = self.keys.get(sealed.key_id).ok_or_else(|| {
            Error::internal(format!(
                "a secret is sealed under master key `{}`, which this keyring lacks",
                sealed.key_id
            ))
        })?;
        open_with(
            master,
            &sealed.wrapped,
            wrap_aad(sealed.key_id, context).as_bytes(),
        )
        .and_then(|k| <[u8; KEY]>::try_from(k).ok())
        .ok_or_else(|| Error::internal("a sealed secret's data key does not open"))
    }

    /// How `stored` stands against this keyring.
    pub fn state(&self, stored: &str) -> State {
        match parse(stored) {
            None => State::Plain,
            Some(Ok(s)) if s.key_id == self.current => State::Current,
            Some(_) => State::Retired,
        }
    }

    /// `stored` under the current master key, or `None` when it is already. A sealed value
    /// keeps its ciphertext: only its data key is wrapped again. A plain one is sealed.
    pub fn rewrap(&self, stored: &str, context: &str) -> Result<Option<String>, Error> {
        match self.state(stored) {
            State::Current => Ok(None),
            State::Plain => Ok(Some(self.seal(stored.as_bytes(), context))),
            State::Retired => {
                let sealed = parse(stored).expect("a retired value is sealed")?;
                let data_key = self.data_key(&sealed, context)?;
                let master = &self.keys[&self.current];
                let wrapped = seal_with(
                    master,
                    &data_key,
                    wrap_aad(&self.current, context).as_bytes(),
                );
                Ok(Some(format!(
                    "{PREFIX}{}:{}:{}",
                    self.current,
                    URL_SAFE_NO_PAD.encode(wrapped),
                    URL_SAFE_NO_PAD.encode(&sealed.body)
                )))
            }
        }
    }
}

/// What the wrapped data key is bound to: its master key and the secret's context.
fn wrap_aad(key_id: &str, context: &str) -> String {
    format!("tessera-data-key\n{key_id}\n{context}")
}

/// A master key derived from the suite's shared secret (HMAC-SHA256 with a fixed label); its
/// id names the derivation and a fingerprint of the key, so a changed secret is told apart.
fn derived_key(internal_secret: &str) -> String {
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(internal_secret.as_bytes())
        .expect("HMAC takes any key");
    mac.update(b"tessera sealing master key v1");
    let key = mac.finalize().into_bytes();
    let fingerprint = Sha256::digest(key);
    let id: String = fingerprint
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("internal-{id}:{}", URL_SAFE_NO_PAD.encode(key))
}

/// The embedded installation's master key, made on first use (owner-only file).
fn key_file(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("master.key");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(text.trim().to_string());
    }
    std::fs::create_dir_all(data_dir)?;
    let text = new_key_text("local");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(&path) {
        Ok(mut file) => {
            std::io::Write::write_all(&mut file, text.as_bytes())?;
            Ok(text)
        }
        // Another service of this process made it first.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(&path)?.trim().to_string())
        }
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(current: &str, retired: &[&str]) -> Keyring {
        Keyring::new(
            current,
            &retired.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn a_sealed_secret_opens_only_for_its_context() {
        let k = ring(&new_key_text("a"), &[]);
        let sealed = k.seal(b"whsec_abc", "acme/ep_1");
        assert!(sealed.starts_with("sealed:v1:a:"));
        assert!(!sealed.contains("whsec_abc"));
        assert_eq!(k.open(&sealed, "acme/ep_1").unwrap(), b"whsec_abc");
        assert!(k.open(&sealed, "acme/ep_2").is_err());
        assert!(k.open(&sealed, "other/ep_1").is_err());
        // Two seals of one secret differ (fresh data key and nonces).
        assert_ne!(sealed, k.seal(b"whsec_abc", "acme/ep_1"));
    }

    #[test]
    fn another_master_key_cannot_open_it() {
        let sealed = ring(&new_key_text("a"), &[]).seal(b"s", "c");
        let stranger = ring(&new_key_text("a"), &[]);
        assert!(stranger.open(&sealed, "c").is_err());
        let tampered = sealed.replacen("sealed:v1:a:", "sealed:v1:a:A", 1);
        assert!(ring(&new_key_text("a"), &[]).open(&tampered, "c").is_err());
    }

    #[test]
    fn rotation_rewraps_under_the_new_key_and_keeps_the_ciphertext() {
        let old = new_key_text("k1");
        let new = new_key_text("k2");
        let before = ring(&old, &[]);
        let sealed = before.seal(b"whsec_rotate", "t/e");
        // Step 1: the new key is known everywhere but does not seal yet.
        let step1 = ring(&old, &[&new]);
        assert_eq!(step1.state(&sealed), State::Current);
        // Step 2: the new key seals; the old one only opens.
        let step2 = ring(&new, &[&old]);
        assert_eq!(step2.state(&sealed), State::Retired);
        assert_eq!(step2.open(&sealed, "t/e").unwrap(), b"whsec_rotate");
        let rewrapped = step2.rewrap(&sealed, "t/e").unwrap().unwrap();
        assert_eq!(step2.state(&rewrapped), State::Current);
        assert_eq!(
            sealed.rsplit(':').next(),
            rewrapped.rsplit(':').next(),
            "only the data key is wrapped again"
        );
        assert_eq!(step2.rewrap(&rewrapped, "t/e").unwrap(), None);
        // Step 1's replicas, still running during the roll, open what step 2 wrote.
        assert_eq!(step1.open(&rewrapped, "t/e").unwrap(), b"whsec_rotate");
        // Step 3: the old key gone, everything still opens.
        let after = ring(&new, &[]);
        assert_eq!(after.open(&rewrapped, "t/e").unwrap(), b"whsec_rotate");
        assert!(
            after.open(&sealed, "t/e").is_err(),
            "not re-wrapped: needs k1"
        );
    }

    #[test]
    fn values_from_before_sealing_open_as_they_are_and_get_sealed() {
        let k = ring(&new_key_text("a"), &[]);
        assert_eq!(k.state("whsec_plain"), State::Plain);
        assert_eq!(k.open_text("whsec_plain", "c").unwrap(), "whsec_plain");
        let sealed = k.rewrap("whsec_plain", "c").unwrap().unwrap();
        assert_eq!(k.open_text(&sealed, "c").unwrap(), "whsec_plain");
    }

    #[test]
    fn a_derived_key_is_the_same_for_the_same_secret_only() {
        let a = derived_key("shared-secret-of-at-least-32-characters");
        assert_eq!(a, derived_key("shared-secret-of-at-least-32-characters"));
        assert_ne!(a, derived_key("another-secret-of-at-least-32-chars"));
        assert!(ring(&a, &[]).current_id().starts_with("internal-"));
    }

    #[test]
    fn keys_are_checked() {
        assert!(parse_key("nokey").is_err());
        assert!(parse_key("a:c2hvcnQ").is_err(), "too short");
        assert!(parse_key("bad id:AAAA").is_err());
        let text = new_key_text("prod-2026");
        let (id, _) = parse_key(&text).unwrap();
        assert_eq!(id, "prod-2026");
        // Standard base64 with padding is read too.
        let std = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(parse_key(&format!("s:{std}")).unwrap().1, [7u8; 32]);
        let a = new_key_text("x");
        let b = new_key_text("x");
        assert!(Keyring::new(&a, &[b]).is_err(), "one id, two keys");
    }
}
