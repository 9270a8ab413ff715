//! The proxy's scripts applied by the real `nft` to a real kernel, in a
//! network namespace the test makes (nothing of the machine's own rules is
//! touched): the whole table, then changes to it as diffs, then its removal.

use std::net::Ipv4Addr;
use std::process::Command;

use wasmkube_proxy::model::{Endpoint, PortName, Protocol, ServicePort};
use wasmkube_proxy::{NodeNetwork, nft};

fn port(endpoints: &[&str], node_port: Option<u16>, affinity: Option<u32>) -> ServicePort {
    let endpoints: Vec<Endpoint> = endpoints
        .iter()
        .map(|ip| Endpoint {
            ip: ip.parse().unwrap(),
            port: 8080,
        })
        .collect();
    ServicePort {
        name: PortName {
            namespace: "shop".into(),
            name: "web".into(),
            port: "http".into(),
            protocol: Protocol::Tcp,
        },
        cluster_ip: Some("10.96.0.20".parse().unwrap()),
        port: 80,
        node_port,
        external_ips: vec![Ipv4Addr::new(192, 168, 7, 1)],
        affinity_seconds: affinity,
        cluster_endpoints: endpoints.clone(),
        external_endpoints: endpoints,
        external_local: false,
    }
}

fn apply(script: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Err(e) = rt.block_on(nft::apply(script)) {
        panic!("{e}\n{script}");
    }
}

fn table() -> String {
    let out = Command::new("nft")
        .args(["list", "table", "ip", nft::TABLE])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn full_table_diffs_and_removal_apply_to_a_real_kernel() {
    let ns = wasmkube_testkit::TestNetns::new("wkp");
    let net = NodeNetwork {
        cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
        service_cidr: "10.96.0.0/12".parse().unwrap(),
        node_local: vec!["10.96.0.10".parse().unwrap()],
    };
    ns.run(|| {
        let slots = &mut nft::Slots::default();
        let two = nft::build(
            &[port(&["10.244.0.5", "10.244.1.5"], Some(30080), Some(60))],
            &net,
            slots,
        );
        apply(&nft::full(&net, &two));
        let t = table();
        assert!(t.contains("10.96.0.20 . tcp . 80 : goto service-"), "{t}");
        assert!(t.contains("tcp . 30080 : goto external-"), "{t}");
        assert!(t.contains("numgen random mod 2"), "{t}");
        assert_eq!(t.matches("chain endpoint-").count(), 2, "{t}");
        // Applied twice, the whole table replaces itself.
        apply(&nft::full(&net, &two));

        let one = nft::build(&[port(&["10.244.1.5"], Some(30080), None)], &net, slots);
        apply(&nft::diff(&two, &one));
        let t = table();
        // Without affinity, no chain per endpoint: one DNAT rule picks
        // from the Service's slot of a shared map.
        assert_eq!(t.matches("chain endpoint-").count(), 0, "{t}");
        assert!(!t.contains("affinity-"), "{t}");
        assert!(
            // (nft lists no offset when it is 0)
            t.contains("dnat ip to numgen random mod 1 map @endpoints-0"),
            "{t}"
        );
        assert!(t.contains("0 : 10.244.1.5 . 8080"), "{t}");
        assert!(t.contains("10.244.1.5 . 10.244.1.5"), "{t}");

        let none = nft::build(&[port(&[], Some(30080), None)], &net, slots);
        apply(&nft::diff(&one, &none));
        let t = table();
        assert!(
            t.contains("10.96.0.20 . tcp . 80 : goto reject-chain"),
            "{t}"
        );
        assert!(t.contains("tcp . 30080 : goto reject-chain"), "{t}");
        assert!(!t.contains("chain endpoint-"), "{t}");
        assert!(!t.contains("10.244.1.5"), "{t}");

        apply(&nft::diff(&none, &nft::build(&[], &net, slots)));
        let t = table();
        assert!(!t.contains("10.96.0.20"), "{t}");

        apply(&nft::remove());
        assert_eq!(table(), "");
    });
}
