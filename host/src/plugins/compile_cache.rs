//! Compiling components, through an on-disk cache keyed by the SHA-256 of the bytes compiled.
//!
//! A cached compilation is native code the host maps and runs, so an entry decides what runs as
//! surely as the component file does. The loader computes the digest of the bytes it read (and,
//! for a pinned plugin, has already refused any digest but the pinned one); an entry is used only
//! if its header names that same digest and its body still has the SHA-256 recorded when it was
//! written. Anything else (another digest, a truncated or altered body, a build of another
//! engine) is compiled afresh and the entry replaced. The directory is the server's own
//! (`data_dir/plugin-cache`, made mode 0700): writing the plugin directory does not reach it.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

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
}

impl CompileCache {
    /// The cache in `dir`, created (mode 0700) if missing.
    pub fn open(dir: &Path, engine: &Engine) -> std::io::Result<CompileCache> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(CompileCache {
            dir: dir.to_path_buf(),
            engine_key: format!("{:016x}", hasher.finish()),
        })
    }

    fn entry(&self, digest: &[u8; 32]) -> PathBuf {
        self.dir
            .join(format!("{}-{}.cwasm", hex::encode(digest), self.engine_key))
    }

    /// The cached compilation of the bytes whose SHA-256 is `digest`, if there is a sound one.
    fn load(&self, engine: &Engine, digest: &[u8; 32]) -> Option<Component> {
        let path = self.entry(digest);
        let entry = std::fs::read(&path).ok()?;
        let refuse = |why: &str| {
            tracing::warn!(entry = %path.display(), why, "compiled plugin cache entry ignored; compiling again");
            None
        };
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
            Ok(component) => Some(component),
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
        written.map_err(|error| format!("{}: {error}", path.display()))
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
