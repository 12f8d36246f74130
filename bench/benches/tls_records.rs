//! The TLS record path of a link: rustls (ring, TLS 1.3, the link's own configurations) sealing
//! and opening 16 KiB records in memory, without sockets.
//!
//! `cargo bench -p bench --bench tls_records`. On this machine rustls was measured to open
//! records about 3x slower than it seals them, which makes the receiving router the one to
//! optimise; this benchmark keeps that claim checkable.

use std::{
    hint::black_box,
    io::{Read as _, Write as _},
    sync::Arc,
};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use router::{pki, tls};
use rustls::{ClientConnection, ServerConnection, pki_types::ServerName};

const RECORD: usize = 16 * 1024;

/// A handshaken client (the dialing router) and server (the accepting router).
fn pair() -> (ClientConnection, ServerConnection) {
    let ca = pki::new_ca("bench").expect("CA");
    let identity = pki::issue(
        &ca,
        "router",
        &["localhost".to_owned()],
        pki::Usage::ServerAndClient,
    )
    .expect("identity");
    let credential = pki::issue(&ca, "peer", &[], pki::Usage::Client).expect("credential");
    let server_config = tls::server_config(
        tls::RotatingCert::new(&identity).expect("identity"),
        &ca.cert_pem,
    )
    .expect("server config");
    let client_config = tls::link_client_config(&ca.cert_pem, &credential).expect("client config");
    let name = ServerName::try_from("localhost").expect("name");
    let mut client = ClientConnection::new(Arc::clone(&client_config), name).expect("client");
    let mut server = ServerConnection::new(Arc::clone(&server_config)).expect("server");
    let mut wire = Vec::new();
    while client.is_handshaking() || server.is_handshaking() {
        wire.clear();
        client.write_tls(&mut wire).expect("client tls");
        server.read_tls(&mut wire.as_slice()).expect("server read");
        server.process_new_packets().expect("server handshake");
        wire.clear();
        server.write_tls(&mut wire).expect("server tls");
        client.read_tls(&mut wire.as_slice()).expect("client read");
        client.process_new_packets().expect("client handshake");
    }
    (client, server)
}

/// Seals one record of `plaintext`, returning the bytes that go on the wire.
fn seal(client: &mut ClientConnection, plaintext: &[u8], wire: &mut Vec<u8>) {
    client.writer().write_all(plaintext).expect("write");
    while client.wants_write() {
        client.write_tls(wire).expect("write_tls");
    }
}

fn records(c: &mut Criterion) {
    let plaintext = vec![0x5a; RECORD];
    let mut group = c.benchmark_group("tls record 16 KiB");
    group.throughput(Throughput::Bytes(RECORD as u64));

    let (mut client, _server) = pair();
    let mut wire = Vec::with_capacity(2 * RECORD);
    group.bench_function("seal (send)", |b| {
        b.iter(|| {
            wire.clear();
            seal(&mut client, black_box(&plaintext), &mut wire);
            black_box(wire.len())
        });
    });

    let (mut client, mut server) = pair();
    let mut out = vec![0; RECORD];
    group.bench_function("open (receive)", |b| {
        b.iter_batched(
            || {
                let mut wire = Vec::with_capacity(2 * RECORD);
                seal(&mut client, &plaintext, &mut wire);
                wire
            },
            |wire| {
                // read_tls takes at most one buffer's worth per call.
                let mut rest = wire.as_slice();
                while !rest.is_empty() {
                    server.read_tls(&mut rest).expect("read_tls");
                    server.process_new_packets().expect("open");
                }
                server.reader().read_exact(&mut out).expect("plaintext");
                black_box(out[0])
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, records);
criterion_main!(benches);
