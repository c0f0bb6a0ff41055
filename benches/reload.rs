//! What a gateway does with one published change at 100,000 keys: assemble the configuration
//! from the index and the shards that changed, then build its key table from the last one.
//! A key added or rotated and a plan upgrade, against a cold start (every shard read and every
//! entry built). The controller side of the same changes is `benches/compile.rs`.

use std::{collections::BTreeMap, sync::Arc};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use sha2::{Digest, Sha256};
use slotgate::{
    config::{
        CompiledKey, CompiledPlan, GatewayConfig, SlotLimit,
        pieces::{self, Assembled, Assembly},
    },
    gateway::{KeyTable, Metrics},
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn plan(slots: u32) -> CompiledPlan {
    CompiledPlan {
        display_name: None,
        concurrency: Some(SlotLimit {
            max: slots,
            paths: vec!["/v1/*".into()],
        }),
        rate_limit: None,
        retained: false,
        tasks: None,
        abuse: None,
    }
}

fn config(keys: usize) -> GatewayConfig {
    let mut c = GatewayConfig::empty();
    for (name, slots) in [("trial", 1), ("developer", 10), ("startup", 25), ("business", 50)] {
        c.plans.insert(name.into(), plan(slots));
    }
    let names: Vec<String> = c.plans.keys().cloned().collect();
    for i in 0..keys {
        Arc::make_mut(&mut c.keys).insert(
            hex::encode(Sha256::digest(format!("token-{i}"))),
            CompiledKey::on_plan(format!("team-{}/key-{i}", i % 100), names[i % 4].clone()),
        );
    }
    c.version = 1;
    c.hash = c.content_hash();
    c
}

/// The objects a controller publishes for `c`, by name.
fn published(c: &GatewayConfig) -> (String, BTreeMap<String, String>) {
    let pieces = pieces::split(c, "cfg");
    let mut map: BTreeMap<String, String> =
        pieces.into_iter().map(|p| (p.name, p.data.to_string())).collect();
    let index = map.remove("cfg").expect("the index is published");
    (index, map)
}

fn assemble(index: &str, shards: &BTreeMap<String, String>, last: Option<&Assembled>) -> Assembly {
    pieces::assemble_from(index, |n| shards.get(n).map(String::as_str), last).expect("assembles")
}

fn bench(c: &mut Criterion) {
    let n = if measuring() { 100_000 } else { 1_000 };
    let metrics = Metrics::new();
    let before = config(n);
    let (index, shards) = published(&before);
    let first = assemble(&index, &shards, None);
    let table = KeyTable::build(Arc::new(first.config), None, &metrics);
    let last = first.next;

    let mut added = before.clone();
    Arc::make_mut(&mut added.keys).insert(
        hex::encode(Sha256::digest("token-new")),
        CompiledKey::on_plan("team-0/key-new", "startup"),
    );
    added.version = 2;
    added.hash = added.content_hash();
    let (added_index, added_shards) = published(&added);

    let mut upgraded = before.clone();
    upgraded.plans.insert("startup".into(), plan(30));
    upgraded.version = 2;
    upgraded.hash = upgraded.content_hash();
    let (upgraded_index, upgraded_shards) = published(&upgraded);

    let mut group = c.benchmark_group(format!("reload_{n}_keys"));
    group.sample_size(20);
    group.bench_function("cold_start", |b| {
        b.iter_batched(
            || (),
            |()| {
                let a = assemble(&index, &shards, None);
                KeyTable::build(Arc::new(a.config), None, &metrics)
            },
            BatchSize::PerIteration,
        )
    });
    for (name, index, shards) in [
        ("key_added", &added_index, &added_shards),
        ("plan_upgraded", &upgraded_index, &upgraded_shards),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || (),
                |()| {
                    let a = assemble(index, shards, Some(&last));
                    // Both tables are dropped outside the measurement's hot loop by
                    // `PerIteration`, but the old one's parts are shared, as on a gateway.
                    KeyTable::build_from(Arc::new(a.config), Some(&table), a.delta.as_ref(), &metrics)
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
