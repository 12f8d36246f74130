//! The inter-router frame codec: what a router pays per frame before any I/O or TLS.
//!
//! `cargo bench -p bench --bench codec`. Data frames carry the payload sizes the router uses
//! (16 KiB, one TLS record; 64 KiB, the largest Data frame a router sends); Window is the most
//! frequent control frame.

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use router::link::frame::{self, Frame};
use std::hint::black_box;

fn data(len: usize) -> Frame {
    Frame::Data {
        stream: 7,
        data: Bytes::from(vec![0xa5; len]),
    }
}

fn encoded(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf);
    buf
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for len in [16 * 1024, 64 * 1024] {
        let frame = data(len);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(format!("encode data {} KiB", len / 1024), |b| {
            let mut buf = BytesMut::with_capacity(len + frame::HEADER_LEN);
            b.iter(|| {
                buf.clear();
                black_box(&frame).encode(&mut buf);
                black_box(buf.len())
            });
        });
        group.bench_function(format!("encode data header only {} KiB", len / 1024), |b| {
            let mut buf = BytesMut::with_capacity(frame::HEADER_LEN);
            b.iter(|| {
                buf.clear();
                frame::encode_data_header(7, black_box(len), &mut buf);
                black_box(buf.len())
            });
        });
        let wire = encoded(&frame);
        group.bench_function(format!("decode data {} KiB", len / 1024), |b| {
            b.iter_batched(
                || wire.clone(),
                |mut src| black_box(frame::decode(&mut src)),
                BatchSize::SmallInput,
            );
        });
    }
    group.throughput(Throughput::Elements(1));
    let window = Frame::Window {
        stream: 7,
        increment: 64 * 1024,
    };
    let wire = encoded(&window);
    group.bench_function("encode + decode window", |b| {
        let mut buf = BytesMut::with_capacity(wire.len());
        b.iter(|| {
            buf.clear();
            black_box(&window).encode(&mut buf);
            black_box(frame::decode(&mut buf))
        });
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
