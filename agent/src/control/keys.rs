//! The node's WireGuard key: generated once, kept in the state directory (mode 0600), never
//! logged, never sent anywhere. Only its public half is published.
//!
//! A rotation ([`super::rotate`]) writes the next key to `private.key.next` before anything
//! else learns of it, and makes it `private.key` when the old one is retired: the next file
//! is both the request (`isthmus-agent rotate-key` writes it) and the journal a restarted
//! agent resumes from.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context};

use isthmus_wg::key::Key;

const KEY_FILE: &str = "private.key";
/// The key a rotation moves to, until it is retired into [`KEY_FILE`].
pub const NEXT_FILE: &str = "private.key.next";

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
            write_tmp(state_dir, KEY_FILE, &key)?;
            fs::rename(state_dir.join(format!("{KEY_FILE}.tmp")), &path)
                .with_context(|| format!("writing {}", path.display()))?;
            sync_dir(state_dir)?;
            tracing::info!(path = %path.display(), public_key = %key.public_from_private().to_base64(), "generated node key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `key` to `<name>.tmp` (mode 0600) and flushes it to disk.
fn write_tmp(state_dir: &Path, name: &str, key: &Key) -> anyhow::Result<()> {
    let tmp = state_dir.join(format!("{name}.tmp"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(key.to_base64().as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// The private key in `path`, if the file is there (mode checked as for the node key).
fn read_key(path: &Path) -> anyhow::Result<Option<Key>> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let mode = fs::metadata(path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                bail!("{} has mode {mode:o}; it must be 0600", path.display());
            }
            Key::from_base64(&text)
                .map(Some)
                .with_context(|| format!("{} is not a key", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// What the state directory holds: the node key and the key a rotation moves to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyFiles {
    pub current: Option<Key>,
    pub next: Option<Key>,
}

pub fn read_files(state_dir: &Path) -> anyhow::Result<KeyFiles> {
    Ok(KeyFiles {
        current: read_key(&state_dir.join(KEY_FILE))?,
        next: read_key(&state_dir.join(NEXT_FILE))?,
    })
}

/// Asks for a rotation to `key`: writes it to [`NEXT_FILE`], durably, unless a rotation is
/// already under way (the file exists: `Ok(false)`). Never replaces a next key, which may
/// already be published.
pub fn request_rotation(state_dir: &Path, key: &Key) -> anyhow::Result<bool> {
    write_tmp(state_dir, NEXT_FILE, key)?;
    let tmp = state_dir.join(format!("{NEXT_FILE}.tmp"));
    // link(2) fails on an existing target: an atomic "create unless there".
    let linked = fs::hard_link(&tmp, state_dir.join(NEXT_FILE));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(state_dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => {
            Err(e).with_context(|| format!("writing {}", state_dir.join(NEXT_FILE).display()))
        }
    }
}

/// Retires a rotation: `key` becomes the node key (replacing the file whole) and the next
/// file goes. A crash between the two leaves both holding `key`, which the next start
/// finishes the same way.
pub fn promote(state_dir: &Path, key: &Key) -> anyhow::Result<()> {
    let path = state_dir.join(KEY_FILE);
    write_tmp(state_dir, KEY_FILE, key)?;
    fs::rename(state_dir.join(format!("{KEY_FILE}.tmp")), &path)
        .with_context(|| format!("writing {}", path.display()))?;
    sync_dir(state_dir)?;
    match fs::remove_file(state_dir.join(NEXT_FILE)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("removing the retired rotation's next key"),
    }
    sync_dir(state_dir)
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

    #[test]
    fn a_rotation_request_is_written_once_and_promoted() {
        let dir = std::env::temp_dir().join(format!("isthmus-keys-next-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let first = load_or_create(&dir).unwrap();
        let next = Key::generate_private();
        assert!(request_rotation(&dir, &next).unwrap());
        assert!(
            !request_rotation(&dir, &Key::generate_private()).unwrap(),
            "a second request does not replace the first"
        );
        let files = read_files(&dir).unwrap();
        assert_eq!((files.current, files.next), (Some(first), Some(next)));
        let mode = fs::metadata(dir.join(NEXT_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        promote(&dir, &next).unwrap();
        assert_eq!(
            read_files(&dir).unwrap(),
            KeyFiles {
                current: Some(next),
                next: None
            }
        );
        assert_eq!(load_or_create(&dir).unwrap(), next);
        fs::remove_dir_all(&dir).unwrap();
    }
}
