//! A real DNS server on loopback (UDP), answering from a table, for MX tests.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX};
use hickory_proto::rr::{Name, RData, Record};
use tokio::net::UdpSocket;

#[derive(Default)]
struct Zone {
    records: HashMap<String, Vec<RData>>,
    /// Names whose answers carry the AD bit, as a validating resolver's would.
    secure: std::collections::HashSet<String>,
    /// Names whose lookups fail (SERVFAIL), as a broken or unreachable zone's do.
    failing: std::collections::HashSet<String>,
    /// Names never answered: the client's lookup times out.
    silent: std::collections::HashSet<String>,
}

pub struct DnsServer {
    pub address: SocketAddr,
    zone: Arc<Mutex<Zone>>,
}

fn key(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.').to_lowercase())
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let address = socket.local_addr().expect("dns address");
        let zone = Arc::new(Mutex::new(Zone::default()));
        let served = zone.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 4096];
            loop {
                let Ok((length, peer)) = socket.recv_from(&mut buffer).await else {
                    return;
                };
                let Ok(request) = Message::from_vec(&buffer[..length]) else {
                    continue;
                };
                let mut response = Message::new(
                    request.metadata.id,
                    MessageType::Response,
                    request.metadata.op_code,
                );
                response.metadata.authoritative = true;
                response.metadata.recursion_desired = request.metadata.recursion_desired;
                response.metadata.recursion_available = true;
                response.queries = request.queries.clone();
                if let Some(query) = request.queries.first() {
                    let name = key(&query.name().to_string());
                    let zone = served.lock().expect("zone");
                    if zone.silent.contains(&name) {
                        continue;
                    }
                    response.metadata.authentic_data = zone.secure.contains(&name);
                    match zone.records.get(&name) {
                        _ if zone.failing.contains(&name) => {
                            response.metadata.response_code = ResponseCode::ServFail
                        }
                        None => response.metadata.response_code = ResponseCode::NXDomain,
                        Some(records) => {
                            for rdata in records
                                .iter()
                                .filter(|r| r.record_type() == query.query_type())
                            {
                                response.answers.push(Record::from_rdata(
                                    query.name().clone(),
                                    1,
                                    rdata.clone(),
                                ));
                            }
                        }
                    }
                }
                if let Ok(bytes) = response.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        DnsServer { address, zone }
    }

    fn add(&self, name: &str, rdata: RData) {
        self.zone
            .lock()
            .expect("zone")
            .records
            .entry(key(name))
            .or_default()
            .push(rdata);
    }

    /// Lookups of `name` get no answer from now on (they time out).
    pub fn silence(&self, name: &str) {
        self.zone.lock().expect("zone").silent.insert(key(name));
    }

    /// Lookups of `name` fail with SERVFAIL from now on.
    pub fn fail(&self, name: &str) {
        self.zone.lock().expect("zone").failing.insert(key(name));
    }

    /// Forgets every record of `name` (to publish it anew).
    pub fn forget(&self, name: &str) {
        self.zone.lock().expect("zone").records.remove(&key(name));
    }

    /// Answers for `name` carry the AD bit from now on: DNSSEC-validated, as far as a client
    /// that trusts its resolver can tell.
    pub fn secure(&self, name: &str) {
        self.zone.lock().expect("zone").secure.insert(key(name));
    }

    /// A TLSA record (RFC 6698): usage, selector, matching type and data.
    pub fn tlsa(&self, name: &str, usage: u8, selector: u8, matching: u8, data: Vec<u8>) {
        use hickory_proto::rr::rdata::tlsa::{CertUsage, Matching, Selector, TLSA};
        self.add(
            name,
            RData::TLSA(TLSA::new(
                CertUsage::from(usage),
                Selector::from(selector),
                Matching::from(matching),
                data,
            )),
        );
    }

    pub fn mx(&self, domain: &str, preference: u16, exchange: &str) {
        let exchange = Name::from_str(&key(exchange)).expect("mx name");
        self.add(domain, RData::MX(MX::new(preference, exchange)));
    }

    pub fn null_mx(&self, domain: &str) {
        self.add(domain, RData::MX(MX::new(0, Name::root())));
    }

    pub fn a(&self, name: &str, ip: Ipv4Addr) {
        self.add(name, RData::A(A(ip)));
    }

    pub fn aaaa(&self, name: &str, ip: Ipv6Addr) {
        self.add(name, RData::AAAA(AAAA(ip)));
    }

    pub fn txt(&self, name: &str, text: &str) {
        self.add(
            name,
            // A TXT string holds 255 octets; longer texts (DKIM keys) are split, as in a zone.
            RData::TXT(hickory_proto::rr::rdata::TXT::new(
                text.as_bytes()
                    .chunks(255)
                    .map(|chunk| String::from_utf8_lossy(chunk).into_owned())
                    .collect(),
            )),
        );
    }
}
