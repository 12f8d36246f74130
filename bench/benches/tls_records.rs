//! The TLS record path of a link: rustls (ring, TLS 1.3, the link's own configurations) sealing
//! and opening 16 KiB records in memory, without sockets.
//!
//! `cargo bench -p bench --bench tls_records`. On this machine rustls was measured to open
//! records about 3x slower than it seals them, which makes the receiving router the one to
//! optimise; this benchmark keeps that claim checkable.
//!
//! It also measures the router's own record layer (`router::tls::records`, what links use),
//! built from the connection's traffic secrets: sealing a record into the buffer that is
//! sent, and opening records where they arrived, one and 256 KiB at a time.

use std::{
    hint::black_box,
    io::{Read as _, Write as _},
    sync::Arc,
};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use router::{
    pki, tls,
    tls::{records, session},
};
use rustls::{ClientConnection, ServerConnection, pki_types::ServerName};

const RECORD: usize = 16 * 1024;
/// What a link reads at once.
const BATCH: usize = 256 * 1024;

/// The link's server (accepting router) and client (dialing router) configurations, with
/// secret extraction as `extract` says and no session tickets.
fn configs(extract: bool) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
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
    let (mut server_config, mut client_config) =
        ((*server_config).clone(), (*client_config).clone());
    server_config.enable_secret_extraction = extract;
    client_config.enable_secret_extraction = extract;
    // No session tickets: a ticket in flight would take the first record sequence number.
    server_config.send_tls13_tickets = 0;
    (Arc::new(server_config), Arc::new(client_config))
}

/// A client (the dialing router) and server (the accepting router) handshaken by rustls'
/// buffered API, as links were before the router's record layer.
fn pair() -> (ClientConnection, ServerConnection) {
    let (server_config, client_config) = configs(false);
    let name = ServerName::try_from("localhost").expect("name");
    let mut client = ClientConnection::new(client_config, name).expect("client");
    let mut server = ServerConnection::new(server_config).expect("server");
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

/// Seals `plaintext` as records, appending the bytes that go on the wire to `wire`.
fn seal(client: &mut ClientConnection, mut plaintext: &[u8], wire: &mut Vec<u8>) {
    // rustls buffers a limited amount of plaintext: what it takes is sealed before the rest.
    while !plaintext.is_empty() {
        let taken = client.writer().write(plaintext).expect("write");
        plaintext = &plaintext[taken..];
        while client.wants_write() {
            client.write_tls(wire).expect("write_tls");
        }
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

/// The router's own record layer for both ends of a link connection, handshaken by the
/// router's own handshake over an in-memory pipe: the dialing router's sealer and the
/// accepting router's opener.
fn record_layer() -> (records::Sealer, records::Opener) {
    let (server, client) = configs(true);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let (mut east, mut west) = tokio::io::duplex(1 << 16);
        let name = ServerName::try_from("localhost").expect("name");
        let (accepted, dialed) = tokio::join!(
            session::accept(&mut east, server),
            session::connect(&mut west, client, name),
        );
        (
            dialed.expect("connect").sealer,
            accepted.expect("accept").opener,
        )
    })
}

fn records_in_place(c: &mut Criterion) {
    let plaintext = vec![0x5a; RECORD];
    let mut group = c.benchmark_group("tls record 16 KiB, in place");
    group.throughput(Throughput::Bytes(RECORD as u64));

    let (mut sealer, _) = record_layer();
    let mut out = Vec::with_capacity(2 * RECORD);
    group.bench_function("seal in place (send)", |b| {
        b.iter(|| {
            out.clear();
            sealer
                .seal(&[black_box(&plaintext)], &mut out)
                .expect("seal");
            black_box(out.len())
        });
    });

    let (mut sealer, mut opener) = record_layer();
    group.bench_function("open in place (receive)", |b| {
        b.iter_batched(
            || {
                let mut wire = Vec::with_capacity(2 * RECORD);
                sealer.seal(&[&plaintext], &mut wire).expect("seal");
                wire
            },
            |mut wire| {
                let opened = opener.open(&mut wire, 0, 0).expect("open");
                black_box(opened.plain)
            },
            BatchSize::SmallInput,
        );
    });

    // The open above finds its record cold (Criterion makes a batch of inputs first); a
    // router opens records its recv has just written. Sealing and opening one record in the
    // same iteration opens it warm: this minus "seal in place" is a warm open.
    let (mut sealer, mut opener) = record_layer();
    group.bench_function("seal, then open warm", |b| {
        b.iter(|| {
            out.clear();
            sealer
                .seal(&[black_box(&plaintext)], &mut out)
                .expect("seal");
            let opened = opener.open(&mut out, 0, 0).expect("open");
            black_box(opened.plain)
        });
    });
    group.finish();
}

/// What a link's receiving end does per read: 256 KiB of records in, plaintext out. rustls'
/// buffered API takes them through its deframer and copies the plaintext out; the router's
/// record layer opens them where they lie and leaves the plaintext at the buffer's front.
fn batch_receive(c: &mut Criterion) {
    let plaintext = vec![0x5a; BATCH];
    let mut group = c.benchmark_group("tls receive 256 KiB");
    group.throughput(Throughput::Bytes(BATCH as u64));

    let (mut client, mut server) = pair();
    let mut out = vec![0; BATCH];
    group.bench_function("rustls buffered", |b| {
        b.iter_batched(
            || {
                let mut wire = Vec::with_capacity(2 * BATCH);
                seal(&mut client, &plaintext, &mut wire);
                wire
            },
            |wire| {
                let mut rest = wire.as_slice();
                let mut got = 0;
                while got < BATCH {
                    if !rest.is_empty() {
                        server.read_tls(&mut rest).expect("read_tls");
                        server.process_new_packets().expect("open");
                    }
                    match server.reader().read(&mut out[got..]) {
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => panic!("plaintext: {e}"),
                    }
                }
                black_box(out[0])
            },
            BatchSize::SmallInput,
        );
    });

    let (mut sealer, mut opener) = record_layer();
    group.bench_function("skiff in place", |b| {
        b.iter_batched(
            || {
                let mut wire = Vec::with_capacity(2 * BATCH);
                sealer.seal(&[&plaintext], &mut wire).expect("seal");
                wire
            },
            |mut wire| {
                let opened = opener.open(&mut wire, 0, 0).expect("open");
                assert_eq!(opened.plain, BATCH);
                black_box(wire[0])
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, records, records_in_place, batch_receive);
criterion_main!(benches);
