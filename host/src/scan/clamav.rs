//! clamd's `zINSTREAM` (clamd(8)): the command, then the message in chunks each preceded by its
//! length (4 bytes, network order), then a zero length; clamd answers one line ended by NUL:
//! `stream: OK`, `stream: NAME FOUND`, or `... ERROR`. Scans run in sessions (`zIDSESSION`,
//! where each reply starts with its command's id) kept open for the next scan.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{stream, ClamavVerdict, ScanError};
use crate::config::Endpoint;

/// Bytes per chunk: clamd reads chunks of any size up to its `StreamMaxLength`.
const CHUNK: usize = 64 * 1024;
/// The longest reply read: a signature name is short.
const MAX_REPLY: usize = 4096;

/// clamd sessions (`zIDSESSION`) of one scanner left open for the next scan: a scan on one
/// costs a write and a read instead of a new connection.
#[derive(Default)]
pub(super) struct Sessions {
    idle: Mutex<Vec<Session>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions")
    }
}

/// Idle sessions kept per scanner, at most.
const MAX_IDLE: usize = 32;
/// How long a session may stay idle and be used again: below clamd's own `IdleTimeout` (30 s
/// by default), after which clamd closes it.
const IDLE_FOR: Duration = Duration::from_secs(20);

struct Session {
    connection: Box<dyn stream::Connection>,
    /// The id clamd gives the next command's reply (`N: stream: OK`).
    next_id: u64,
    idle_since: Instant,
}

impl Sessions {
    fn take(&self) -> Option<Session> {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while let Some(session) = idle.pop() {
            if session.idle_since.elapsed() < IDLE_FOR {
                return Some(session);
            }
        }
        None
    }

    fn put(&self, mut session: Session) {
        session.idle_since = Instant::now();
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(session);
        }
    }
}

/// Why a scan in a session gave no verdict.
enum Failure {
    /// The session broke before clamd answered (clamd may have closed an idle one).
    Broken(String),
    /// clamd answered something that is not a verdict.
    Answered(ScanError),
}

pub(super) async fn instream(
    address: &Endpoint,
    sessions: &Sessions,
    content: &[u8],
) -> Result<ClamavVerdict, ScanError> {
    if let Some(session) = sessions.take() {
        match scan_in(session, content).await {
            Ok((verdict, session)) => {
                sessions.put(session);
                return Ok(verdict);
            }
            Err(Failure::Answered(error)) => return Err(error),
            // clamd closed it meanwhile: a new session below.
            Err(Failure::Broken(_)) => {}
        }
    }
    let mut connection = stream::connect(address).await?;
    connection
        .write_all(b"zIDSESSION\0")
        .await
        .map_err(|error| ScanError::Protocol(format!("sending to clamd: {error}")))?;
    let session = Session {
        connection,
        next_id: 1,
        idle_since: Instant::now(),
    };
    match scan_in(session, content).await {
        Ok((verdict, session)) => {
            sessions.put(session);
            Ok(verdict)
        }
        Err(Failure::Answered(error)) => Err(error),
        Err(Failure::Broken(text)) => Err(ScanError::Protocol(text)),
    }
}

/// One `zINSTREAM` in a session; the session back when it can serve another.
async fn scan_in(
    mut session: Session,
    content: &[u8],
) -> Result<(ClamavVerdict, Session), Failure> {
    let sent = send(&mut session.connection, content).await;
    // clamd that refuses the stream part-way (over its StreamMaxLength) says why and closes:
    // read its reply even when the writing failed, and report the write's error only if none.
    let reply = match (read_reply(&mut session.connection).await, sent) {
        (Ok(reply), _) if !reply.is_empty() => reply,
        (_, Err(error)) => return Err(Failure::Broken(format!("sending to clamd: {error}"))),
        (Ok(_), Ok(())) => return Err(Failure::Broken("clamd closed without a reply".into())),
        (Err(error), Ok(())) => {
            return Err(Failure::Broken(format!("reading clamd's reply: {error}")))
        }
    };
    // In a session each reply starts with its command's id.
    let id = session.next_id;
    session.next_id += 1;
    let answer = match reply.split_once(": ") {
        Some((given, rest)) if given == id.to_string() => rest,
        _ => {
            return Err(Failure::Answered(ScanError::Protocol(format!(
                "clamd answered out of turn: {}",
                printable(&reply)
            ))))
        }
    };
    parse_reply(answer)
        .map(|verdict| (verdict, session))
        .map_err(Failure::Answered)
}

async fn send(connection: &mut Box<dyn stream::Connection>, content: &[u8]) -> std::io::Result<()> {
    if content.len() <= CHUNK {
        // A small message in one write: one packet, one wake-up of clamd.
        let mut request = Vec::with_capacity(content.len() + 18);
        request.extend_from_slice(b"zINSTREAM\0");
        request.extend_from_slice(&(content.len() as u32).to_be_bytes());
        request.extend_from_slice(content);
        request.extend_from_slice(&0u32.to_be_bytes());
        connection.write_all(&request).await?;
        return connection.flush().await;
    }
    connection.write_all(b"zINSTREAM\0").await?;
    for chunk in content.chunks(CHUNK) {
        // Chunks are at most CHUNK bytes, far below u32::MAX.
        let length = chunk.len() as u32;
        connection.write_all(&length.to_be_bytes()).await?;
        connection.write_all(chunk).await?;
    }
    connection.write_all(&0u32.to_be_bytes()).await?;
    connection.flush().await
}

/// The reply up to its NUL (or the end of the stream), at most [`MAX_REPLY`] bytes.
async fn read_reply(connection: &mut Box<dyn stream::Connection>) -> std::io::Result<String> {
    let mut reply = Vec::new();
    let mut buffer = [0u8; 512];
    loop {
        let read = connection.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        reply.extend_from_slice(&buffer[..read]);
        if let Some(end) = reply.iter().position(|&byte| byte == 0) {
            reply.truncate(end);
            break;
        }
        if reply.len() > MAX_REPLY {
            reply.truncate(MAX_REPLY);
            break;
        }
    }
    Ok(String::from_utf8_lossy(&reply).trim().to_string())
}

fn parse_reply(reply: &str) -> Result<ClamavVerdict, ScanError> {
    let verdict = reply.strip_prefix("stream:").map(str::trim);
    match verdict {
        Some("OK") => Ok(ClamavVerdict::Clean),
        Some(found) if found.ends_with(" FOUND") => Ok(ClamavVerdict::Infected(
            found.trim_end_matches(" FOUND").trim().to_string(),
        )),
        _ => Err(ScanError::Protocol(format!(
            "clamd answered: {}",
            printable(reply)
        ))),
    }
}

/// At most 200 characters of what a scanner said, control characters replaced.
pub(super) fn printable(text: &str) -> String {
    text.chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_verdicts_or_errors() {
        assert_eq!(parse_reply("stream: OK"), Ok(ClamavVerdict::Clean));
        assert_eq!(
            parse_reply("stream: Switchyard-Test.UNOFFICIAL FOUND"),
            Ok(ClamavVerdict::Infected(
                "Switchyard-Test.UNOFFICIAL".to_string()
            ))
        );
        assert_eq!(
            parse_reply("INSTREAM size limit exceeded. ERROR"),
            Err(ScanError::Protocol(
                "clamd answered: INSTREAM size limit exceeded. ERROR".to_string()
            ))
        );
        assert!(parse_reply("").is_err());
    }
}
