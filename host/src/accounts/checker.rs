//! Password checks on a fixed set of worker threads, each reusing one block memory.
//!
//! argon2 needs `m` KiB of working memory per check (19 MiB with the costs `auth hash` uses).
//! Run on tokio's blocking pool, every check could land on another of its up to 512 threads,
//! and glibc keeps each thread's freed 19 MiB in that thread's arena: a burst of failed logins
//! from many addresses pinned over a gigabyte that never came back. Here a fixed number of
//! workers (the core count, at most [`MAX_WORKERS`]) each keep one buffer, grown to the largest
//! cost seen and reused, so the checks at once and the memory they hold are both bounded; the
//! other checks wait in the queue (inside the AUTH budget's delays). A worker idle for
//! [`IDLE_RELEASE`] frees its buffer and asks the allocator to hand free memory back to the
//! kernel, so memory falls back after a burst.

use std::sync::OnceLock;
use std::time::Duration;

use argon2::password_hash::{Output, PasswordHash};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

/// Checks that may run at once, whatever the core count.
pub const MAX_WORKERS: usize = 8;
/// How long a worker keeps its block memory without a check to run.
pub const IDLE_RELEASE: Duration = Duration::from_secs(5);
/// The largest memory cost a users file may ask for, in KiB (256 MiB): a check costs that much
/// memory per worker.
pub const MAX_MEMORY_KIB: u32 = 256 * 1024;

struct Job {
    hash: String,
    password: String,
    answer: tokio::sync::oneshot::Sender<bool>,
}

/// The workers' queue.
struct Checker {
    jobs: Sender<Job>,
}

fn checker() -> &'static Checker {
    static CHECKER: OnceLock<Checker> = OnceLock::new();
    CHECKER.get_or_init(|| {
        let (jobs, queue) = crossbeam_channel::unbounded();
        let workers = std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
            .clamp(1, MAX_WORKERS);
        for index in 0..workers {
            let queue = queue.clone();
            let started = std::thread::Builder::new()
                .name(format!("password-check-{index}"))
                .spawn(move || work(&queue));
            if let Err(error) = started {
                tracing::error!(%error, "cannot start a password check worker");
            }
        }
        Checker { jobs }
    })
}

/// True when `password` matches the PHC string `hash`. Runs on a worker; false on any error
/// (an unparsable hash, or no worker to run it), never a panic.
pub async fn check(hash: String, password: String) -> bool {
    let (answer, answered) = tokio::sync::oneshot::channel();
    let job = Job {
        hash,
        password,
        answer,
    };
    if checker().jobs.send(job).is_err() {
        return false;
    }
    answered.await.unwrap_or(false)
}

fn work(queue: &Receiver<Job>) {
    let mut memory: Vec<Block> = Vec::new();
    loop {
        match queue.recv_timeout(IDLE_RELEASE) {
            Ok(job) => {
                let matches = verify(&job.hash, job.password.as_bytes(), &mut memory);
                let _ = job.answer.send(matches);
            }
            Err(RecvTimeoutError::Timeout) => {
                if !memory.is_empty() {
                    memory = Vec::new();
                    release_free_memory();
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// argon2's verification with block memory of the caller's, grown as needed and kept.
fn verify(hash: &str, password: &[u8], memory: &mut Vec<Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(version)) => version,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    if params.m_cost() > MAX_MEMORY_KIB {
        return false;
    }
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut computed = [0u8; Output::MAX_LENGTH];
    let computed = &mut computed[..expected.len()];
    let hashed = Argon2::new(algorithm, version, params).hash_password_into_with_memory(
        password,
        salt,
        computed,
        &mut memory[..blocks],
    );
    // `Output`'s equality is constant-time.
    hashed.is_ok() && Output::new(computed).is_ok_and(|computed| computed == expected)
}

/// Hands the allocator's free memory back to the kernel (glibc keeps freed blocks in the arena
/// of the thread that freed them otherwise).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointer of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checks_agree_with_the_argon2_crate() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"0123456789abcdef").expect("salt");
        for argon in [
            Argon2::default(),
            Argon2::new(
                Algorithm::Argon2i,
                Version::V0x10,
                Params::new(64, 3, 1, Some(24)).expect("params"),
            ),
        ] {
            let hash = argon
                .hash_password(b"correct horse", &salt)
                .expect("hash")
                .to_string();
            assert!(
                check(hash.clone(), "correct horse".to_string()).await,
                "{hash}"
            );
            assert!(!check(hash.clone(), "correct horsf".to_string()).await);
            assert!(!check(hash, String::new()).await);
        }
        assert!(!check("not a hash".to_string(), "x".to_string()).await);
    }
}
