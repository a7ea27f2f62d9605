//! Local delivery into Maildir folders, for recipients a route hook sends to `mailbox(name)`:
//! `[mailboxes] root/NAME/{tmp,new,cur}`. A message is written to `tmp/`, synced, renamed into
//! `new/` and the directory synced, so a reader never sees half a message and a 250 (delivered)
//! is recorded only once the message would survive a crash, as for a message accepted over SMTP.
//! `Return-Path` and `Delivered-To` are added as Postfix's local delivery does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::mail::reply::Reply;

/// Longest mailbox name accepted.
const MAX_NAME: usize = 128;

/// A distinct part for file names made in the same microsecond.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// True for a name that is one plain path component: letters, digits and `._+-@`, not starting
/// with a dot (so never `.`, `..` or a hidden folder).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"._+-@".contains(&byte))
}

/// What one local delivery needs.
pub struct Letter<'a> {
    pub root: &'a Path,
    pub mailbox: &'a str,
    pub hostname: &'a str,
    pub sender: &'a str,
    pub recipient: &'a str,
    pub content: &'a [u8],
}

/// Delivers one copy; the reply is the recipient's outcome (2xx delivered, 4xx retried later,
/// 5xx bounced).
pub fn deliver(letter: &Letter) -> Reply {
    if !valid_name(letter.mailbox) {
        return Reply::new(
            550,
            "5.1.1",
            format!("mailbox `{}`: not a valid mailbox name", letter.mailbox),
        );
    }
    match write_maildir(letter) {
        Ok(file) => Reply::new(
            250,
            "2.0.0",
            format!("delivered to mailbox {} as {file}", letter.mailbox),
        ),
        Err(error) => {
            // A full disk and a broken permission are the operator's to fix: keep the message
            // and try again later.
            let enhanced = if error.raw_os_error() == Some(libc::ENOSPC) {
                "4.3.1"
            } else {
                "4.3.0"
            };
            tracing::error!(mailbox = letter.mailbox, %error, "cannot write to the mailbox");
            Reply::new(
                451,
                enhanced,
                format!("mailbox `{}`: cannot write: {error}", letter.mailbox),
            )
        }
    }
}

fn write_maildir(letter: &Letter) -> std::io::Result<String> {
    let folder = letter.root.join(letter.mailbox);
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(folder.join(sub))?;
    }
    let header = format!(
        "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
        letter.sender, letter.recipient
    );
    let size = header.len() + letter.content.len();
    let name = unique_name(letter.hostname, size);
    let tmp: PathBuf = folder.join("tmp").join(&name);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        file.write_all(header.as_bytes())?;
        file.write_all(letter.content)?;
        file.sync_all()
    })();
    if let Err(error) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(error);
    }
    let new = folder.join("new");
    std::fs::rename(&tmp, new.join(&name))?;
    std::fs::File::open(&new)?.sync_all()?;
    Ok(name)
}

/// A Maildir file name: time, process, sequence and host make it unique; `,S=` gives the size
/// (as Dovecot's own deliveries write it).
fn unique_name(hostname: &str, size: usize) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let host: String = hostname
        .chars()
        .map(|c| if c == '/' || c == ':' { '_' } else { c })
        .collect();
    format!(
        "{}.M{}P{}Q{}.{host},S={size}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_plain_components() {
        for good in ["archive", "alice@example.test", "team.sales", "a+b-c_d"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", ".", "..", "../etc", "a/b", ".hidden", "sp ace", "nul\0"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(!valid_name(&"a".repeat(MAX_NAME + 1)));
    }

    #[test]
    fn a_letter_lands_in_new_with_trace_headers() {
        let root = tempfile::tempdir().expect("tempdir");
        let letter = Letter {
            root: root.path(),
            mailbox: "archive",
            hostname: "mx.test",
            sender: "a@sender.test",
            recipient: "b@archive.test",
            content: b"Subject: x\r\n\r\nbody\r\n",
        };
        let reply = deliver(&letter);
        assert_eq!(reply.code, 250, "{reply:?}");
        let files: Vec<_> = std::fs::read_dir(root.path().join("archive/new"))
            .expect("new")
            .collect();
        assert_eq!(files.len(), 1);
        let path = files[0].as_ref().expect("entry").path();
        let text = std::fs::read_to_string(path).expect("read");
        assert!(text.starts_with(
            "Return-Path: <a@sender.test>\r\nDelivered-To: b@archive.test\r\nSubject: x"
        ));
        assert_eq!(
            std::fs::read_dir(root.path().join("archive/tmp"))
                .expect("tmp")
                .count(),
            0
        );
        assert_eq!(
            deliver(&Letter {
                mailbox: "../x",
                ..letter
            })
            .code,
            550
        );
    }

    #[test]
    fn an_unwritable_root_defers() {
        let root = tempfile::tempdir().expect("tempdir");
        // A file where the mailbox folder should be: nothing can be created under it.
        std::fs::write(root.path().join("blocked"), b"").expect("file");
        let letter = Letter {
            root: root.path(),
            mailbox: "blocked",
            hostname: "mx.test",
            sender: "",
            recipient: "b@x.test",
            content: b"x\r\n",
        };
        assert_eq!(deliver(&letter).code, 451);
    }
}
