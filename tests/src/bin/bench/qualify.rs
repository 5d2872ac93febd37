//! Qualification against the peer dataset (`../shared/bench/peer-promotions/`): the same
//! promotion sets (100, 1,000 and 10,000 automatic promotions plus the code `WELCOME10`) and
//! the same 20-line cart, loaded as campaigns (customer groups become static segments), then
//! `Qualify` measured with one call in flight (the peer's conditions) and with 4 clients.
//! The peer's published figures are printed beside ours, with how many promotions apply on
//! each side as a correctness cross-check; then the raw cost of one CEL evaluation.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_proto::catalog::v1 as cpb;
use tessera_proto::catalog::v1::effect::Kind;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_runtime::grpc::Channel;
use tessera_tests::{TENANT, TestSuite};

type Client = EligibilityServiceClient<Channel>;

/// The peer's figures (README of the dataset): N, p50 ms, p99 ms, calls/s, RSS, applying.
const PEER: [(usize, &str, &str, &str, &str, usize); 3] = [
    (100, "34", "56", "28", "160 MB", 4),
    (1_000, "68-78", "99-109", "12-14", "255 MB", 35),
    (10_000, "480", "561", "2.1", "260 MB", 353),
];

fn dataset() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench/peer-promotions")
}

fn read(name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dataset().join(name)).ok()?;
    serde_json::from_str(&text).ok()
}

fn cents(v: &Value) -> i64 {
    (v.as_f64().unwrap_or_default() * 100.0).round() as i64
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `{attribute, values}` rules → (segments, skus, categories).
fn rules(v: &Value) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut groups, mut skus, mut categories) = (vec![], vec![], vec![]);
    for rule in v.as_array().into_iter().flatten() {
        let values = strings(&rule["values"]);
        match rule["attribute"].as_str() {
            Some("customer.groups.id") => groups.extend(values),
            Some("items.variant_sku") => skus.extend(values),
            Some("items.product.categories.id") => categories.extend(values),
            _ => {}
        }
    }
    (groups, skus, categories)
}

/// One peer promotion as a campaign.
fn campaign(p: &Value) -> pb::Campaign {
    let method = &p["application_method"];
    let (segments, _, _) = rules(&p["rules"]);
    let (_, skus, categories) = rules(&method["target_rules"]);
    let target = cpb::Selector {
        skus,
        categories,
        ..Default::default()
    };
    let max_quantity = method["max_quantity"].as_i64().unwrap_or(0);
    let each = method["allocation"] == "each";
    let kind = match (p["type"].as_str(), method["type"].as_str()) {
        (Some("buyget"), _) => {
            let (_, buy_skus, buy_categories) = rules(&method["buy_rules"]);
            Kind::BuyXGetY(cpb::BuyXGetY {
                buy: Some(cpb::Selector {
                    skus: buy_skus,
                    categories: buy_categories,
                    ..Default::default()
                }),
                buy_quantity: method["buy_rules_min_quantity"].as_i64().unwrap_or(1),
                get: Some(target),
                get_quantity: method["apply_to_quantity"].as_i64().unwrap_or(1),
                percent_bp: (method["value"].as_f64().unwrap_or(0.0) * 100.0) as u32,
                max_quantity,
                ..Default::default()
            })
        }
        (_, Some("percentage")) => Kind::PercentOff(cpb::PercentOff {
            percent_bp: (method["value"].as_f64().unwrap_or(0.0) * 100.0) as u32,
            selector: Some(target),
            max_quantity,
            ..Default::default()
        }),
        _ => Kind::AmountOff(cpb::AmountOff {
            amount: cents(&method["value"]),
            selector: Some(target),
            allocation: if each {
                cpb::Allocation::Each
            } else {
                cpb::Allocation::Across
            }
            .into(),
            max_quantity,
            ..Default::default()
        }),
    };
    let code = p["code"].as_str().unwrap_or_default().to_string();
    let automatic = p["is_automatic"].as_bool().unwrap_or(true);
    pb::Campaign {
        id: code.clone(),
        name: code.clone(),
        status: pb::CampaignStatus::Active.into(),
        segments,
        effect: Some(cpb::Effect { kind: Some(kind) }),
        codes: if automatic { vec![] } else { vec![code] },
        ..Default::default()
    }
}

fn cart(v: &Value) -> cpb::Cart {
    cpb::Cart {
        currency: v["currency_code"]
            .as_str()
            .unwrap_or("usd")
            .to_ascii_uppercase(),
        lines: v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|item| {
                let quantity = item["quantity"].as_i64().unwrap_or(1);
                cpb::CartLine {
                    id: item["id"].as_str().unwrap_or_default().into(),
                    sku: item["variant_sku"].as_str().unwrap_or_default().into(),
                    categories: item["product"]["categories"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|c| c["id"].as_str().map(String::from))
                        .collect(),
                    quantity,
                    unit_price: cents(&item["subtotal"]) / quantity,
                    ..Default::default()
                }
            })
            .collect(),
        ..Default::default()
    }
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |pages| pages * 4096.0 / 1_048_576.0)
}

async fn load(client: &Client, suite: &TestSuite, promotions: &Value) -> usize {
    let mut all: Vec<pb::Campaign> = promotions["automatic"]
        .as_array()
        .into_iter()
        .flatten()
        .map(campaign)
        .collect();
    all.push(campaign(&promotions["code"]));
    let groups: BTreeSet<String> = all.iter().flat_map(|c| c.segments.clone()).collect();
    for group in &groups {
        let mut c = client.clone();
        let request = pb::CreateSegmentRequest {
            idempotency_key: format!("segment-{group}"),
            segment: Some(pb::SegmentInput {
                id: group.clone(),
                name: group.clone(),
                kind: pb::SegmentKind::Static.into(),
                rule: String::new(),
            }),
        };
        // Already there from a smaller set: fine.
        let _ = c.create_segment(suite.ctx(TENANT).request(request)).await;
    }
    for group in ["cg_0", "cg_1"] {
        let mut c = client.clone();
        let _ = c
            .edit_static_segment(suite.ctx(TENANT).request(pb::EditStaticSegmentRequest {
                idempotency_key: format!("members-{group}"),
                id: group.into(),
                add: vec!["cus_bench".into()],
                remove: vec![],
            }))
            .await;
    }
    let count = all.len();
    let chunks: Vec<Vec<pb::Campaign>> = all.chunks(count.div_ceil(8)).map(<[_]>::to_vec).collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let (mut c, ctx) = (client.clone(), suite.ctx(TENANT));
        tasks.push(tokio::spawn(async move {
            for campaign in chunk {
                c.put_campaign(ctx.request(pb::PutCampaignRequest {
                    idempotency_key: format!("campaign-{}", campaign.id),
                    campaign: Some(campaign),
                    ..Default::default()
                }))
                .await
                .expect("put campaign");
            }
        }));
    }
    for t in tasks {
        t.await.expect("loader");
    }
    count
}

async fn measure(
    client: &Client,
    suite: &TestSuite,
    cart: &cpb::Cart,
    explain: pb::Explain,
    clients: usize,
    per_client: usize,
) -> (Vec<Duration>, Duration, pb::QualifyResponse) {
    let request = pb::QualifyRequest {
        customer_id: "cus_bench".into(),
        cart: Some(cart.clone()),
        codes: vec!["WELCOME10".into()],
        explain: explain.into(),
        ..Default::default()
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (mut c, ctx, request) = (client.clone(), suite.ctx(TENANT), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            let mut last = None;
            for _ in 0..per_client {
                let t = Instant::now();
                let r = c
                    .qualify(ctx.request(request.clone()))
                    .await
                    .expect("qualify");
                latencies.push(t.elapsed());
                last = Some(r.into_inner());
            }
            (latencies, last)
        }));
    }
    let mut latencies = Vec::new();
    let mut last = None;
    for t in tasks {
        let (l, r) = t.await.expect("client");
        latencies.extend(l);
        last = r;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    (latencies, elapsed, last.expect("a response"))
}

/// Cumulative server-side counts of `Qualify` calls per latency bucket (`le` seconds), read
/// from this process's own metrics (the suite runs in it).
fn server_buckets() -> Vec<(String, u64)> {
    tessera_runtime::metrics::install()
        .render()
        .lines()
        .filter(|l| {
            l.starts_with("tessera_grpc_server_request_duration_seconds_bucket")
                && l.contains("method=\"Qualify\"")
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?.to_string();
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect()
}

/// Share of the calls since `before` that the server answered within 5 ms and 10 ms.
fn server_share(before: &[(String, u64)]) -> String {
    let after = server_buckets();
    let delta = |le: &str| {
        let get = |v: &[(String, u64)]| v.iter().find(|(l, _)| l == le).map_or(0, |x| x.1);
        get(&after) - get(before)
    };
    let total = delta("+Inf").max(1) as f64;
    format!(
        "server-side: {:.1}% within 5 ms, {:.1}% within 10 ms",
        100.0 * delta("0.005") as f64 / total,
        100.0 * delta("0.01") as f64 / total
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn qualification(suite: &TestSuite, label: &str) {
    let Some(cart_json) = read("cart.json") else {
        println!(
            "  {label:<28} Qualify skipped: peer dataset not found at {:?}",
            dataset()
        );
        return;
    };
    let cart = cart(&cart_json);
    let client = EligibilityServiceClient::new(suite.channel());
    for (n, p50, p99, rate, rss, applying) in PEER {
        let Some(promotions) = read(&format!("promotions-{n}.json")) else {
            continue;
        };
        let t = Instant::now();
        let loaded = load(&client, suite, &promotions).await;
        let load_time = t.elapsed();
        // The first call builds the index.
        let t = Instant::now();
        let (_, _, first) = measure(&client, suite, &cart, pb::Explain::Counts, 1, 1).await;
        let build = t.elapsed();
        let peer_codes: BTreeSet<String> = read(&format!("medusa-actions-{n}.json"))
            .and_then(|a| a.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|a| a["code"].as_str().map(String::from))
            .filter(|c| c != "WELCOME10")
            .collect();
        let ours: BTreeSet<String> = first
            .qualified
            .iter()
            .map(|q| q.campaign_id.clone())
            .filter(|c| c != "WELCOME10")
            .collect();
        let per_call = if n >= 10_000 { 300 } else { 1000 };
        let before = server_buckets();
        let (one, one_elapsed, _) =
            measure(&client, suite, &cart, pb::Explain::Counts, 1, per_call).await;
        let server = server_share(&before);
        let before = server_buckets();
        let (four, four_elapsed, _) =
            measure(&client, suite, &cart, pb::Explain::Counts, 4, per_call / 2).await;
        let server_four = server_share(&before);
        let (all, _, explained) =
            measure(&client, suite, &cart, pb::Explain::All, 1, per_call / 4).await;
        let pct = |l: &[Duration], p: f64| ms(l[((l.len() as f64 - 1.0) * p).round() as usize]);
        println!(
            "  {label:<28} Qualify {n:>6} promotions (+WELCOME10; {loaded} loaded in {:.1} s, \
             index built in {:.0} ms), RSS {:.0} MB",
            load_time.as_secs_f64(),
            ms(build),
            rss_mb()
        );
        println!(
            "      answer: {} bytes (counts), {} adjustments over {} incentives",
            prost::Message::encoded_len(&first),
            first
                .qualified
                .iter()
                .map(|q| q.outcome.as_ref().map_or(0, |o| o.adjustments.len()))
                .sum::<usize>(),
            first.qualified.len(),
        );
        println!(
            "      applying: ours {} automatic + WELCOME10 {}; peer {applying} \
             (its actions name {}); ours missing from the peer's actions: {}",
            ours.len(),
            if first.qualified.iter().any(|q| q.campaign_id == "WELCOME10") {
                "yes"
            } else {
                "NO"
            },
            peer_codes.len(),
            peer_codes.difference(&ours).count(),
        );
        println!(
            "      1 in flight, counts: p50 {:>6.2} ms  p99 {:>6.2} ms  {:>6.0}/s   \
             | peer: p50 {p50} ms  p99 {p99} ms  {rate}/s  RSS {rss}",
            pct(&one, 0.5),
            pct(&one, 0.99),
            one.len() as f64 / one_elapsed.as_secs_f64(),
        );
        println!("      1 in flight, counts: {server}");
        println!(
            "      4 clients, counts:  p50 {:>6.2} ms  p99 {:>6.2} ms  {:>6.0}/s",
            pct(&four, 0.5),
            pct(&four, 0.99),
            four.len() as f64 / four_elapsed.as_secs_f64(),
        );
        println!("      4 clients, counts:  {server_four}");
        println!(
            "      1 in flight, every rejection listed ({} rejected): p50 {:>6.2} ms  p99 {:>6.2} ms",
            explained.rejected.len(),
            pct(&all, 0.5),
            pct(&all, 0.99),
        );
    }
}

/// The raw cost of one CEL evaluation of a typical rule over a customer and a 20-line cart.
pub fn cel_cost() {
    use std::collections::{BTreeMap, HashMap};
    use tessera_eligibility::rules::{self, Schema, Scope};
    let schema = Schema::new(&BTreeMap::new(), Scope::Campaign);
    let rule = rules::compile(
        r#"customer.spend_365d >= 100000 && customer.country == "GB" && order.lines.exists(l, l.sku == "IPHONE-X")"#,
        &schema,
    )
    .expect("rule compiles");
    let mut ctx = cel::Context::with_env(rules::ENV.clone());
    let customer: HashMap<&str, cel::Value> = HashMap::from([
        ("spend_365d", cel::Value::Int(150_000)),
        ("country", "GB".into()),
    ]);
    let lines: Vec<cel::Value> = (0..20)
        .map(|i| HashMap::from([("sku", cel::Value::from(format!("SKU-{i}")))]).into())
        .collect();
    ctx.add_variable_from_value("customer", customer);
    ctx.add_variable_from_value("order", HashMap::from([("lines", cel::Value::from(lines))]));
    let rounds = 100_000;
    let t = Instant::now();
    let mut truths = 0;
    for _ in 0..rounds {
        if rule.program.execute(&ctx) == Ok(cel::Value::Bool(true)) {
            truths += 1;
        }
    }
    let elapsed = t.elapsed();
    let t = Instant::now();
    for _ in 0..1000 {
        let _ = rules::compile(&rule.source, &schema);
    }
    println!(
        "  CEL: one evaluation of a 3-clause rule scanning 20 lines {:.2} µs ({} of {rounds} false); \
         compile + type-check {:.1} µs (once, when saved)",
        elapsed.as_secs_f64() * 1e6 / f64::from(rounds),
        rounds - truths,
        t.elapsed().as_secs_f64() * 1e6 / 1000.0,
    );
}
