//! `compile` at catalogue scale: 100,000 keys on four plans (goal: under 1 s).

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use slotgate::{
    api::{ApiKey, ApiKeySpec, ApiPlan, ApiPlanSpec, BucketScope, ConcurrencySpec, RateLimitSpec},
    config::{TokenHashes, compile, hash_token},
};

fn fixture(n: usize) -> (Vec<ApiPlan>, Vec<ApiKey>, TokenHashes) {
    let plans: Vec<ApiPlan> = [("trial", 1), ("developer", 10), ("startup", 25), ("business", 50)]
        .into_iter()
        .map(|(name, slots)| {
            ApiPlan::new(
                name,
                ApiPlanSpec {
                    display_name: None,
                    concurrency: Some(ConcurrencySpec {
                        max_concurrent_requests: slots,
                        paths: vec!["/v1/monitor/*".into()],
                    }),
                    rate_limit: Some(RateLimitSpec {
                        requests_per_second: 1000,
                        burst: None,
                        per: BucketScope::Endpoint,
                        paths: vec!["/v1/*".into()],
                    }),
                    tasks: None,
                    abuse: None,
                },
            )
        })
        .collect();
    let mut tokens = TokenHashes::default();
    let keys = (0..n)
        .map(|i| {
            let name = format!("key-{i}");
            let mut k = ApiKey::new(
                &name,
                ApiKeySpec {
                    plan: plans[i % 4].metadata.name.clone().unwrap(),
                    ..Default::default()
                },
            );
            k.metadata.namespace = Some(format!("team-{}", i % 100));
            k.metadata.creation_timestamp = Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + i as i64).unwrap(),
            ));
            let ns = k.metadata.namespace.clone().unwrap();
            tokens.insert_hash(
                &ns,
                &format!("{name}-token"),
                "token",
                &hash_token(name.as_bytes()),
            );
            k
        })
        .collect();
    (plans, keys, tokens)
}

fn bench(c: &mut Criterion) {
    let (plans, keys, tokens) = fixture(100_000);
    let previous = compile(&plans, &keys, &tokens, None).config;
    assert_eq!(previous.keys.len(), 100_000);
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    group.bench_function("100k_keys", |b| {
        b.iter(|| compile(&plans, &keys, &tokens, Some(&previous)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
