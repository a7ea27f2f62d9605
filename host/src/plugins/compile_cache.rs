//! Compiling components, through an on-disk cache keyed by the SHA-256 of the bytes compiled.
//!
//! A cached compilation is native code the host maps and runs, so an entry decides what runs as
//! surely as the component file does. The loader computes the digest of the bytes it read (and,
//! for a pinned plugin, has already refused any digest but the pinned one); an entry is used only
//! if its header names that same digest and its body still has the SHA-256 recorded when it was
//! written. Anything else (another digest, a truncated or altered body, a build of another
//! engine) is compiled afresh and the entry replaced. The directory is the server's own
//! (`data_dir/plugin-cache`, mode 0700, owned by the server's user; a directory or entry that
//! another user owns or can write is not used): writing the plugin directory does not reach it.
//! After a start, entries the start did not use (earlier versions' compilations, snapshots of
//! an `init` that drew other random numbers) are removed, so the directory does not grow.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// The first bytes of an entry: the format, then the digest of the source and of the body.
const MAGIC: &[u8; 8] = b"SYCWASM1";
const HEADER: usize = MAGIC.len() + 32 + 32;

/// Where compiled components are kept between runs.
#[derive(Debug)]
pub struct CompileCache {
    dir: PathBuf,
    /// Tells builds of different engines (wasmtime version, compiler settings) apart, so that
    /// two of them sharing a directory do not replace each other's entries at every start.
    engine_key: String,
    /// Entries read or written since the cache was opened: the ones [`CompileCache::prune`]
    /// keeps.
    used: Mutex<HashSet<PathBuf>>,
}

/// Whether `metadata` is this process's user's and no one else can write it.
fn ours(metadata: &std::fs::Metadata) -> bool {
    // SAFETY: geteuid reads the process's credentials and cannot fail.
    let uid = unsafe { libc::geteuid() };
    metadata.uid() == uid && metadata.mode() & 0o022 == 0
}

impl CompileCache {
    /// The cache in `dir`, created (mode 0700) if missing. Refused when `dir` is not a
    /// directory of this process's user (a symlink, another user's): its entries are code.
    pub fn open(dir: &Path, engine: &Engine) -> std::io::Result<CompileCache> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let metadata = std::fs::symlink_metadata(dir)?;
        // SAFETY: geteuid reads the process's credentials and cannot fail.
        if !metadata.is_dir() || metadata.uid() != unsafe { libc::geteuid() } {
            return Err(std::io::Error::other(format!(
                "{} is not a directory of this user",
                dir.display()
            )));
        }
        // An existing directory (made before by a laxer umask) is closed to others.
        if metadata.mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(CompileCache {
            dir: dir.to_path_buf(),
            engine_key: format!("{:016x}", hasher.finish()),
            used: Mutex::new(HashSet::new()),
        })
    }

    fn note_used(&self, entry: PathBuf) {
        self.used
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(entry);
    }

    /// Removes the entries (and unfinished writes) not used since the cache was opened.
    /// Returns how many it removed.
    pub fn prune(&self) -> usize {
        let used = self
            .used
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut removed = 0;
        for path in entries.filter_map(|entry| entry.ok().map(|entry| entry.path())) {
            let ours = path
                .extension()
                .is_some_and(|extension| extension == "cwasm" || extension == "new");
            if ours && !used.contains(&path) && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    fn entry(&self, digest: &[u8; 32]) -> PathBuf {
        self.dir
            .join(format!("{}-{}.cwasm", hex::encode(digest), self.engine_key))
    }

    /// The cached compilation of the bytes whose SHA-256 is `digest`, if there is a sound one.
    fn load(&self, engine: &Engine, digest: &[u8; 32]) -> Option<Component> {
        let path = self.entry(digest);
        let refuse = |why: &str| {
            tracing::warn!(entry = %path.display(), why, "compiled plugin cache entry ignored; compiling again");
            None
        };
        let metadata = std::fs::symlink_metadata(&path).ok()?;
        if !metadata.is_file() || !ours(&metadata) {
            return refuse("not a file of this user's that only it can write");
        }
        let entry = std::fs::read(&path).ok()?;
        if entry.len() < HEADER || &entry[..MAGIC.len()] != MAGIC {
            return refuse("not an entry of this format");
        }
        let (source, rest) = entry[MAGIC.len()..].split_at(32);
        let (recorded, body) = rest.split_at(32);
        if source != digest {
            return refuse("made from other bytes than the component being loaded");
        }
        if Sha256::digest(body).as_slice() != recorded {
            return refuse("its body changed since it was written");
        }
        // SAFETY: `deserialize` trusts its input to be a compilation by this engine's
        // configuration. The entry was written by `store` below, into a directory only the
        // server writes, and its body is checked against the digest recorded with it; wasmtime
        // itself checks the engine's version and settings in the artifact's header.
        match unsafe { Component::deserialize(engine, body) } {
            Ok(component) => {
                self.note_used(path);
                Some(component)
            }
            Err(error) => refuse(&format!("{error:#}")),
        }
    }

    /// Writes `component` as the compilation of the bytes whose SHA-256 is `digest`: to a new
    /// file renamed over the entry, so a reader never sees half of it.
    fn store(&self, digest: &[u8; 32], component: &Component) -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt;
        let body = component
            .serialize()
            .map_err(|error| format!("{error:#}"))?;
        let path = self.entry(digest);
        let temporary = path.with_extension(format!("{}.new", ulid::Ulid::new()));
        let written = (|| -> std::io::Result<()> {
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temporary)?;
            out.write_all(MAGIC)?;
            out.write_all(digest)?;
            out.write_all(&Sha256::digest(&body))?;
            out.write_all(&body)?;
            std::fs::rename(&temporary, &path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written.map_err(|error| format!("{}: {error}", path.display()))?;
        self.note_used(path);
        Ok(())
    }
}

/// Compiles `bytes`, whose SHA-256 is `digest`, or takes the compilation from `cache`. Blocking
/// and CPU-heavy: call it off the async workers.
pub fn compile(
    engine: &Engine,
    cache: Option<&CompileCache>,
    digest: &[u8; 32],
    bytes: &[u8],
) -> wasmtime::Result<Component> {
    if let Some(component) = cache.and_then(|cache| cache.load(engine, digest)) {
        return Ok(component);
    }
    let component = Component::new(engine, bytes)?;
    if let Some(cache) = cache {
        // A cache that cannot be written costs a compilation at the next start, nothing more.
        if let Err(error) = cache.store(digest, &component) {
            tracing::warn!(%error, "cannot write the compiled plugin cache");
        }
    }
    Ok(component)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest component, `(component)`: the preamble alone (magic, version 0x0d, layer 1).
    const EMPTY: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

    fn setup() -> (tempfile::TempDir, Engine, CompileCache, Vec<u8>, [u8; 32]) {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::default();
        let cache = CompileCache::open(&dir.path().join("cache"), &engine).expect("cache");
        let bytes = EMPTY.to_vec();
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        (dir, engine, cache, bytes, digest)
    }

    #[test]
    fn an_entry_is_used_only_for_the_digest_it_was_made_from() {
        let (_dir, engine, cache, bytes, digest) = setup();
        compile(&engine, Some(&cache), &digest, &bytes).expect("compile");
        assert!(
            cache.load(&engine, &digest).is_some(),
            "written and read back"
        );

        // An entry copied under another digest's name (someone swapping compilations) is not
        // taken for that digest.
        let other = [7u8; 32];
        std::fs::copy(cache.entry(&digest), cache.entry(&other)).expect("copy");
        assert!(cache.load(&engine, &other).is_none());
    }

    #[test]
    fn an_altered_entry_is_compiled_again_and_replaced() {
        let (_dir, engine, cache, bytes, digest) = setup();
        compile(&engine, Some(&cache), &digest, &bytes).expect("compile");
        let path = cache.entry(&digest);
        let mut entry = std::fs::read(&path).expect("entry");
        let last = entry.len() - 1;
        entry[last] ^= 0xff;
        std::fs::write(&path, &entry).expect("alter");
        assert!(
            cache.load(&engine, &digest).is_none(),
            "the body's digest no longer matches"
        );

        compile(&engine, Some(&cache), &digest, &bytes).expect("compile again");
        assert!(
            cache.load(&engine, &digest).is_some(),
            "replaced by a sound entry"
        );
    }

    #[test]
    fn entries_not_used_since_opening_are_pruned() {
        let (dir, engine, cache, bytes, digest) = setup();
        compile(&engine, Some(&cache), &digest, &bytes).expect("compile");
        let stale = cache.entry(&[9u8; 32]);
        std::fs::write(&stale, b"an older build's entry").expect("stale");
        std::fs::write(dir.path().join("cache/keep.txt"), b"not ours").expect("other");
        assert_eq!(cache.prune(), 1);
        assert!(!stale.exists());
        assert!(cache.entry(&digest).exists(), "the used entry stays");
        assert!(
            dir.path().join("cache/keep.txt").exists(),
            "files it did not make stay"
        );
    }

    #[test]
    fn an_entry_others_can_write_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, engine, cache, bytes, digest) = setup();
        compile(&engine, Some(&cache), &digest, &bytes).expect("compile");
        let entry = cache.entry(&digest);
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(cache.load(&engine, &digest).is_none());
    }

    #[test]
    fn the_directory_is_the_servers_own() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, _engine, _cache, _bytes, _digest) = setup();
        let mode = std::fs::metadata(dir.path().join("cache"))
            .expect("cache dir")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
