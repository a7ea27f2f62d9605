//! The ground floor: what a mail system is made of, whoever handles it. SMTP replies, addresses,
//! the header section of a message and the edits made to it, and the one rule for text that came
//! from outside. Nothing here does I/O or knows about plugins, queues or sessions.

pub mod address;
pub mod dsn_params;
pub mod edit;
pub mod header;
pub mod reply;
pub mod seven_bit;
pub mod text;
