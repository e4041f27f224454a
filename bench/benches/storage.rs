//! The storage group commit: N sends queued together become one synced
//! RocksDB write. Real fsyncs on this machine's disk, in a temp dir.
//! `cargo bench -p pipit-bench --bench storage`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pipit::config::Registration;
use pipit::storage::{Deliveries, DeviceAddr, Op, Store, Writer, WriterConfig};
use pipit_protocol::message::pb;
use pipit_protocol::{Message, PublicKey};
use tokio::sync::oneshot;

struct Nobody;
impl Deliveries for Nobody {
    fn push(&self, _: DeviceAddr, _: u64, _: &Message) {}
}

fn register(w: &Writer, key: u8) -> DeviceAddr {
    let (tx, rx) = oneshot::channel();
    w.submit(Op::Register { key: PublicKey([key; 32]), name: String::new(), invite: Bytes::new(), reply: tx }).unwrap();
    rx.blocking_recv().unwrap().unwrap()
}

fn group_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let cfg = WriterConfig { max_batch: 4_096, ttl_secs: 86_400, registration: Registration::Open, sync: true };
    let (w, _thread) = Writer::start(store, cfg, Arc::new(Nobody), 65_536);
    let a = register(&w, 1);
    let b = register(&w, 2);
    let payload = Bytes::from(vec![0x5A; 100]);
    let mut next_id = 1u64;
    let mut g = c.benchmark_group("group_commit");
    g.measurement_time(Duration::from_secs(5));
    for n in [1usize, 16, 256] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("durable_sends", n), &n, |bench, &n| {
            bench.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // Queue n sends back to back, then wait for the last
                    // "sent": the writer takes them as one batch.
                    let mut replies = Vec::with_capacity(n);
                    let t = Instant::now();
                    for _ in 0..n {
                        let (tx, rx) = oneshot::channel();
                        let send =
                            pb::Send { id: next_id, to: b.account, payload: payload.clone(), ..Default::default() };
                        next_id += 1;
                        w.submit(Op::Send { from: a, send, received: t, reply: tx }).unwrap();
                        replies.push(rx);
                    }
                    for rx in replies {
                        rx.blocking_recv().unwrap().unwrap();
                    }
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
