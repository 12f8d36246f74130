//! Socket redirection on the real kernel: sock_ops and sk_msg attached to a cgroup this test
//! creates, inside a network namespace of its own.

use std::net::SocketAddr;

use kernel_tests::{Capture, Cgroup, Netns, pattern, require_root, socat_transfer};
use router::accel::{Accel, EndpointKind};

const PORT: u16 = 7101;
const PAYLOAD: usize = 4 << 20;

#[test]
fn sockmap_redirects_payload_inside_cgroup_only() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new("redir")?;
    let cgroup = Cgroup::new("redir")?;
    let mut accel = Accel::attach_for(cgroup.path(), None, ns.cookie()?)?;
    // Any local address: the accelerated pair uses 127.0.0.1, the control pair 127.0.0.2.
    // No router here: socat's two ends talk directly, so the kind only decides which end is
    // counted for shortcuts, which this test does not use.
    accel.add_endpoint(
        SocketAddr::from(([0, 0, 0, 0], PORT)),
        EndpointKind::Listener,
    )?;
    let baseline = accel.socks_len()?;

    let capture = Capture::start(&ns, &format!("tcp port {PORT}"))?;
    let data = pattern(PAYLOAD, 0x5eed);
    let (a, c) = ("127.0.0.1", "127.0.0.2");
    let accelerated = socat_transfer(&ns, Some(&cgroup), a, PORT, &format!("{a}:{PORT}"), &data)?;
    let control = socat_transfer(&ns, None, c, PORT, &format!("{c}:{PORT}"), &data)?;
    let packets = capture.stop()?;

    assert!(accelerated == data, "accelerated transfer corrupted");
    assert!(control == data, "control transfer corrupted");

    // A packet belongs to the pair whose server end (ip.PORT) it carries.
    let wire_bytes = |ip: &str| -> u64 {
        let server = format!("{ip}.{PORT}");
        packets
            .iter()
            .filter(|(src, dst, _)| *src == server || *dst == server)
            .map(|(_, _, len)| len)
            .sum()
    };
    let (accelerated_wire, control_wire) = (wire_bytes("127.0.0.1"), wire_bytes("127.0.0.2"));
    let counters = accel.counters()?;
    eprintln!(
        "payload on the wire: accelerated {accelerated_wire} B, control {control_wire} B; {counters:?}"
    );
    assert_eq!(accelerated_wire, 0, "redirected payload crossed loopback");
    // tcpdump may not have read the last segments off its ring when it is stopped, so the
    // control pair (which runs last) is held to "most of it crossed", not every byte. The
    // accelerated pair runs first and gets the exact check above.
    assert!(
        control_wire >= PAYLOAD as u64 / 2,
        "control payload missing from capture"
    );
    assert!(
        counters.socks_inserted >= 2,
        "both ends should enter the sockhash"
    );
    assert!(
        counters.bytes_redirected >= PAYLOAD as u64,
        "counter did not see the payload"
    );
    assert_eq!(
        accel.socks_len()?,
        baseline,
        "closed sockets must leave the sockhash"
    );
    Ok(())
}
