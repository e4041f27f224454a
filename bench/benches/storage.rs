//! The storage group commit: N sends queued together become one synced
//! RocksDB write. Real fsyncs on this machine's disk, in a temp dir.
//! `cargo bench -p pipit-bench --bench storage`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pipit::commit::EngineConfig;
use pipit::config::Registration;
use pipit::model::DeviceAddr;
use pipit::route::{Deliveries, Registry};
use pipit::service::{self, KeyRules, Live, Rules};
use pipit::store::Store;
use pipit_protocol::message::pb;
use pipit_protocol::{Message, PublicKey};

struct Nobody;
impl Deliveries for Nobody {
    fn push(&self, _: DeviceAddr, _: u64, _: Message) {}
}

fn group_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let keys = KeyRules { low_water: 16, fetch_burst: 2_048, fetch_per_minute: 600 };
    let rules =
        Rules { ttl_secs: 86_400, registration: Registration::Open, max_group_members: 1_024, keys, cluster: None };
    let engine = EngineConfig {
        max_batch: 4_096,
        capacity: 65_536,
        sync: true,
        reserve_bytes: 0,
        full_wait: std::time::Duration::from_secs(30),
    };
    let live = Live {
        registry: Arc::new(Registry::default()),
        presence: Default::default(),
        typing: Default::default(),
        push: Default::default(),
        shutdown: Default::default(),
    };
    let (services, writer) = service::start(store, rules, Arc::new(Nobody), engine, live).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let register =
        |key: u8| rt.block_on(services.accounts.register(PublicKey([key; 32]), String::new(), Bytes::new())).unwrap();
    let a = register(1);
    let b = register(2);
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
                        let send =
                            pb::Send { id: next_id, to: b.account, payload: payload.clone(), ..Default::default() };
                        next_id += 1;
                        replies.push(services.messaging.send(a, send).unwrap());
                    }
                    for r in replies {
                        rt.block_on(r).unwrap();
                    }
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();
    // Close the database before its directory goes.
    drop(services);
    writer.join().unwrap();
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
