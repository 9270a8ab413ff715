//! DNS over UDP and TCP: queries for the cluster domain (and the reverse
//! names of cluster addresses) are answered from the zone, everything else
//! is relayed as it is to the node's upstream resolvers.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, PTR, SOA, SRV};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use crate::zone::{self, Answer, Kind, Zone};

/// How long an upstream resolver gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// What the listeners share: the current zone and where to forward.
pub struct State {
    pub zone: RwLock<Arc<Zone>>,
    pub upstreams: Vec<SocketAddr>,
}

impl State {
    pub fn zone(&self) -> Arc<Zone> {
        self.zone.read().expect("zone lock").clone()
    }
}

fn name(s: &str) -> Name {
    Name::from_ascii(format!("{s}.")).unwrap_or_else(|_| Name::root())
}

fn record(r: &zone::Record) -> hickory_proto::rr::Record {
    let ttl = zone::TTL;
    match r {
        zone::Record::A(n, ip) => {
            hickory_proto::rr::Record::from_rdata(name(n), ttl, RData::A(A(*ip)))
        }
        zone::Record::Cname(n, t) => {
            hickory_proto::rr::Record::from_rdata(name(n), ttl, RData::CNAME(CNAME(name(t))))
        }
        zone::Record::Srv(n, port, weight, t) => hickory_proto::rr::Record::from_rdata(
            name(n),
            ttl,
            RData::SRV(SRV::new(0, *weight, *port, name(t))),
        ),
        zone::Record::Ptr(n, t) => {
            hickory_proto::rr::Record::from_rdata(name(n), ttl, RData::PTR(PTR(name(t))))
        }
    }
}

/// The zone's SOA, sent with negative answers so they are cached for the
/// zone's TTL.
fn soa(domain: &str) -> hickory_proto::rr::Record {
    let rdata = SOA::new(
        name(&format!("ns.dns.{domain}")),
        name(&format!("hostmaster.{domain}")),
        1,
        7200,
        1800,
        86400,
        zone::TTL,
    );
    hickory_proto::rr::Record::from_rdata(name(domain), zone::TTL, RData::SOA(rdata))
}

fn kind(t: RecordType) -> Kind {
    match t {
        RecordType::A => Kind::A,
        RecordType::SRV => Kind::Srv,
        RecordType::PTR => Kind::Ptr,
        RecordType::CNAME => Kind::Cname,
        RecordType::ANY => Kind::Any,
        _ => Kind::Other,
    }
}

/// An empty response to `request`: its id, opcode and RD flag, recursion
/// available.
fn reply(request: &Message) -> Message {
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true);
    response
}

/// How an answer travels: over UDP it must fit the client's buffer (512
/// bytes, or its EDNS size), else it is cut to its question with TC set so
/// the client asks again over TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The answer to one query message: from the zone, or `None` when it is
/// for upstream.
pub fn answer_locally(zone: &Zone, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let request = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => return formerr(query),
    };
    let mut response = reply(&request);
    let Some(q) = request.queries().first() else {
        response.set_response_code(ResponseCode::FormErr);
        return response.to_vec().ok();
    };
    response.add_query(q.clone());
    let qname = q.name().to_ascii();
    match zone.answer(&qname, kind(q.query_type())) {
        Answer::NotOurs => return None,
        Answer::Records(records, extra) => {
            response.set_authoritative(true);
            for r in &records {
                response.add_answer(record(r));
            }
            for r in &extra {
                response.add_additional(record(r));
            }
        }
        Answer::NoData => {
            response.set_authoritative(true);
            response.add_name_server(soa(zone.domain()));
        }
        Answer::NxDomain => {
            response
                .set_authoritative(true)
                .set_response_code(ResponseCode::NXDomain);
            response.add_name_server(soa(zone.domain()));
        }
    }
    let mut limit = 512;
    if let Some(edns) = request.extensions() {
        let mut edns = edns.clone();
        limit = edns.max_payload().max(512) as usize;
        edns.set_max_payload(limit as u16);
        response.set_edns(edns);
    }
    let bytes = response.to_vec().ok()?;
    if transport == Transport::Tcp || bytes.len() <= limit {
        return Some(bytes);
    }
    let mut cut = reply(&request);
    cut.set_authoritative(response.authoritative())
        .set_truncated(true)
        .set_response_code(response.response_code());
    for q in response.queries() {
        cut.add_query(q.clone());
    }
    cut.to_vec().ok()
}

/// A FORMERR for a message that did not parse, if it had a header at all.
fn formerr(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut response = Message::new();
    response
        .set_id(u16::from_be_bytes([query[0], query[1]]))
        .set_message_type(MessageType::Response)
        .set_response_code(ResponseCode::FormErr);
    response.to_vec().ok()
}

/// SERVFAIL for a query no upstream answered.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let mut response = reply(&request);
    response.set_response_code(ResponseCode::ServFail);
    for q in request.queries() {
        response.add_query(q.clone());
    }
    response.to_vec().ok()
}

/// Relays a query to the upstream resolvers in turn; the first answer wins.
pub async fn forward(upstreams: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let bind: SocketAddr = if upstream.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(socket) = UdpSocket::bind(bind).await else {
            continue;
        };
        if socket.send_to(query, upstream).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 65535];
        let id = query.get(..2);
        let got = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
            loop {
                let (n, from) = socket.recv_from(&mut buf).await?;
                if from == *upstream && buf.get(..2) == id {
                    return Ok::<usize, std::io::Error>(n);
                }
            }
        })
        .await;
        if let Ok(Ok(n)) = got {
            buf.truncate(n);
            return Some(buf);
        }
    }
    servfail(query)
}

/// The answer to a query, from the zone or upstream.
pub async fn resolve(state: &State, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let local = answer_locally(&state.zone(), query, transport);
    match local {
        Some(answer) => Some(answer),
        None if Message::from_vec(query).is_ok() => forward(&state.upstreams, query).await,
        None => None,
    }
}

/// Answers UDP queries on a thread of its own until the socket fails
/// (dnsmasq's shape: one loop, no scheduler between a query and its
/// answer). Local answers are written from the loop itself (they cost
/// microseconds); forwarded queries become tasks on `rt`, so a slow
/// upstream holds up no one.
pub fn serve_udp(
    socket: std::net::UdpSocket,
    state: Arc<State>,
    rt: tokio::runtime::Handle,
) -> std::io::Result<()> {
    socket.set_nonblocking(false)?;
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = socket.recv_from(&mut buf)?;
        let query = &buf[..n];
        match answer_locally(&state.zone(), query, Transport::Udp) {
            Some(answer) => {
                let _ = socket.send_to(&answer, peer);
            }
            None => {
                let (socket, state, query) = (socket.clone(), state.clone(), query.to_vec());
                rt.spawn(async move {
                    if Message::from_vec(&query).is_err() {
                        return;
                    }
                    if let Some(answer) = forward(&state.upstreams, &query).await {
                        let _ = socket.send_to(&answer, peer);
                    }
                });
            }
        }
    }
}

/// Answers TCP queries (two-byte length prefix, several per connection).
pub async fn serve_tcp(listener: TcpListener, state: Arc<State>) -> std::io::Result<()> {
    loop {
        let (mut conn, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                let mut len = [0u8; 2];
                let read = tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut len));
                if !matches!(read.await, Ok(Ok(_))) {
                    return;
                }
                let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
                if conn.read_exact(&mut query).await.is_err() {
                    return;
                }
                let Some(answer) = resolve(&state, &query, Transport::Tcp).await else {
                    return;
                };
                let Ok(n) = u16::try_from(answer.len()) else {
                    return;
                };
                if conn.write_all(&n.to_be_bytes()).await.is_err()
                    || conn.write_all(&answer).await.is_err()
                {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use serde_json::json;

    fn query(name: &str, ty: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(7).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
        m.to_vec().unwrap()
    }

    fn zone() -> Zone {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "type": "ClusterIP",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
        }))
        .unwrap();
        Zone::build(
            "cluster.local",
            wasmkube_proxy::ServiceView::of(&svc).as_ref(),
            [],
        )
    }

    #[test]
    fn answers_on_the_wire() {
        let z = zone();
        let answer = |name: &str, ty| {
            Message::from_vec(&answer_locally(&z, &query(name, ty), Transport::Udp).expect("local"))
                .unwrap()
        };
        let a = answer("web.default.svc.cluster.local.", RecordType::A);
        assert_eq!(a.id(), 7);
        assert_eq!(a.response_code(), ResponseCode::NoError);
        assert!(a.authoritative());
        assert_eq!(a.answers().len(), 1, "{a:?}");
        assert_eq!(a.answers()[0].ttl(), zone::TTL);
        let srv = answer("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV);
        assert_eq!(srv.answers().len(), 1);
        assert_eq!(srv.additionals().len(), 1);
        let aaaa = answer("web.default.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(aaaa.response_code(), ResponseCode::NoError);
        assert!(aaaa.answers().is_empty());
        assert_eq!(aaaa.name_servers().len(), 1, "an SOA for negative caching");
        let nx = answer("nope.default.svc.cluster.local.", RecordType::A);
        assert_eq!(nx.response_code(), ResponseCode::NXDomain);
        assert!(
            answer_locally(&z, &query("example.org.", RecordType::A), Transport::Udp).is_none()
        );
    }
}
