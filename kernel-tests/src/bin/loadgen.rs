//! A small load generator and checksum sink for the privileged tests and benchmarks, run as a
//! process inside a test's namespace and cgroup (so the kernel hooks see its sockets).
//!
//! ```text
//! loadgen sink ADDR                      answer each connection with (checksum, bytes) after EOF
//! loadgen send ADDR CONNS BYTES [PAR]    CONNS connections of BYTES each, PAR at a time
//!                                        (default: all at once); verify every answer
//! loadgen push ADDR CONNS BYTES PAR [PAUSE_MS]
//!                                        the same, but close after sending: no answer (each
//!                                        connection starts with its 8-byte seed; with
//!                                        PAUSE_MS, it waits that long after the seed)
//! loadgen push-gated ADDR BYTES AFTER GATE
//!                                        one pushed connection that, after AFTER bytes, prints
//!                                        "at the gate" on stderr and sends nothing more until
//!                                        file GATE exists (a sender paused between writes)
//! loadgen verify ADDR CONNS BYTES [STALL_MS]
//!                                        accept CONNS pushed connections, check each against
//!                                        its seed, print the tally, exit non-zero on a mismatch;
//!                                        with STALL_MS, read nothing past the seed for that long
//!                                        (a reader that falls behind)
//! loadgen connects ADDR N                time N connect() calls; print p50/p99/mean in µs
//! loadgen echo ADDR                      echo every byte back on every connection
//! loadgen rounds ADDR CONNS ROUNDS MAXLEN
//!                                        CONNS connections at once against an echo server,
//!                                        ROUNDS rounds each: send 1-3 messages of 1-MAXLEN
//!                                        pseudo-random bytes, read the echo, compare
//! loadgen connrate ADDR SECONDS PAR      for SECONDS, PAR at a time: connect, one byte there
//!                                        and back, close; print connections per second
//! loadgen hold ADDR N                    open N connections, one byte there and back on each,
//!                                        print "ready" on stderr, then hold them until killed
//! loadgen discard ADDR                   read every connection to EOF, answer with the byte
//!                                        count (8 bytes, big-endian), close
//! loadgen flood ADDR CONNS SECONDS       CONNS connections against a discard server, each
//!                                        sending as fast as it can for SECONDS, then half-
//!                                        closing; print the bytes the server counted per second
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
    // Thousands of connections at once, as the router holds them: the same limit it takes.
    kernel_tests::raise_open_files().context("failed to raise the limit on open files")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["sink", addr] => sink(addr),
        ["send", addr, conns, bytes, rest @ ..] if rest.len() <= 1 => {
            let conns = conns.parse()?;
            let parallel = rest.first().map_or(Ok(conns), |p| p.parse())?;
            send(addr, conns, bytes.parse()?, parallel, None)
        }
        ["push", addr, conns, bytes, parallel, rest @ ..] if rest.len() <= 1 => {
            let pause_ms = rest.first().map_or(Ok(0), |ms| ms.parse())?;
            let pause = Duration::from_millis(pause_ms);
            send(
                addr,
                conns.parse()?,
                bytes.parse()?,
                parallel.parse()?,
                Some(pause),
            )
        }
        ["push-gated", addr, bytes, after, gate] => {
            let gate = Gate {
                after: after.parse()?,
                file: std::path::PathBuf::from(gate),
            };
            one(addr, bytes.parse()?, 1, Some(Duration::ZERO), Some(&gate))
        }
        ["connects", addr, n] => connects(addr, n.parse()?),
        ["verify", addr, conns, bytes] => {
            verify(addr, conns.parse()?, bytes.parse()?, Duration::ZERO)
        }
        ["verify", addr, conns, bytes, stall_ms] => verify(
            addr,
            conns.parse()?,
            bytes.parse()?,
            Duration::from_millis(stall_ms.parse()?),
        ),
        ["echo", addr] => runtime()?.block_on(echo(addr)),
        ["rounds", addr, conns, rounds, max_len] => {
            rounds_against_echo(addr, conns.parse()?, rounds.parse()?, max_len.parse()?)
        }
        ["connrate", addr, seconds, par] => {
            runtime()?.block_on(connrate(addr, seconds.parse()?, par.parse()?))
        }
        ["hold", addr, n] => runtime()?.block_on(hold(addr, n.parse()?)),
        ["discard", addr] => runtime()?.block_on(discard(addr)),
        ["flood", addr, conns, seconds] => {
            runtime()?.block_on(flood(addr, conns.parse()?, seconds.parse()?))
        }
        _ => bail!(
            "usage: loadgen sink ADDR | loadgen send ADDR CONNS BYTES [PARALLEL] | loadgen push ADDR CONNS BYTES PARALLEL [PAUSE_MS] | loadgen push-gated ADDR BYTES AFTER GATE | loadgen connects ADDR N | loadgen verify ADDR CONNS BYTES [STALL_MS] | loadgen echo ADDR | loadgen rounds ADDR CONNS ROUNDS MAXLEN | loadgen connrate ADDR SECONDS PARALLEL | loadgen hold ADDR N | loadgen discard ADDR | loadgen flood ADDR CONNS SECONDS"
        ),
    }
}

fn sink(addr: &str) -> anyhow::Result<()> {
    let listener = listen(addr).with_context(|| format!("failed to bind {addr}"))?;
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(conn) => conn,
            // Out of descriptors, say: the connection waits in the queue until some close.
            Err(e) => {
                eprintln!("loadgen sink: accept failed: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        thread::spawn(move || {
            if let Ok(sum) = checksum_to_eof(&mut conn) {
                let _ = conn.write_all(&sum);
            }
        });
    }
    Ok(())
}

/// A listener with a deep accept queue. std's default backlog (128) overflows under the
/// tests' bursts of connections; a dropped handshake ACK then leaves the connection half-open
/// at the server until the client gives up and resets it.
fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let addr: std::net::SocketAddr = addr.parse()?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(4096)?)
}

/// [`bind`], for blocking accepts.
fn listen(addr: &str) -> anyhow::Result<TcpListener> {
    let listener =
        runtime()?.block_on(async { bind(addr)?.into_std().map_err(anyhow::Error::from) })?;
    listener.set_nonblocking(false)?;
    Ok(listener)
}

/// `push`: `None` to half-close and check each connection's answer (send), or how long to wait
/// after the seed of a connection that expects none (push).
fn send(
    addr: &str,
    conns: usize,
    bytes: u64,
    parallel: usize,
    push: Option<Duration>,
) -> anyhow::Result<()> {
    let parallel = parallel.clamp(1, conns.max(1));
    let workers: Vec<_> = (0..parallel)
        .map(|w| {
            let addr = addr.to_owned();
            thread::spawn(move || {
                // Worker w runs connections w, w + parallel, w + 2 * parallel, ...
                (w..conns)
                    .step_by(parallel)
                    .filter_map(|i| {
                        one(&addr, bytes, i as u64 + 1, push, None)
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

/// Reads `conn` to end-of-stream and returns the checksum of what it read.
fn checksum_to_eof(conn: &mut TcpStream) -> std::io::Result<[u8; 16]> {
    let mut sum = Checksum::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match read_waiting(conn, &mut buf)? {
            0 => return Ok(sum.finish_bytes()),
            n => sum.update(&buf[..n]),
        }
    }
}

/// Blocking reads that came back with EAGAIN although no timeout had passed.
static EMPTY_WAKEUPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A blocking read that waits again when the kernel wakes it without data. A socket in a
/// sockhash can answer a blocking read with EAGAIN (tcp_bpf_recvmsg, kernel 6.18, when the wait
/// ends with nothing in the redirected queue); a poll-based reader would simply wait again.
/// Counted in [`EMPTY_WAKEUPS`] so that it shows; a real timeout (30 s) still fails.
fn read_waiting(conn: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    let since = std::time::Instant::now();
    loop {
        match conn.read(buf) {
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && since.elapsed() < Duration::from_secs(25) =>
            {
                EMPTY_WAKEUPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            other => return other,
        }
    }
}

/// [`read_waiting`] until `buf` is full.
fn read_exact_waiting(conn: &mut TcpStream, mut buf: &mut [u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match read_waiting(conn, buf)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => buf = &mut buf[n..],
        }
    }
    Ok(())
}

/// What `push` sends on the connection with `seed`, as the receiver must see it.
fn expected(seed: u64, bytes: u64) -> [u8; 16] {
    let mut sum = Checksum::default();
    let mut block = vec![0u8; 64 * 1024];
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(block.len() as u64)).unwrap_or(block.len());
        kernel_tests::fill(&mut block[..n], &mut state);
        sum.update(&block[..n]);
        left -= n as u64;
    }
    sum.finish_bytes()
}

fn verify(addr: &str, conns: usize, bytes: u64, stall: Duration) -> anyhow::Result<()> {
    let listener = listen(addr).with_context(|| format!("failed to bind {addr}"))?;
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
    for conn in listener.incoming().take(conns) {
        let mut conn = conn?;
        let tx = tx.clone();
        thread::spawn(move || {
            let outcome = (|| -> Result<(), String> {
                let mut seed = [0u8; 8];
                read_exact_waiting(&mut conn, &mut seed).map_err(|e| format!("no seed: {e}"))?;
                let seed = u64::from_le_bytes(seed);
                thread::sleep(stall);
                let sum = checksum_to_eof(&mut conn).map_err(|e| format!("seed {seed}: {e}"))?;
                if sum == expected(seed, bytes) {
                    Ok(())
                } else {
                    Err(format!("seed {seed}: checksum or length mismatch"))
                }
            })();
            let _ = tx.send(outcome);
        });
    }
    drop(tx);
    let results: Vec<Result<(), String>> = rx.iter().collect();
    let bad: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    println!(
        "{{\"connections\": {}, \"ok\": {}, \"bad\": {}, \"emptyWakeups\": {}}}",
        results.len(),
        results.len() - bad.len(),
        bad.len(),
        EMPTY_WAKEUPS.load(std::sync::atomic::Ordering::Relaxed)
    );
    ensure!(
        results.len() == conns,
        "only {} of {conns} connections ended",
        results.len()
    );
    ensure!(
        bad.is_empty(),
        "{}",
        bad.iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    );
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

/// One connection of `bytes` pseudo-random bytes made from `seed`. Pushed (`Some(pause)`): it
/// starts with the seed (the receiver checks) and waits `pause` after it. Otherwise it
/// half-closes and checks the receiver's checksum.
/// A point in a pushed stream where the sender waits for a file to appear.
struct Gate {
    after: u64,
    file: std::path::PathBuf,
}

impl Gate {
    /// Says so on stderr, then waits (polling every 10 ms) until the gate's file exists.
    fn wait(&self) {
        eprintln!("at the gate after {} bytes", self.after);
        while !self.file.exists() {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

fn one(
    addr: &str,
    bytes: u64,
    seed: u64,
    push: Option<Duration>,
    gate: Option<&Gate>,
) -> anyhow::Result<()> {
    let mut conn = connect(addr)?;
    let mut sum = Checksum::default();
    let mut block = vec![0u8; 64 * 1024];
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut sent = 0u64;
    if let Some(gate) = gate {
        // The stream's pattern is made in whole blocks; the gate must fall between two.
        ensure!(
            gate.after % block.len() as u64 == 0,
            "the gate must fall on a multiple of {} bytes",
            block.len()
        );
    }
    if let Some(pause) = push {
        // Without an answer the receiver checks the bytes itself: tell it how they were made.
        conn.write_all(&seed.to_le_bytes())?;
        thread::sleep(pause);
    }
    while sent < bytes {
        let n = usize::try_from((bytes - sent).min(block.len() as u64))?;
        if let Some(gate) = gate.filter(|g| g.after == sent) {
            gate.wait();
        }
        kernel_tests::fill(&mut block[..n], &mut state);
        sum.update(&block[..n]);
        conn.write_all(&block[..n])?;
        sent += n as u64;
    }
    if push.is_some() {
        return Ok(());
    }
    conn.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 16];
    conn.read_exact(&mut reply)
        .context("no answer after half-close")?;
    ensure!(reply == sum.finish_bytes(), "checksum or length mismatch");
    Ok(())
}

/// Request and response traffic, checked byte for byte: every round sends one to three
/// messages of pseudo-random length and content, then reads back exactly what it sent.
fn rounds_against_echo(
    addr: &str,
    conns: usize,
    rounds: usize,
    max_len: usize,
) -> anyhow::Result<()> {
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            let addr = addr.to_owned();
            thread::spawn(move || echo_rounds(&addr, i as u64 + 1, rounds, max_len))
        })
        .collect();
    let (mut bytes, mut failed) = (0u64, Vec::new());
    for (i, worker) in workers.into_iter().enumerate() {
        match worker.join() {
            Ok(Ok(b)) => bytes += b,
            Ok(Err(e)) => failed.push(format!("connection {i}: {e:#}")),
            Err(_) => failed.push(format!("connection {i}: panicked")),
        }
    }
    println!(
        "{{\"connections\": {conns}, \"rounds\": {rounds}, \"bytes\": {bytes}, \"emptyWakeups\": {}, \"failed\": {}}}",
        EMPTY_WAKEUPS.load(std::sync::atomic::Ordering::Relaxed),
        failed.len()
    );
    ensure!(failed.is_empty(), "{}", failed.join("; "));
    Ok(())
}

/// One connection of [`rounds_against_echo`]: returns the bytes sent.
fn echo_rounds(addr: &str, seed: u64, rounds: usize, max_len: usize) -> anyhow::Result<u64> {
    let mut conn = connect(addr)?;
    conn.set_nodelay(true)?;
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move |below: usize| {
        let mut word = [0u8; 8];
        kernel_tests::fill(&mut word, &mut state);
        usize::try_from(u64::from_le_bytes(word) % below as u64).unwrap_or(0)
    };
    let mut sent = Vec::new();
    let mut back = vec![0u8; 3 * max_len];
    let mut total = 0u64;
    for round in 0..rounds {
        sent.clear();
        for _ in 0..=next(3) {
            let start = sent.len();
            sent.resize(start + 1 + next(max_len), 0);
            kernel_tests::fill(&mut sent[start..], &mut state);
            conn.write_all(&sent[start..])?;
        }
        read_exact_waiting(&mut conn, &mut back[..sent.len()])
            .with_context(|| format!("round {round}: echo of {} bytes", sent.len()))?;
        if let Some(at) = (0..sent.len()).find(|&i| back[i] != sent[i]) {
            bail!("round {round}: echo differs at byte {at} of {}", sent.len());
        }
        total += sent.len() as u64;
    }
    Ok(total)
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

/// The connection-heavy modes run on one thread with an event loop: a thread per connection
/// would make the baseline (direct loopback) measure thread creation, not connections.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn echo(addr: &str) -> anyhow::Result<()> {
    let listener = bind(addr).with_context(|| format!("failed to bind {addr}"))?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut rd, mut wr) = conn.split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
        });
    }
}

/// One byte there and back on `conn`: proves the whole path to the backend is established.
async fn ping(conn: &mut tokio::net::TcpStream) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    conn.write_all(b"x").await?;
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte).await.context("no echo")?;
    Ok(())
}

async fn connrate(addr: &str, seconds: f64, parallel: usize) -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = addr.parse()?;
    let start = tokio::time::Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    let workers: Vec<_> = (0..parallel.max(1))
        .map(|_| {
            tokio::spawn(async move {
                let (mut done, mut failed) = (0u64, 0u64);
                while tokio::time::Instant::now() < until {
                    let attempt = async {
                        let mut conn = tokio::net::TcpStream::connect(addr).await?;
                        ping(&mut conn).await
                    };
                    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                        Ok(Ok(())) => done += 1,
                        _ => failed += 1,
                    }
                }
                (done, failed)
            })
        })
        .collect();
    let (mut done, mut failed) = (0u64, 0u64);
    for w in workers {
        let (d, f) = w.await?;
        done += d;
        failed += f;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{{\"connections\": {done}, \"failed\": {failed}, \"per_second\": {:.1}}}",
        done as f64 / elapsed
    );
    ensure!(done > 0, "no connection completed ({failed} failed)");
    Ok(())
}

async fn hold(addr: &str, n: usize) -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = addr.parse()?;
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let mut conn = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connection {i}"))?;
        ping(&mut conn)
            .await
            .with_context(|| format!("connection {i}"))?;
        held.push(conn);
    }
    eprintln!("ready: holding {n} connections");
    std::future::pending::<()>().await;
    Ok(())
}

async fn discard(addr: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = bind(addr).with_context(|| format!("failed to bind {addr}"))?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(_) => return,
                }
            }
            let _ = conn.write_all(&total.to_be_bytes()).await;
        });
    }
}

/// What each flood sender may queue (`SO_SNDBUF`).
const SENDER_QUEUE: u32 = 256 * 1024;

/// `conns` connections sending at once for `seconds`: the aggregate rate the discard server
/// counted, over the time from the first connect to the last answer (so bytes still queued
/// when the clock stops are counted with the time they took to arrive).
async fn flood(addr: &str, conns: usize, seconds: f64) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr: std::net::SocketAddr = addr.parse()?;
    let start = tokio::time::Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    let block = std::sync::Arc::new(vec![0x5au8; 64 * 1024]);
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let block = std::sync::Arc::clone(&block);
            tokio::spawn(async move {
                // A client on its own host queues in its own memory. Here the senders share
                // TCP's memory with the routers under test: each keeps at most 256 KiB queued
                // (the kernel counts twice that), so a thousand of them stay below tcp_mem's
                // pressure mark by themselves instead of deciding when it is crossed.
                let socket = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                socket.set_send_buffer_size(SENDER_QUEUE)?;
                let mut conn = socket.connect(addr).await?;
                while tokio::time::Instant::now() < until {
                    conn.write_all(&block).await?;
                }
                conn.shutdown().await?;
                let mut count = [0u8; 8];
                conn.read_exact(&mut count).await?;
                anyhow::Ok(u64::from_be_bytes(count))
            })
        })
        .collect();
    let (mut bytes, mut failed) = (0u64, 0usize);
    for task in tasks {
        match task.await? {
            Ok(n) => bytes += n,
            Err(_) => failed += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{{\"connections\": {conns}, \"failed\": {failed}, \"bytes\": {bytes}, \"seconds\": {elapsed:.3}, \"gbps\": {:.3}}}",
        bytes as f64 * 8.0 / elapsed / 1e9
    );
    ensure!(failed == 0, "{failed} of {conns} connections failed");
    Ok(())
}
