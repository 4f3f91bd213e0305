//! The node's WireGuard key: generated once, kept in the state directory (mode 0600), never
//! logged, never sent anywhere. Only its public half is published.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context};

use isthmus_wg::key::Key;

const KEY_FILE: &str = "private.key";

/// Loads the key, or creates it on first start. A key file readable by others is refused
/// rather than used.
pub fn load_or_create(state_dir: &Path) -> anyhow::Result<Key> {
    fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", state_dir.display()))?;
    let path = state_dir.join(KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                bail!("{} has mode {mode:o}; it must be 0600", path.display());
            }
            Key::from_base64(&text).with_context(|| format!("{} is not a key", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Key::generate_private();
            let tmp = state_dir.join(format!("{KEY_FILE}.tmp"));
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            file.write_all(key.to_base64().as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(path = %path.display(), public_key = %key.public_from_private().to_base64(), "generated node key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The node's public key, if the agent created one; reads only, never creates.
pub fn public_key(state_dir: &Path) -> anyhow::Result<Option<Key>> {
    let path = state_dir.join(KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => Key::from_base64(&text)
            .map(|k| Some(k.public_from_private()))
            .with_context(|| format!("{} is not a key", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_mode_0600_and_reused() {
        let dir = std::env::temp_dir().join(format!("isthmus-keys-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let first = load_or_create(&dir).unwrap();
        let mode = fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(&dir).unwrap(), first);
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            load_or_create(&dir).is_err(),
            "a world-readable key must be refused"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
