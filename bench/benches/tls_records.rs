//! The TLS record path of a link: rustls (ring, TLS 1.3, the link's own configurations) sealing
//! and opening 16 KiB records in memory, without sockets.
//!
//! `cargo bench -p bench --bench tls_records`. On this machine rustls was measured to open
//! records about 3x slower than it seals them, which makes the receiving router the one to
//! optimise; this benchmark keeps that claim checkable.
//!
//! It also measures the record layer done in place with the connection's own traffic secrets
//! (as rustls hands them to kTLS-style users): opening a record where it arrived and sealing
//! one where it was built, with ring's AEAD and nothing else. That is the per-record cost the
//! io_uring link path would pay instead of rustls' buffered one.

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
    pair_with(false)
}

/// [`pair`], with secret extraction allowed when `extract` (the link's configurations
/// otherwise).
fn pair_with(extract: bool) -> (ClientConnection, ServerConnection) {
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
    let name = ServerName::try_from("localhost").expect("name");
    let mut client = ClientConnection::new(Arc::new(client_config), name).expect("client");
    let mut server = ServerConnection::new(Arc::new(server_config)).expect("server");
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

/// One direction's record layer, from the secrets rustls extracted: the AEAD key, the IV and
/// the next sequence number.
struct Direction {
    key: ring::aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Direction {
    fn both(client: ClientConnection, server: ServerConnection) -> (Self, Self) {
        let client = client.dangerous_extract_secrets().expect("client secrets");
        let server = server.dangerous_extract_secrets().expect("server secrets");
        (Self::new(client.tx), Self::new(server.rx))
    }

    fn new((seq, secrets): (u64, rustls::ConnectionTrafficSecrets)) -> Self {
        use rustls::ConnectionTrafficSecrets as S;
        let (algorithm, key, iv) = match secrets {
            S::Aes128Gcm { key, iv } => (&ring::aead::AES_128_GCM, key, iv),
            S::Aes256Gcm { key, iv } => (&ring::aead::AES_256_GCM, key, iv),
            S::Chacha20Poly1305 { key, iv } => (&ring::aead::CHACHA20_POLY1305, key, iv),
            _ => panic!("a cipher suite this benchmark does not know"),
        };
        let key = ring::aead::UnboundKey::new(algorithm, key.as_ref()).expect("key");
        Self {
            key: ring::aead::LessSafeKey::new(key),
            iv: iv.as_ref().try_into().expect("a 12-byte IV"),
            seq,
        }
    }

    /// TLS 1.3's per-record nonce: the IV with the sequence number XORed into its tail.
    fn nonce(&mut self) -> ring::aead::Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        ring::aead::Nonce::assume_unique_for_key(nonce)
    }

    /// Seals `record` in place: a 5-byte header, `len` plaintext bytes and the inner content
    /// type, then the tag appended.
    fn seal(&mut self, record: &mut Vec<u8>, len: usize) {
        let body = u16::try_from(len + 1 + 16).expect("a record");
        record.truncate(5 + len);
        record[..5].copy_from_slice(&[23, 3, 3, (body >> 8) as u8, body as u8]);
        record.push(23); // application data
        let header: [u8; 5] = record[..5].try_into().expect("header");
        let nonce = self.nonce();
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(header), &mut record[5..])
            .expect("seal");
        record.extend_from_slice(tag.as_ref());
    }

    /// Opens `record` where it lies; returns the plaintext's length.
    fn open(&mut self, record: &mut [u8]) -> usize {
        let header: [u8; 5] = record[..5].try_into().expect("header");
        let nonce = self.nonce();
        let plain = self
            .key
            .open_in_place(nonce, ring::aead::Aad::from(header), &mut record[5..])
            .expect("open");
        plain.len() - 1 // the inner content type
    }
}

fn records_in_place(c: &mut Criterion) {
    let mut group = c.benchmark_group("tls record 16 KiB, in place");
    group.throughput(Throughput::Bytes(RECORD as u64));

    let (client, server) = pair_with(true);
    let (mut tx, _) = Direction::both(client, server);
    let mut record = vec![0x5a; 5 + RECORD + 1 + 16];
    group.bench_function("seal in place (send)", |b| {
        b.iter(|| {
            tx.seal(&mut record, RECORD);
            black_box(record.len())
        });
    });

    // Records sealed by rustls itself, opened in place with the receiving side's secrets.
    let (mut client, server) = pair_with(true);
    let mut wire = Vec::new();
    seal(&mut client, &vec![0x5a; RECORD], &mut wire);
    let mut check = wire.clone();
    let (mut client_tx, mut rx) = Direction::both(client, server);
    assert_eq!(rx.open(&mut check), RECORD, "rustls' record opens in place");
    group.bench_function("open in place (receive)", |b| {
        b.iter_batched(
            || {
                let mut record = vec![0x5a; 5 + RECORD + 1 + 16];
                client_tx.seal(&mut record, RECORD);
                record
            },
            |mut record| black_box(rx.open(&mut record)),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, records, records_in_place);
criterion_main!(benches);
