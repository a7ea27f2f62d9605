//! What a plugin answers, as the host takes it: its reply made safe for SMTP (what the chain,
//! the trace and routing all send), and its edits as the host applies them.

use super::bindings::types as wit;
use crate::mail::edit::{Edit, Header};
use crate::mail::reply::Reply;

/// A plugin's reply as the host will use it: the code of the asked class (else 550 or 451), a
/// well-formed enhanced code of that class (else 5.7.1 or 4.7.1), and text without control
/// characters (it goes into SMTP replies, DSN fields and logs).
pub fn reply_of(reply: wit::Reply, permanent: bool) -> Reply {
    let valid = if permanent {
        (500..600).contains(&reply.code)
    } else {
        (400..500).contains(&reply.code)
    };
    let code = if valid {
        reply.code
    } else if permanent {
        550
    } else {
        451
    };
    // The enhanced code must be well formed and of the same class as the code.
    let class = if permanent { "5." } else { "4." };
    let enhanced = if valid
        && crate::mail::reply::is_enhanced_code(&reply.enhanced)
        && reply.enhanced.starts_with(class)
    {
        reply.enhanced
    } else {
        if permanent { "5.7.1" } else { "4.7.1" }.to_string()
    };
    Reply::new(code, &enhanced, crate::mail::text::one_line(&reply.text))
}

/// A plugin's edit as the host applies it.
pub fn host_edit(edit: wit::Edit) -> Edit {
    let header = |header: wit::Header| Header {
        name: header.name,
        value: header.value,
    };
    match edit {
        wit::Edit::AddHeader(added) => Edit::AddHeader(header(added)),
        wit::Edit::RemoveHeader(name) => Edit::RemoveHeader(name),
        wit::Edit::ReplaceHeader(replacement) => Edit::ReplaceHeader(header(replacement)),
        wit::Edit::AddRecipient(address) => Edit::AddRecipient(address),
        wit::Edit::RemoveRecipient(address) => Edit::RemoveRecipient(address),
    }
}
