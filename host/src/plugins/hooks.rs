//! The hook names of the WIT `hooks` interface, as a small set.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum HookKind {
    Connect = 1,
    Helo = 2,
    Auth = 4,
    MailFrom = 8,
    RcptTo = 16,
    Data = 32,
    Route = 64,
    DeliveryResult = 128,
    Bounce = 256,
}

impl HookKind {
    pub const ALL: [HookKind; 9] = [
        HookKind::Connect,
        HookKind::Helo,
        HookKind::Auth,
        HookKind::MailFrom,
        HookKind::RcptTo,
        HookKind::Data,
        HookKind::Route,
        HookKind::DeliveryResult,
        HookKind::Bounce,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HookKind::Connect => "connect",
            HookKind::Helo => "helo",
            HookKind::Auth => "auth",
            HookKind::MailFrom => "mail-from",
            HookKind::RcptTo => "rcpt-to",
            HookKind::Data => "data",
            HookKind::Route => "route",
            HookKind::DeliveryResult => "delivery-result",
            HookKind::Bounce => "bounce",
        }
    }

    pub fn from_name(name: &str) -> Option<HookKind> {
        HookKind::ALL.into_iter().find(|hook| hook.name() == name)
    }
}

/// The hooks one plugin implements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HookSet(u16);

impl HookSet {
    /// The hooks `init` named in its `plugin-info`; an unknown name is an error.
    pub fn from_names(names: &[String]) -> Result<HookSet, String> {
        let mut hooks = HookSet::default();
        for name in names {
            match HookKind::from_name(name) {
                Some(hook) => hooks.insert(hook),
                None => return Err(format!("init lists unknown hook `{name}`")),
            }
        }
        Ok(hooks)
    }

    pub fn insert(&mut self, hook: HookKind) {
        self.0 |= hook as u16;
    }

    pub fn contains(self, hook: HookKind) -> bool {
        self.0 & hook as u16 != 0
    }

    pub fn names(self) -> Vec<&'static str> {
        HookKind::ALL
            .into_iter()
            .filter(|hook| self.contains(*hook))
            .map(HookKind::name)
            .collect()
    }
}
