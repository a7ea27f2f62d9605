//! clamd's `zINSTREAM` (clamd(8)): the command, then the message in chunks each preceded by its
//! length (4 bytes, network order), then a zero length; clamd answers one line ended by NUL:
//! `stream: OK`, `stream: NAME FOUND`, or `... ERROR`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{stream, ClamavVerdict, ScanError};
use crate::config::Endpoint;

/// Bytes per chunk: clamd reads chunks of any size up to its `StreamMaxLength`.
const CHUNK: usize = 64 * 1024;
/// The longest reply read: a signature name is short.
const MAX_REPLY: usize = 4096;

pub(super) async fn instream(
    address: &Endpoint,
    content: &[u8],
) -> Result<ClamavVerdict, ScanError> {
    let mut connection = stream::connect(address).await?;
    let sent = send(&mut connection, content).await;
    // clamd that refuses the stream part-way (over its StreamMaxLength) says why and closes:
    // read its reply even when the writing failed, and report the write's error only if none.
    let reply = read_reply(&mut connection).await;
    match (reply, sent) {
        (Ok(reply), _) if !reply.is_empty() => parse_reply(&reply),
        (_, Err(error)) => Err(ScanError::Protocol(format!("sending to clamd: {error}"))),
        (Ok(_), Ok(())) => Err(ScanError::Protocol(
            "clamd closed without a reply".to_string(),
        )),
        (Err(error), Ok(())) => Err(ScanError::Protocol(format!(
            "reading clamd's reply: {error}"
        ))),
    }
}

async fn send(connection: &mut Box<dyn stream::Connection>, content: &[u8]) -> std::io::Result<()> {
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
