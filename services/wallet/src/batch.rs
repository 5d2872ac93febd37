//! `BatchCredit`: many credits in one database transaction (a group commit), written with a
//! handful of multi-row statements instead of a dozen statements per credit. Every entry is
//! still its own balanced transaction with its own lot and event.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::wallet::v1 as pb;
use tessera_runtime::{Error, RequestContext};
use tessera_store::{Backend, db_error, insert_rows, now_micros, outbox, stmt, tuples};

use crate::ledger::{self, Asset, Balanced, CREDIT, Credit, Leg, earning_terms, programme_of};
use crate::programs::Program;
use crate::{rules, tiers};

/// Most entries one `BatchCredit` carries.
pub const MAX_ENTRIES: usize = 1_000;

type AccountKey = (&'static str, String, i32, String);

fn key(owner_kind: &'static str, owner_id: &str, asset: &Asset) -> AccountKey {
    (
        owner_kind,
        owner_id.to_string(),
        asset.kind as i32,
        asset.code.clone(),
    )
}

/// Posts every entry (all validated, at most [`MAX_ENTRIES`]) or none.
pub async fn batch_credit(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    entries: &[Credit],
) -> Result<pb::BatchCreditResponse, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();

    // Accounts: every customer's, and the issuance account of every asset.
    let mut wanted: BTreeSet<AccountKey> = BTreeSet::new();
    for e in entries {
        wanted.insert(key("customer", &e.customer_id, &e.asset));
        wanted.insert(key("system", CREDIT.counter_account, &e.asset));
    }
    insert_rows(
        txn,
        "INSERT INTO accounts (id, tenant_id, owner_kind, owner_id, asset_kind, asset_code, \
         balance, version, created_at, updated_at)",
        "ON CONFLICT (tenant_id, owner_kind, owner_id, asset_kind, asset_code) DO NOTHING",
        wanted
            .iter()
            .map(|(kind, owner, asset_kind, code)| {
                vec![
                    uuid::Uuid::now_v7().to_string().into(),
                    tenant.into(),
                    (*kind).into(),
                    owner.clone().into(),
                    (*asset_kind).into(),
                    code.clone().into(),
                    0i64.into(),
                    0i64.into(),
                    now.into(),
                    now.into(),
                ]
            })
            .collect(),
    )
    .await?;
    let owners: BTreeSet<&str> = wanted.iter().map(|k| k.1.as_str()).collect();
    let rows = txn
        .query_all_raw(stmt(
            txn,
            &format!(
                "SELECT id, owner_kind, owner_id, asset_kind, asset_code FROM accounts \
                 WHERE tenant_id = $1 AND owner_id IN {}",
                tuples(2, owners.len(), 1)
            ),
            std::iter::once(tenant.into()).chain(owners.iter().map(|o| (*o).into())),
        ))
        .await
        .map_err(db_error)?;
    let mut ids: HashMap<AccountKey, String> = HashMap::new();
    for row in rows {
        let kind: String = row.try_get_by_index(1).map_err(db_error)?;
        let kind = if kind == "customer" {
            "customer"
        } else {
            "system"
        };
        ids.insert(
            (
                kind,
                row.try_get_by_index(2).map_err(db_error)?,
                row.try_get_by_index(3).map_err(db_error)?,
                row.try_get_by_index(4).map_err(db_error)?,
            ),
            row.try_get_by_index(0).map_err(db_error)?,
        );
    }
    let id_of = |k: AccountKey| {
        ids.get(&k)
            .cloned()
            .ok_or_else(|| Error::internal("account vanished after insert"))
    };

    // Balance changes per customer account; the accounts are locked in id order first so
    // concurrent batches (and single debits) cannot deadlock.
    let mut deltas: BTreeMap<String, i64> = BTreeMap::new();
    let mut programmes: HashMap<String, Program> = HashMap::new();
    let mut activity = Vec::new();
    let mut tiered: BTreeSet<(String, String)> = BTreeSet::new();
    let mut transactions = Vec::with_capacity(entries.len());
    let mut lots = Vec::with_capacity(entries.len());
    let mut postings = ledger::Postings::with_capacity(entries.len());
    let mut response = pb::BatchCreditResponse::default();
    for (i, e) in entries.iter().enumerate() {
        rules::check_expiry(
            txn,
            tenant,
            &e.asset,
            e.expires_at,
            &format!("entries[{i}].expires_at"),
        )
        .await?;
        let customer = id_of(key("customer", &e.customer_id, &e.asset))?;
        let issuance = id_of(key("system", CREDIT.counter_account, &e.asset))?;
        *deltas.entry(customer.clone()).or_default() += e.amount;
        // Points: the programme's expiry, extended by the member's tier when it has tiers;
        // the credit counts toward the tier, re-evaluated once per member below.
        let mut expires_at = e.expires_at;
        if e.asset.kind == pb::AssetKind::Points {
            if !programmes.contains_key(&e.asset.code) {
                let programme = programme_of(txn, tenant, &e.asset).await?;
                programmes.insert(e.asset.code.clone(), programme);
            }
            let programme = &programmes[&e.asset.code];
            if programme.tiers.is_some() {
                tiered.insert((e.asset.code.clone(), e.customer_id.clone()));
            }
            expires_at = earning_terms(
                txn,
                tenant,
                Some(programme),
                &e.customer_id,
                e.expires_at,
                now,
            )
            .await?
            .1;
            activity.push(vec![
                tenant.into(),
                e.asset.code.clone().into(),
                e.customer_id.clone().into(),
                e.amount.into(),
                0i64.into(),
                now.into(),
            ]);
        }
        let id = uuid::Uuid::now_v7().to_string();
        transactions.push(vec![
            id.clone().into(),
            tenant.into(),
            CREDIT.kind.into(),
            e.customer_id.clone().into(),
            (e.asset.kind as i32).into(),
            e.asset.code.clone().into(),
            e.amount.into(),
            e.reason.clone().into(),
            ctx.principal.clone().into(),
            now.into(),
        ]);
        lots.push(vec![
            tenant.into(),
            customer.clone().into(),
            id.clone().into(),
            e.amount.into(),
            e.amount.into(),
            now.into(),
            expires_at.into(),
        ]);
        let legs = Balanced::new([
            Leg::Customer(&customer, e.amount),
            Leg::System(&issuance, -e.amount),
        ])?;
        postings.add(tenant, &id, &legs, now);
        response.transaction_ids.push(id);
    }
    let locked: BTreeSet<&str> = deltas.keys().map(String::as_str).collect();
    crate::ledger::lock_accounts(txn, tenant, backend, &locked).await?;
    ledger::write_transactions(txn, transactions).await?;
    insert_rows(
        txn,
        "INSERT INTO lots (tenant_id, account_id, transaction_id, amount, remaining, earned_at, \
         expires_at)",
        "",
        lots,
    )
    .await?;
    ledger::write_postings(txn, postings).await?;
    let updated = txn
        .query_all_raw(stmt(
            txn,
            &format!(
                "UPDATE accounts SET balance = balance + v.column2, version = version + 1, \
                 updated_at = $2 FROM (VALUES {}) AS v \
                 WHERE accounts.tenant_id = $1 AND accounts.id = v.column1 RETURNING id, balance",
                tuples(3, 2, deltas.len())
            ),
            [tenant.into(), now.into()].into_iter().chain(
                deltas
                    .iter()
                    .flat_map(|(id, delta)| [id.clone().into(), (*delta).into()]),
            ),
        ))
        .await
        .map_err(db_error)?;
    if updated.len() != deltas.len() {
        return Err(Error::internal("batch posting to a missing account"));
    }
    insert_rows(
        txn,
        "INSERT INTO tier_activity (tenant_id, program_id, customer_id, points, spent, at)",
        "",
        activity,
    )
    .await?;
    for (program_id, customer_id) in &tiered {
        if let Some(policy) = &programmes[program_id].tiers {
            tiers::evaluate(txn, ctx, backend, program_id, policy, customer_id).await?;
        }
    }
    let mut balances: HashMap<String, i64> = HashMap::new();
    for row in updated {
        balances.insert(
            row.try_get_by_index(0).map_err(db_error)?,
            row.try_get_by_index(1).map_err(db_error)?,
        );
    }

    // One event per credit, as a single Credit writes.
    let mut events = Vec::with_capacity(entries.len());
    for (e, id) in entries.iter().zip(&response.transaction_ids) {
        let customer = id_of(key("customer", &e.customer_id, &e.asset))?;
        events.push((
            format!("{}.{}", e.asset.event_prefix(), CREDIT.event),
            serde_json::json!({
                "transaction_id": id,
                "customer_id": e.customer_id,
                "asset": e.asset.to_json(),
                "amount": e.amount,
                "balance": balances.get(&customer),
                "reason": e.reason,
                "batch": true,
            }),
        ));
    }
    outbox::enqueue_many(
        txn,
        tenant,
        events
            .iter()
            .map(|(event_type, data)| (event_type.as_str(), data)),
    )
    .await?;
    Ok(response)
}
