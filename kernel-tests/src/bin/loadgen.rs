//! A small load generator and checksum sink for the privileged tests and benchmarks, run as a
//! process inside a test's namespace and cgroup (so the kernel hooks see its sockets).
//!
//! ```text
//! loadgen sink ADDR                      answer each connection with (checksum, bytes) after EOF
//! loadgen send ADDR CONNS BYTES [PAR]    CONNS connections of BYTES each, PAR at a time
//!                                        (default: all at once); verify every answer
//! loadgen push ADDR CONNS BYTES [PAR]    the same, but close after sending: no answer
//! loadgen connects ADDR N                time N connect() calls; print p50/p99/mean in µs
//! ```

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use kernel_tests::Checksum;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["sink", addr] => sink(addr),
        ["send", addr, conns, bytes] => {
            send(addr, conns.parse()?, bytes.parse()?, conns.parse()?, true)
        }
        ["send", addr, conns, bytes, par] => {
            send(addr, conns.parse()?, bytes.parse()?, par.parse()?, true)
        }
        ["push", addr, conns, bytes, par] => {
            send(addr, conns.parse()?, bytes.parse()?, par.parse()?, false)
        }
        ["connects", addr, n] => connects(addr, n.parse()?),
        _ => bail!(
            "usage: loadgen sink ADDR | loadgen send|push ADDR CONNS BYTES [PARALLEL] | loadgen connects ADDR N"
        ),
    }
}

fn sink(addr: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("failed to bind {addr}"))?;
    for conn in listener.incoming() {
        let mut conn = conn?;
        thread::spawn(move || {
            let mut sum = Checksum::default();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => sum.update(&buf[..n]),
                    Err(_) => return,
                }
            }
            let _ = conn.write_all(&sum.finish_bytes());
        });
    }
    Ok(())
}

fn send(addr: &str, conns: usize, bytes: u64, parallel: usize, answer: bool) -> anyhow::Result<()> {
    let parallel = parallel.clamp(1, conns.max(1));
    let workers: Vec<_> = (0..parallel)
        .map(|w| {
            let addr = addr.to_owned();
            thread::spawn(move || {
                // Worker w runs connections w, w + parallel, w + 2 * parallel, ...
                (w..conns)
                    .step_by(parallel)
                    .filter_map(|i| {
                        one(&addr, bytes, i as u64 + 1, answer)
                            .err()
                            .map(|e| format!("connection {i}: {e:#}"))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut failed = Vec::new();
    for worker in workers {
        match worker.join() {
            Ok(errors) => failed.extend(errors),
            Err(_) => failed.push("a worker panicked".to_owned()),
        }
    }
    println!("{{\"connections\": {conns}, \"failed\": {}}}", failed.len());
    ensure!(failed.is_empty(), "{}", failed.join("; "));
    Ok(())
}

fn connects(addr: &str, n: usize) -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = addr.parse()?;
    let mut micros = Vec::with_capacity(n);
    for _ in 0..n {
        let start = std::time::Instant::now();
        match TcpStream::connect(addr) {
            Ok(conn) => drop(conn),
            // The handshake completed and the server already reset the connection: the connect
            // itself succeeded, which is what is timed.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => return Err(e.into()),
        }
        micros.push(start.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() as f64 - 1.0) * q) as usize];
    let mean = micros.iter().sum::<f64>() / micros.len().max(1) as f64;
    println!(
        "{{\"n\": {n}, \"p50_us\": {:.2}, \"p99_us\": {:.2}, \"mean_us\": {mean:.2}}}",
        at(0.5),
        at(0.99)
    );
    Ok(())
}

fn one(addr: &str, bytes: u64, seed: u64, answer: bool) -> anyhow::Result<()> {
    let mut conn = connect(addr)?;
    let mut sum = Checksum::default();
    let mut block = vec![0u8; 64 * 1024];
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut sent = 0u64;
    while sent < bytes {
        let n = usize::try_from((bytes - sent).min(block.len() as u64))?;
        kernel_tests::fill(&mut block[..n], &mut state);
        sum.update(&block[..n]);
        conn.write_all(&block[..n])?;
        sent += n as u64;
    }
    if !answer {
        return Ok(());
    }
    conn.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 16];
    conn.read_exact(&mut reply)
        .context("no answer after half-close")?;
    ensure!(reply == sum.finish_bytes(), "checksum or length mismatch");
    Ok(())
}

fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let mut last = None;
    for _ in 0..50 {
        match TcpStream::connect(addr) {
            Ok(conn) => {
                conn.set_read_timeout(Some(Duration::from_secs(30)))?;
                return Ok(conn);
            }
            Err(e) => last = Some(e),
        }
        thread::sleep(Duration::from_millis(100));
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no attempt"), anyhow::Error::from))
        .with_context(|| format!("failed to connect to {addr}"))
}
