//! The event catalogue: every event type the services emit, who emits it, and the JSON
//! Schema of its payload (`data`), per version. Within a version, fields are only ever
//! added (receivers must ignore fields they do not know); a change that could break a
//! receiver (a field removed, renamed or retyped) makes a new version, and the old one stays
//! listed. `ListEventTypes` serves it; `docs/events.md` explains it; the end-to-end tests
//! check the events real flows produce against it.
//!
//! Fields are written compactly here: `name:type`, where type is `string`, `integer`,
//! `boolean`, `array`, `object` or `timestamp` (an RFC 3339 string); a trailing `?` means
//! the value may be null; a leading `~` means the field may be absent.

use serde_json::{Map, Value, json};
use tessera_proto::notification::v1 as pb;

struct Spec {
    names: &'static [&'static str],
    source: &'static str,
    description: &'static str,
    fields: &'static str,
}

const CAMPAIGN_STATE: &str = "campaign_id:string from:string to:string action:string \
                              reason:string principal:string version:integer";
const REDEMPTION: &str = "redemption_id:string customer_id:string order_id:string \
                          status:string order_value:integer discount:integer \
                          shipping_discount:integer cashback:integer total_due:integer \
                          applied:array spends:array";
const REWARD: &str = "reward_id:string name:string? effect_kind:string? status:string \
                      version:integer reason:string? principal:string";

const SPECS: &[Spec] = &[
    // Campaign scheduler.
    Spec {
        names: &["campaign.created"],
        source: "campaign-scheduler",
        description: "A campaign was created (as a draft).",
        fields: CAMPAIGN_STATE,
    },
    Spec {
        names: &["campaign.scheduled"],
        source: "campaign-scheduler",
        description: "A campaign was started before its start date: it goes live then.",
        fields: CAMPAIGN_STATE,
    },
    Spec {
        names: &["campaign.started"],
        source: "campaign-scheduler",
        description: "A campaign went live.",
        fields: CAMPAIGN_STATE,
    },
    Spec {
        names: &["campaign.paused"],
        source: "campaign-scheduler",
        description: "A campaign was paused.",
        fields: CAMPAIGN_STATE,
    },
    Spec {
        names: &["campaign.resumed"],
        source: "campaign-scheduler",
        description: "A paused campaign went live again.",
        fields: CAMPAIGN_STATE,
    },
    Spec {
        names: &["campaign.killed"],
        source: "campaign-scheduler",
        description: "A campaign was stopped for good with the kill switch (reason given).",
        fields: CAMPAIGN_STATE,
    },
    Spec {
        names: &["campaign.ended"],
        source: "campaign-scheduler",
        description: "A campaign ended (stopped, or past its end date).",
        fields: CAMPAIGN_STATE,
    },
    Spec {
        names: &["campaign.updated"],
        source: "campaign-scheduler",
        description: "A campaign's definition changed (a new version).",
        fields: "campaign_id:string version:integer principal:string",
    },
    Spec {
        names: &["campaign.incentive_issued"],
        source: "campaign-scheduler",
        description: "A campaign's incentive was issued to a customer (by a trigger, an \
                      occasion, a distribution or a call); `channel` names the message \
                      channel it goes out on, if any.",
        fields: "campaign_id:string customer_id:string publication_id:string code:string \
                 channel:string cause:string occasion:string",
    },
    Spec {
        names: &["campaign.reminder"],
        source: "campaign-scheduler",
        description: "A reminder of an issued incentive the customer has not used is due.",
        fields: "campaign_id:string customer_id:string step:integer template:string \
                 publication_id:string code:string ~channel:string",
    },
    // Catalog.
    Spec {
        names: &["reward.created", "reward.updated", "reward.status_changed"],
        source: "catalog",
        description: "A reward was created, changed, or enabled/disabled.",
        fields: REWARD,
    },
    Spec {
        names: &["access_policy.updated"],
        source: "catalog",
        description: "The tenant's access policy was replaced: how much a junior marketer's \
                      rewards and campaigns may give, and which rewards support agents may \
                      hand out.",
        fields: "junior_max_percent_bp:integer junior_max_amount:integer \
                 support_reward_ids:array principal:string",
    },
    Spec {
        names: &["reward.published"],
        source: "catalog",
        description: "A reward (and its code, if any: null without) was published to a \
                      customer.",
        fields: "publication_id:string customer_id:string reward_id:string code:string? \
                 channel:string principal:string",
    },
    Spec {
        names: &["reward.shown"],
        source: "catalog",
        description: "A published reward was shown to its customer on a channel.",
        fields: "publication_id:string customer_id:string reward_id:string channel:string",
    },
    Spec {
        names: &["code_pool.created"],
        source: "catalog",
        description: "A code pool was created.",
        fields: "pool_id:string reward_id:string name:string principal:string",
    },
    Spec {
        names: &["code_pool.updated"],
        source: "catalog",
        description: "A code pool was changed.",
        fields: "pool_id:string name:string principal:string",
    },
    Spec {
        names: &["code_pool.status_changed"],
        source: "catalog",
        description: "A code pool was enabled or disabled.",
        fields: "pool_id:string status:string principal:string",
    },
    Spec {
        names: &["code.status_changed"],
        source: "catalog",
        description: "A code was disabled (kill switch) or enabled again.",
        fields: "code:string pool_id:string disabled:boolean principal:string",
    },
    Spec {
        names: &["code_pool.generation_started"],
        source: "catalog",
        description: "A bulk code generation job started.",
        fields: "job_id:string pool_id:string requested:integer principal:string",
    },
    Spec {
        names: &["code_pool.generated", "code_pool.generation_failed"],
        source: "catalog",
        description: "A bulk code generation job finished, or failed (`error`).",
        fields: "job_id:string pool_id:string generated:integer error:string?",
    },
    Spec {
        names: &["code_pool.imported"],
        source: "catalog",
        description: "Codes were imported from CSV into a pool.",
        fields: "pool_id:string imported:integer refused:integer principal:string",
    },
    // Eligibility.
    Spec {
        names: &["customer.joined"],
        source: "eligibility",
        description: "A customer profile was created.",
        fields: "customer_id:string joined_at:timestamp country:string",
    },
    Spec {
        names: &["customer.erased"],
        source: "eligibility",
        description: "A customer was erased (GDPR): profile, orders and events are gone.",
        fields: "customer_id:string orders:integer events:integer",
    },
    Spec {
        names: &["order.recorded"],
        source: "eligibility",
        description: "An order was recorded, or its status changed (paid, returned, \
                      cancelled); amounts in minor units.",
        fields: "order_id:string customer_id:string status:string currency:string \
                 total:integer spend:integer",
    },
    Spec {
        names: &["loyalty.points_earned"],
        source: "eligibility",
        description: "An earning rule gave a customer points (credited by the wallet).",
        fields: "source:string campaign_id:string rule_id:string customer_id:string \
                 program_id:string points:integer",
    },
    Spec {
        names: &["redemption.succeeded", "redemption.reserved"],
        source: "eligibility",
        description: "Incentives were redeemed on an order (or reserved, until confirmed \
                      or the hold ends); amounts in minor units.",
        fields: REDEMPTION,
    },
    Spec {
        names: &["redemption.rolled_back", "redemption.expired"],
        source: "eligibility",
        description: "A redemption was rolled back, in full or for returned lines, or a \
                      reservation expired unconfirmed.",
        fields: "redemption_id:string customer_id:string order_id:string status:string \
                 order_value:integer discount:integer shipping_discount:integer \
                 cashback:integer total_due:integer applied:array spends:array \
                 partial:boolean \
                 reason:string order_value_released:integer discount_released:integer",
    },
    Spec {
        names: &["redemption.failed"],
        source: "eligibility",
        description: "A redemption was refused (`reason`, e.g. BUDGET_EXHAUSTED).",
        fields: "customer_id:string order_id:string codes:array campaign_ids:array \
                 reason:string message:string",
    },
    // Wallet.
    Spec {
        names: &["tier.changed"],
        source: "wallet",
        description: "A customer moved up or down a tier.",
        fields: "change_id:string customer_id:string program_id:string from_tier:string \
                 to_tier:string direction:string qualifying:integer",
    },
];

/// Wallet movements: `<asset>.<verb>` for points, cashback and gift cards; every payload
/// names its `asset` (`{kind, code}`) and amounts are in the asset's units.
const WALLET: &[(&str, &str, &str)] = &[
    (
        "credited",
        "Value was credited (available now, or confirmed from pending).",
        "transaction_id:string customer_id:string amount:integer balance:integer? \
         reason:string ~expires_at:timestamp? ~batch:boolean",
    ),
    (
        "debited",
        "Value was spent.",
        "transaction_id:string customer_id:string amount:integer balance:integer? \
         reason:string",
    ),
    (
        "adjusted",
        "An agent corrected a balance (reason given).",
        "transaction_id:string customer_id:string amount:integer balance:integer? \
         reason:string ~expires_at:timestamp?",
    ),
    (
        "expired",
        "Lots past their expiry were expired.",
        "transaction_id:string customer_id:string amount:integer lots:integer",
    ),
    (
        "expiring",
        "Value will expire within 7 days (announced once per lot); `expires_at` is the \
         first expiry.",
        "customer_id:string amount:integer expires_at:timestamp lots:integer",
    ),
    (
        "held",
        "Value was held for a two-phase spend.",
        "hold_id:string customer_id:string amount:integer reason:string",
    ),
    (
        "captured",
        "A hold was captured (spent); the rest released.",
        "hold_id:string transaction_id:string customer_id:string amount:integer \
         released:integer",
    ),
    (
        "released",
        "A hold was released or ran out.",
        "hold_id:string customer_id:string amount:integer reason:string",
    ),
    (
        "status_changed",
        "A pending credit was created, confirmed, cancelled or paid out.",
        "credit_id:string customer_id:string amount:integer status:string reason:string \
         ~previous_status:string ~activate_at:timestamp?",
    ),
    (
        "refunded",
        "A spend was refunded, restoring the lots it consumed.",
        "transaction_id:string original_transaction_id:string customer_id:string \
         amount:integer reason:string",
    ),
    (
        "clawed_back",
        "A credit was reversed.",
        "transaction_id:string original_transaction_id:string customer_id:string \
         amount:integer reason:string",
    ),
    (
        "transferred",
        "Value moved from one member to another.",
        "outgoing_transaction_id:string incoming_transaction_id:string \
         from_customer_id:string to_customer_id:string amount:integer reason:string",
    ),
    (
        "paid_out",
        "Cashback was paid out to the customer.",
        "transaction_id:string customer_id:string amount:integer balance:integer? \
         reason:string",
    ),
];

/// The JSON Schema of a compact field list.
fn schema(fields: &str, extra: &[(&str, Value)]) -> Value {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for field in fields.split_whitespace() {
        let (name, ty) = field.split_once(':').expect("name:type");
        let (name, optional) = match name.strip_prefix('~') {
            Some(n) => (n, true),
            None => (name, false),
        };
        let (ty, nullable) = match ty.strip_suffix('?') {
            Some(t) => (t, true),
            None => (ty, false),
        };
        let mut p = match ty {
            "timestamp" => json!({"type": "string", "format": "date-time"}),
            other => json!({"type": other}),
        };
        if nullable {
            p["type"] = json!([p["type"].clone(), "null"]);
        }
        properties.insert(name.to_string(), p);
        if !optional {
            required.push(name.to_string());
        }
    }
    for (name, p) in extra {
        properties.insert((*name).to_string(), p.clone());
        required.push((*name).to_string());
    }
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": properties,
        "required": required,
    })
}

fn version_1(schema: &Value) -> Vec<pb::EventSchema> {
    vec![pb::EventSchema {
        version: 1,
        json_schema: schema.to_string(),
    }]
}

/// The catalogue, by name (built once).
pub fn event_types() -> &'static [pb::EventType] {
    static CATALOGUE: std::sync::LazyLock<Vec<pb::EventType>> = std::sync::LazyLock::new(build);
    &CATALOGUE
}

fn build() -> Vec<pb::EventType> {
    let mut out = Vec::new();
    for s in SPECS {
        let schema = schema(s.fields, &[]);
        for name in s.names {
            out.push(pb::EventType {
                name: (*name).to_string(),
                source: s.source.into(),
                description: s.description.into(),
                schemas: version_1(&schema),
            });
        }
    }
    let asset = json!({
        "type": "object",
        "properties": {
            "kind": {"type": "string", "enum": ["points", "cashback", "gift_card"]},
            "code": {"type": "string"},
        },
        "required": ["kind", "code"],
    });
    for prefix in ["points", "cashback", "gift_card"] {
        for (verb, description, fields) in WALLET {
            if *verb == "paid_out" && prefix != "cashback" {
                continue;
            }
            out.push(pb::EventType {
                name: format!("{prefix}.{verb}"),
                source: "wallet".into(),
                description: (*description).into(),
                schemas: version_1(&schema(fields, &[("asset", asset.clone())])),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The current version of an event type's payload (0: not in the catalogue).
pub fn current_version(name: &str) -> u32 {
    let types = event_types();
    types
        .binary_search_by(|t| t.name.as_str().cmp(name))
        .ok()
        .and_then(|i| types[i].schemas.last())
        .map_or(0, |s| s.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_is_sorted_unique_and_well_formed() {
        let types = event_types();
        assert!(
            types.windows(2).all(|w| w[0].name < w[1].name),
            "sorted, unique"
        );
        for t in types {
            assert!(!t.description.is_empty(), "{}", t.name);
            let s: Value = serde_json::from_str(&t.schemas[0].json_schema).expect("JSON");
            assert!(!s["required"].as_array().expect("required").is_empty());
        }
        assert_eq!(current_version("points.credited"), 1);
        assert_eq!(current_version("points.paid_out"), 0);
        // The documentation names every type.
        let doc = include_str!("../../../docs/events.md");
        for t in types {
            assert!(
                doc.contains(&format!("`{}`", t.name)),
                "docs/events.md misses {}",
                t.name
            );
        }
        let credited = schema("a:integer ~b:timestamp? c:string?", &[]);
        assert_eq!(credited["required"], json!(["a", "c"]));
        assert_eq!(
            credited["properties"]["b"]["type"],
            json!(["string", "null"])
        );
    }
}
