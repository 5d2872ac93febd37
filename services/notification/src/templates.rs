//! Message templates (minijinja) per tenant, name, channel, campaign and locale, and the
//! tenant's brand. A template is compiled when saved, so a syntax error is refused with the
//! field and line; rendering uses semi-strict undefined values (an `if` on a missing
//! variable is false, printing one is an error) and escapes HTML in `body_html`.

use minijinja::{Environment, UndefinedBehavior};
use prost::Message as _;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::notification::v1 as pb;
use tessera_runtime::Error;
use tessera_runtime::error::Violations;
use tessera_store::outbox::micros_to_timestamp;
use tessera_store::{db_error, stmt};

/// Template names: 1 to 64 of a-z, 0-9, _ and -.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

pub use tessera_store::api::is_locale;

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".html") {
            minijinja::AutoEscape::Html
        } else {
            minijinja::AutoEscape::None
        }
    });
    env
}

/// Compiles one source; the error names the line.
fn compile(name: &str, source: &str) -> Result<(), String> {
    environment()
        .template_from_named_str(name, source)
        .map(|_| ())
        .map_err(|e| match e.line() {
            Some(line) => format!("line {line}: {}", e.detail().unwrap_or("syntax error")),
            None => e.to_string(),
        })
}

/// Renders one source with `context`.
pub fn render(name: &str, source: &str, context: &serde_json::Value) -> Result<String, String> {
    let env = environment();
    let template = env
        .template_from_named_str(name, source)
        .map_err(|e| e.to_string())?;
    template.render(context).map_err(|e| {
        let mut text = e.to_string();
        if let Some(detail) = e.detail() {
            text = format!("{text}: {detail}");
        }
        format!("{name}: {text}")
    })
}

/// Checks a template: names, channel, purpose, sizes, and that every part compiles.
pub fn check(v: &mut Violations, t: &pb::Template) {
    if !is_name(&t.name) {
        v.add("template.name", "must be 1 to 64 of a-z, 0-9, _ and -");
    }
    if t.channel() == pb::Channel::Unspecified {
        v.add("template.channel", "is required (EMAIL, SMS or PUSH)");
    }
    if t.purpose() == pb::MessagePurpose::Unspecified {
        v.add(
            "template.purpose",
            "is required (TRANSACTIONAL, MARKETING or CONSENT_REQUEST)",
        );
    }
    if t.campaign_id.len() > 64 {
        v.add("template.campaign_id", "must be at most 64 characters");
    }
    if !t.locale.is_empty() && !is_locale(&t.locale) {
        v.add(
            "template.locale",
            "must be a language tag, e.g. it or it-IT",
        );
    }
    if t.body_text.trim().is_empty() {
        v.add("template.body_text", "is required");
    }
    if t.channel() == pb::Channel::Email && t.subject.trim().is_empty() {
        v.add("template.subject", "is required for e-mail");
    }
    if t.channel() != pb::Channel::Email && !t.body_html.is_empty() {
        v.add("template.body_html", "is for e-mail only");
    }
    for (field, source, limit) in [
        ("subject", &t.subject, 1_000),
        ("body_text", &t.body_text, 100_000),
        ("body_html", &t.body_html, 500_000),
    ] {
        if source.len() > limit {
            v.add(
                format!("template.{field}"),
                format!("must be at most {limit} bytes"),
            );
        } else if let Err(e) = compile(&part_name(field), source) {
            v.add(format!("template.{field}"), e);
        }
    }
}

/// The name a part compiles under (`.html` turns on escaping).
pub fn part_name(field: &str) -> String {
    if field == "body_html" {
        "body.html".into()
    } else {
        format!("{field}.txt")
    }
}

const COLUMNS: &str = "name, channel, campaign_id, locale, purpose, subject, body_text, \
                       body_html, version, updated_at";

fn decode(row: &sea_orm::QueryResult) -> Result<pb::Template, Error> {
    let get = || -> Result<pb::Template, sea_orm::DbErr> {
        Ok(pb::Template {
            name: row.try_get_by_index(0)?,
            channel: row.try_get_by_index(1)?,
            campaign_id: row.try_get_by_index(2)?,
            locale: row.try_get_by_index(3)?,
            purpose: row.try_get_by_index(4)?,
            subject: row.try_get_by_index(5)?,
            body_text: row.try_get_by_index(6)?,
            body_html: row.try_get_by_index(7)?,
            version: row.try_get_by_index(8)?,
            updated_at: Some(micros_to_timestamp(row.try_get_by_index(9)?)),
        })
    };
    get().map_err(db_error)
}

/// Creates or replaces a template; returns it with its new version.
pub async fn put(
    txn: &DatabaseTransaction,
    tenant: &str,
    t: &pb::Template,
    now: i64,
) -> Result<pb::Template, Error> {
    let row = txn
        .query_one_raw(stmt(
            txn,
            &format!(
                "INSERT INTO templates (tenant_id, {COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $10) \
                 ON CONFLICT (tenant_id, name, channel, campaign_id, locale) DO UPDATE SET \
                 purpose = excluded.purpose, subject = excluded.subject, \
                 body_text = excluded.body_text, body_html = excluded.body_html, \
                 version = templates.version + 1, updated_at = excluded.updated_at \
                 RETURNING {COLUMNS}"
            ),
            [
                tenant.into(),
                t.name.clone().into(),
                t.channel.into(),
                t.campaign_id.clone().into(),
                t.locale.clone().into(),
                t.purpose.into(),
                t.subject.clone().into(),
                t.body_text.clone().into(),
                t.body_html.clone().into(),
                now.into(),
            ],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::internal("upsert returned no row"))?;
    decode(&row)
}

/// Removes a template; NOT_FOUND when there is none.
pub async fn delete(
    txn: &DatabaseTransaction,
    tenant: &str,
    r: &pb::DeleteTemplateRequest,
) -> Result<(), Error> {
    let gone = txn
        .execute_raw(stmt(
            txn,
            "DELETE FROM templates WHERE tenant_id = $1 AND name = $2 AND channel = $3 \
             AND campaign_id = $4 AND locale = $5",
            [
                tenant.into(),
                r.name.clone().into(),
                r.channel.into(),
                r.campaign_id.clone().into(),
                r.locale.clone().into(),
            ],
        ))
        .await
        .map_err(db_error)?
        .rows_affected();
    if gone == 0 {
        return Err(Error::not_found(format!("template `{}`", r.name)));
    }
    Ok(())
}

/// The tenant's templates (of one name when given).
pub async fn list<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    name: &str,
) -> Result<Vec<pb::Template>, Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT {COLUMNS} FROM templates WHERE tenant_id = $1 AND ($2 = '' OR name = $2) \
                 ORDER BY name, channel, campaign_id, locale LIMIT 1000"
            ),
            [tenant.into(), name.into()],
        ))
        .await
        .map_err(db_error)?;
    rows.iter().map(decode).collect()
}

/// The locales to try for `locale`, most specific first, ending with "any" (`it-IT`, `it`,
/// ``).
fn locale_chain(locale: &str) -> Vec<String> {
    let mut chain = Vec::new();
    let mut tag = locale.to_string();
    while !tag.is_empty() {
        chain.push(tag.clone());
        tag = tag
            .rsplit_once('-')
            .map(|(head, _)| head.to_string())
            .unwrap_or_default();
    }
    chain.push(String::new());
    chain
}

/// The template a message uses: the campaign's before the tenant default, each in the most
/// specific locale there is.
pub async fn resolve<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    name: &str,
    channel: pb::Channel,
    campaign: &str,
    locale: &str,
) -> Result<Option<pb::Template>, Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT {COLUMNS} FROM templates WHERE tenant_id = $1 AND name = $2 \
                 AND channel = $3 AND (campaign_id = $4 OR campaign_id = '')"
            ),
            [
                tenant.into(),
                name.into(),
                (channel as i32).into(),
                campaign.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    let found = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    let chain = locale_chain(locale);
    let mut campaigns = vec![campaign];
    if !campaign.is_empty() {
        campaigns.push("");
    }
    for c in campaigns {
        for l in &chain {
            if let Some(t) = found.iter().find(|t| t.campaign_id == c && &t.locale == l) {
                return Ok(Some(t.clone()));
            }
        }
    }
    Ok(None)
}

/// Checks a brand.
pub fn check_brand(v: &mut Violations, b: &pb::Brand) {
    if b.name.chars().count() > 200 {
        v.add("brand.name", "must be at most 200 characters");
    }
    if !b.from_email.is_empty() && b.from_email.parse::<lettre::Address>().is_err() {
        v.add("brand.from_email", "must be an e-mail address");
    }
    if b.from_name.chars().count() > 200 || b.from_name.contains(['\r', '\n']) {
        v.add(
            "brand.from_name",
            "must be one line of at most 200 characters",
        );
    }
    if b.variables.len() > 100 {
        v.add("brand.variables", "must hold at most 100 variables");
    }
    for (k, value) in &b.variables {
        if !is_name(k) || k.contains('-') {
            v.add(
                format!("brand.variables.{k}"),
                "names must be 1 to 64 of a-z, 0-9 and _",
            );
        }
        if value.len() > 10_000 {
            v.add(
                format!("brand.variables.{k}"),
                "must be at most 10000 bytes",
            );
        }
    }
}

/// Stores the brand.
pub async fn put_brand(
    txn: &DatabaseTransaction,
    tenant: &str,
    b: &pb::Brand,
    now: i64,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO brands (tenant_id, brand, updated_at) VALUES ($1, $2, $3) \
         ON CONFLICT (tenant_id) DO UPDATE SET brand = excluded.brand, \
         updated_at = excluded.updated_at",
        [tenant.into(), b.encode_to_vec().into(), now.into()],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

/// The tenant's brand (empty when never set).
pub async fn brand<C: ConnectionTrait>(conn: &C, tenant: &str) -> Result<pb::Brand, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT brand FROM brands WHERE tenant_id = $1",
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?;
    match row {
        None => Ok(pb::Brand::default()),
        Some(r) => {
            let bytes: Vec<u8> = r.try_get_by_index(0).map_err(db_error)?;
            pb::Brand::decode(bytes.as_slice()).map_err(Error::internal)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locales_fall_back_to_the_language_then_any() {
        assert_eq!(locale_chain("it-IT"), vec!["it-IT", "it", ""]);
        assert_eq!(locale_chain(""), vec![""]);
        assert!(is_locale("pt-BR") && is_locale("en") && !is_locale("EN") && !is_locale("e"));
    }

    #[test]
    fn syntax_errors_name_the_line_and_html_is_escaped() {
        let e = compile("body_text.txt", "Hello\n{{ customer.id ").expect_err("unclosed");
        assert!(e.starts_with("line 2"), "{e}");
        let html = render(
            "body.html",
            "<p>{{ name }}</p>",
            &serde_json::json!({"name": "<b>Ada</b>"}),
        )
        .expect("renders");
        assert_eq!(html, "<p>&lt;b&gt;Ada&lt;&#x2f;b&gt;</p>");
        // An `if` on a missing variable is false; printing one is an error.
        assert_eq!(
            render(
                "t.txt",
                "{% if code %}{{ code }}{% else %}none{% endif %}",
                &serde_json::json!({})
            ),
            Ok("none".into())
        );
        assert!(render("t.txt", "{{ code }}", &serde_json::json!({})).is_err());
    }
}
