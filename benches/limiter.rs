//! The per-request limiter decision: key lookup by token digest, rate bucket, slot acquire and
//! release, with 1,000 to 1,000,000 keys loaded. Target: under 100 ns, flat as keys grow.
//!
//! `cargo bench --bench limiter`

use std::{hint::black_box, sync::Arc};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sha2::{Digest, Sha256};
use slotgate::{
    api::BucketScope,
    config::{CompiledKey, CompiledPlan, GatewayConfig, RateLimit, SlotLimit},
    gateway::{
        Metrics,
        table::{KeyTable, admit},
    },
};

// The gateway's allocator (src/main.rs): at a million keys, its huge pages are part of the result.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn digest(i: usize) -> [u8; 32] {
    Sha256::digest(format!("token-{i}")).into()
}

fn table(keys: usize, per: BucketScope) -> KeyTable {
    let mut c = GatewayConfig::empty();
    c.plans.insert(
        "startup".into(),
        CompiledPlan {
            display_name: None,
            concurrency: Some(SlotLimit {
                max: 25,
                paths: vec!["/v1/*".into()],
            }),
            rate_limit: Some(RateLimit {
                // High enough that the bench measures admissions, not refusals.
                per_second: 1_000_000,
                burst: 1_000_000,
                per,
                paths: vec!["/v1/*".into()],
            }),
            retained: false,
            tasks: None,
            abuse: None,
        },
    );
    for i in 0..keys {
        std::sync::Arc::make_mut(&mut c.keys).insert(
            hex::encode(digest(i)),
            CompiledKey::on_plan(format!("default/key-{i}"), "startup"),
        );
    }
    c.hash = c.content_hash();
    KeyTable::build(Arc::new(c), None, &Metrics::new())
}

/// Whether this is a measuring run. `cargo test --all-targets` runs each benchmark once as a
/// smoke test, which skips the big tables.
fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("limiter_decision");
    let sizes: &[usize] = if measuring() {
        &[1_000, 100_000, 1_000_000]
    } else {
        &[1_000]
    };
    for &keys in sizes {
        for (label, per) in [
            ("key_bucket", BucketScope::Key),
            ("endpoint_bucket", BucketScope::Endpoint),
        ] {
            let t = table(keys, per);
            // Requests spread over 4,096 keys drawn across the table, so lookups miss the cache
            // the way real traffic does.
            let probes: Vec<[u8; 32]> = (0..4096)
                .map(|i| digest(i * (keys / 4096).max(1) % keys))
                .collect();
            let mut i = 0usize;
            let mut now = 1_000_000_000u64;
            group.bench_with_input(BenchmarkId::new(label, keys), &keys, |b, _| {
                b.iter(|| {
                    i = (i + 1) & 4095;
                    now += 1_000;
                    let entry = t.get(&probes[i]).expect("key loaded");
                    let admitted = admit(&entry, black_box("/v1/monitor/chatgpt"), now, None, 1);
                    black_box(admitted.is_ok())
                })
            });
        }
    }
    group.finish();
}

/// A flood of unknown keys: the lookup that answers 401 `invalid_api_key`, which a client can
/// make as often as it likes without a valid key.
fn unknown_key(c: &mut Criterion) {
    let mut group = c.benchmark_group("unknown_key_lookup");
    let keys = if measuring() { 1_000_000 } else { 1_000 };
    let t = table(keys, BucketScope::Key);
    let probes: Vec<[u8; 32]> = (0..4096).map(|i| digest(keys + i)).collect();
    let mut i = 0usize;
    group.bench_function(BenchmarkId::from_parameter(keys), |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(t.get(&probes[i]).is_none())
        })
    });
    group.finish();
}

/// The periodic pass that drops idle endpoint buckets visits every key: it runs on a blocking
/// thread because at a million keys it lasts longer than any request should wait.
fn sweep(c: &mut Criterion) {
    let mut group = c.benchmark_group("sweep_every_key");
    group.sample_size(10);
    let keys = if measuring() { 1_000_000 } else { 1_000 };
    let t = table(keys, BucketScope::Endpoint);
    let mut now = 1_000_000_000u64;
    for i in 0..keys {
        let e = t.get(&digest(i)).expect("key loaded");
        let _ = admit(&e, "/v1/monitor/chatgpt", now, None, 1);
    }
    group.bench_function(BenchmarkId::from_parameter(keys), |b| {
        b.iter(|| {
            now += 1_000;
            black_box(t.entries().map(|e| e.state.sweep(now)).sum::<usize>())
        })
    });
    group.finish();
}

criterion_group!(benches, decision, unknown_key, sweep);
criterion_main!(benches);
