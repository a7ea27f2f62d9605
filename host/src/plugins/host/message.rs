//! The `message` interface: the message as the data hook sees it: its content, read in chunks through `body.read`, and its
//! header fields as mail-parser reads them, through `body.headers`.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use wasmtime::component::{HasSelf, Linker, Resource};

use super::HostState;
use crate::plugins::bindings::switchyard::plugin::{message, types};
use crate::plugins::bindings::types::Header;
use crate::scan::ScanResult;

/// The message lent to the data hooks of one chain. The header fields are parsed on the first
/// `body.headers()` call and shared by every later plugin of the chain: a chain whose plugins
/// never ask for them never parses them. The scanners' results ride with it (read through the
/// `scanners` interface).
#[derive(Clone)]
pub struct BodyHandle {
    content: Bytes,
    headers: Arc<OnceLock<Vec<Header>>>,
    scans: Arc<[ScanResult]>,
}

impl BodyHandle {
    pub fn new(content: Bytes) -> BodyHandle {
        BodyHandle::scanned(content, Arc::from([]))
    }

    /// The message with what the scanners said about it.
    pub fn scanned(content: Bytes, scans: Arc<[ScanResult]>) -> BodyHandle {
        BodyHandle {
            content,
            headers: Arc::default(),
            scans,
        }
    }

    pub fn scans(&self) -> &[ScanResult] {
        &self.scans
    }

    pub fn content(&self) -> &Bytes {
        &self.content
    }

    pub fn headers(&self) -> &[Header] {
        self.headers.get_or_init(|| parsed_headers(&self.content))
    }
}

/// The header fields of `content` in order, each value unfolded and trimmed; none when the
/// header section cannot be parsed.
pub fn parsed_headers(content: &[u8]) -> Vec<Header> {
    let Some(message) = mail_parser::MessageParser::default().parse_headers(content) else {
        return Vec::new();
    };
    message
        .headers()
        .iter()
        .map(|header| {
            let raw = content
                .get(header.offset_start as usize..header.offset_end as usize)
                .unwrap_or_default();
            let value = String::from_utf8_lossy(raw)
                .replace("\r\n", "")
                .trim()
                .to_string();
            Header {
                name: header.name().to_string(),
                value,
            }
        })
        .collect()
}

/// Most bytes one `body.read` returns.
const MAX_READ: u32 = 64 * 1024;

impl message::Host for HostState {}

impl message::HostBody for HostState {
    async fn size(&mut self, body: Resource<BodyHandle>) -> u64 {
        self.table
            .get(&body)
            .map(|b| b.content().len() as u64)
            .unwrap_or(0)
    }

    async fn headers(&mut self, body: Resource<BodyHandle>) -> Vec<types::Header> {
        self.table
            .get(&body)
            .map(|b| b.headers().to_vec())
            .unwrap_or_default()
    }

    async fn read(&mut self, body: Resource<BodyHandle>, offset: u64, length: u32) -> Vec<u8> {
        let Ok(handle) = self.table.get(&body) else {
            return Vec::new();
        };
        let content = handle.content();
        let start = (offset.min(content.len() as u64)) as usize;
        let end = start
            .saturating_add(length.min(MAX_READ) as usize)
            .min(content.len());
        content[start..end].to_vec()
    }

    async fn drop(&mut self, body: Resource<BodyHandle>) -> wasmtime::Result<()> {
        self.table.delete(body)?;
        Ok(())
    }
}

/// Adds the `message` interface to `linker`.
pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    message::add_to_linker::<_, HasSelf<HostState>>(linker, |state| state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_parsed_once_and_shared_by_clones() {
        let body = BodyHandle::new(Bytes::from_static(
            b"Subject: hello\r\n  world\r\nX-Tag: a\r\n\r\nbody\r\n",
        ));
        let lent = body.clone();
        assert!(body.headers.get().is_none());
        let names: Vec<_> = lent.headers().iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["Subject", "X-Tag"]);
        assert_eq!(lent.headers()[0].value, "hello  world");
        // The clone parsed them for the original too.
        assert!(body.headers.get().is_some());
    }
}
