//! Rules: CEL expressions compiled and type-checked once when saved, then evaluated many
//! times against a customer's facts.
//!
//! The `cel` crate parses and interprets; it has no type checker, so [`check`] walks the
//! parsed tree against the declared shape of the context ([`Schema`]): unknown variables,
//! unknown fields (e.g. an undeclared customer attribute) and operators applied to the wrong
//! types are refused with their position, before anything is stored. Size and depth are
//! bounded, and comprehensions may nest at most twice, so an evaluation costs at most
//! (cart lines)² steps.
//!
//! The context a rule sees:
//! * `customer`: `id`, `country`, `city`, `birthday` (timestamp, epoch when unknown), `tags`,
//!   `consents` (map string → bool), `created_at`, `attributes.<declared name>`, and the
//!   aggregates `lifetime_spend`, `spend_30d|90d|365d`, `orders_total`, `orders_30d|90d|365d`,
//!   `last_order_at` (epoch when none), `events_30d|90d|365d` (map type → count) and
//!   `redemptions` (map campaign → count). Amounts are minor units.
//! * `order`: the cart: `currency`, `subtotal`, `total` (= subtotal; discounts are not known
//!   when rules run), `shipping`, `quantity`, `lines` (each `sku`, `categories`, `collections`,
//!   `quantity`, `unit_price`, `total`, `on_sale`).
//! * `event`: `type`, `properties` (map), `occurred_at`.
//! * `segments`: the ids of the customer's segments. `tier`: the customer's tier code or "".
//! * `now`: a timestamp at the tenant's UTC offset, so `now.getHours()` is local time;
//!   `now.getHours("Europe/Rome")` reads any other zone.
//! * `campaign`: `id`, `redemptions`, `discount_total`, `customer_redemptions`.

use std::fmt;
use std::sync::{Arc, LazyLock};

use cel::common::ast::{Expr, IdedExpr, LiteralValue};
use cel::{Env, Program};

mod check;
mod schema;

use self::check::*;
pub use self::schema::*;

/// Longest rule source accepted.
pub const MAX_SOURCE: usize = 4096;
/// Most nodes in a rule's tree (after macro expansion).
pub const MAX_NODES: usize = 1000;
/// Deepest nesting of a rule's tree.
pub const MAX_DEPTH: usize = 40;
/// Most nested comprehensions (`exists`, `all`, `map`, `filter`).
pub const MAX_LOOP_NESTING: usize = 2;

/// The CEL environment every rule is compiled and run with.
pub static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// Why a rule was refused: the message and where (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub message: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// A compiled, type-checked rule.
#[derive(Debug)]
pub struct Rule {
    pub source: String,
    pub program: Program,
    /// Top-level variables it reads.
    pub reads: Vec<String>,
    /// The event type the rule requires (`event.type == "…"` as a top-level conjunct), so
    /// an index can skip it for other events without evaluating it.
    pub event_type: Option<String>,
}

/// The literal `event.type` is compared with in a top-level conjunct of `e`, if any.
fn required_event_type(e: &IdedExpr) -> Option<String> {
    let Expr::Call(call) = &e.expr else {
        return None;
    };
    match (call.func_name.as_str(), call.args.as_slice()) {
        ("_&&_", [a, b]) => required_event_type(a).or_else(|| required_event_type(b)),
        ("_==_", [a, b]) => {
            let is_event_type = |x: &IdedExpr| {
                matches!(&x.expr, Expr::Select(s) if !s.test && s.field == "type"
                    && matches!(&s.operand.expr, Expr::Ident(n) if n == "event"))
            };
            let literal = |x: &IdedExpr| match &x.expr {
                Expr::Literal(LiteralValue::String(v)) => Some(v.inner().to_string()),
                _ => None,
            };
            if is_event_type(a) {
                literal(b)
            } else if is_event_type(b) {
                literal(a)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Stack for parsing: the parser and the tree it builds recurse once per nesting level, and
/// a hostile rule within [`MAX_SOURCE`] can nest thousands deep. The type check then refuses
/// anything deeper than [`MAX_DEPTH`], which bounds evaluation on ordinary threads.
const PARSE_STACK: usize = 256 << 20;

/// Compiles and type-checks `source` against `schema`; the rule must be a bool. Runs on a
/// thread of its own with a large (virtual, lazily mapped) stack; see [`PARSE_STACK`].
pub fn compile(source: &str, schema: &Schema) -> Result<Rule, RuleError> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("rule-compiler".into())
            .stack_size(PARSE_STACK)
            .spawn_scoped(scope, || compile_here(source, schema))
            .map_err(|e| RuleError {
                message: format!("cannot compile now: {e}"),
                line: 1,
                column: 1,
            })?
            .join()
            .unwrap_or_else(|_| {
                Err(RuleError {
                    message: "the rule could not be parsed".into(),
                    line: 1,
                    column: 1,
                })
            })
    })
}

fn compile_here(source: &str, schema: &Schema) -> Result<Rule, RuleError> {
    if source.trim().is_empty() {
        return Err(RuleError {
            message: "is empty".into(),
            line: 1,
            column: 1,
        });
    }
    if source.len() > MAX_SOURCE {
        return Err(RuleError {
            message: format!("is longer than {MAX_SOURCE} bytes"),
            line: 1,
            column: 1,
        });
    }
    let program = ENV.compile(source).map_err(|errors| {
        let first = errors.errors.first();
        RuleError {
            message: first.map_or_else(|| "does not parse".into(), |e| e.msg.clone()),
            line: first.map_or(1, |e| usize::try_from(e.pos.0).unwrap_or(0).max(1)),
            column: first.map_or(1, |e| usize::try_from(e.pos.1).unwrap_or(0).max(1)),
        }
    })?;
    let mut checker = Checker {
        schema,
        scopes: Vec::new(),
        nodes: 0,
        loops: 0,
        reads: Vec::new(),
    };
    let root = program.expression();
    let ty = checker
        .check(root, 1)
        .map_err(|(id, message)| locate(&program, source, id, message))?;
    if !matches!(ty, Ty::Bool | Ty::Dyn) {
        return Err(locate(
            &program,
            source,
            root.id,
            format!("a rule must be a bool, this one is {ty}"),
        ));
    }
    let mut reads = checker.reads;
    reads.sort();
    reads.dedup();
    let event_type = required_event_type(program.expression());
    Ok(Rule {
        source: source.to_string(),
        program,
        reads,
        event_type,
    })
}

fn locate(program: &Program, source: &str, id: u64, message: String) -> RuleError {
    let offset = program
        .source_info()
        .offset_for(id)
        .map_or(0, |(start, _)| start as usize);
    let before: Vec<char> = source.chars().take(offset).collect();
    let line = 1 + before.iter().filter(|c| **c == '\n').count();
    let column = 1 + before.iter().rev().take_while(|c| **c != '\n').count();
    RuleError {
        message,
        line,
        column,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn schema() -> Schema {
        Schema::new(
            &BTreeMap::from([
                ("vip".to_string(), AttrType::Bool),
                ("score".to_string(), AttrType::Number),
            ]),
            Scope::Campaign,
        )
    }

    #[test]
    fn the_issue_examples_compile() {
        for rule in [
            r#"customer.spend_365d >= 100000 && customer.country == "GB""#,
            "order.total > 10000",
            r#"order.lines.exists(l, l.sku == "IPHONE-X")"#,
            r#"event.type == "newsletter_signup""#,
            r#"now.getDayOfWeek("Europe/Rome") == 5 && now.getHours("Europe/Rome") >= 17 && now.getHours("Europe/Rome") < 19"#,
            r#""vip" in segments && tier == "gold""#,
            "customer.attributes.vip && customer.attributes.score > 2.5",
            r#"customer.events_30d["review"] >= 2 || has(customer.events_30d.like)"#,
            "order.lines.all(l, l.categories.exists(c, c == 'phones'))",
            "campaign.customer_redemptions < 1 && size(customer.tags) > 0",
            "now - customer.last_order_at > duration('720h')",
        ] {
            let r = compile(rule, &schema());
            assert!(r.is_ok(), "{rule}: {r:?}");
        }
    }

    #[test]
    fn a_required_event_type_is_found_for_the_index() {
        let found = |rule: &str| compile(rule, &schema()).expect(rule).event_type;
        assert_eq!(
            found(r#"event.type == "review""#).as_deref(),
            Some("review")
        );
        assert_eq!(
            found(r#"order.total > 1 && ("like" == event.type && true)"#).as_deref(),
            Some("like")
        );
        assert_eq!(found(r#"event.type == "a" || order.total > 1"#), None);
        assert_eq!(found(r#"event.type != "a""#), None);
    }

    #[test]
    fn errors_name_the_position() {
        let cases = [
            (
                "customer.attributes.tier == 'x'",
                "unknown attribute 'tier'",
                1,
                20,
            ),
            (
                "order.total > 'ten'",
                "'>' cannot be applied to (int, string)",
                1,
                13,
            ),
            (
                "order.total + 1",
                "a rule must be a bool, this one is int",
                1,
                13,
            ),
            ("basket.total > 1", "unknown variable 'basket'", 1, 1),
            ("customer.nope", "customer has no field 'nope'", 1, 9),
            ("order.total >", "", 1, 14),
            ("frobnicate(1)", "unknown function 'frobnicate'", 1, 11),
            ("true &&\n  order.lines.size() == 'x'", "'==' cannot", 2, 22),
        ];
        for (rule, message, line, column) in cases {
            let err = compile(rule, &schema()).expect_err(rule);
            assert!(err.message.contains(message), "{rule}: {err}");
            assert_eq!((err.line, err.column), (line, column), "{rule}: {err}");
        }
    }

    #[test]
    fn limits_bound_the_cost() {
        let long = vec!["order.total > 1"; 400].join(" && ");
        assert!(compile(&long, &schema()).is_err());
        let nested = "order.lines.exists(a, order.lines.exists(b, order.lines.exists(c, a == b)))";
        let err = compile(nested, &schema()).unwrap_err();
        assert!(err.message.contains("comprehensions nest"), "{err}");
        // Parentheses build no nodes; nested lists do.
        let parens = format!("{}true{}", "(".repeat(60), ")".repeat(60));
        assert!(compile(&parens, &schema()).is_ok());
        let lists = format!("size({}1{}) == 1", "[".repeat(60), "]".repeat(60));
        assert!(compile(&lists, &schema()).is_err());
        let deeper = format!("{}true{}", "[".repeat(2000), "]".repeat(2000));
        assert!(compile(&deeper, &schema()).is_err());
        let long_sum = format!("{} == 1", vec!["1"; 2000].join("+"));
        let err = compile(&long_sum, &schema()).unwrap_err();
        assert!(
            err.message.contains("deeper than") || err.message.contains("too large"),
            "{err}"
        );
        assert!(compile("  ", &schema()).is_err());
    }

    fn at(rfc3339: &str) -> cel::Value {
        cel::Value::Timestamp(chrono::DateTime::parse_from_rfc3339(rfc3339).expect("time"))
    }

    #[test]
    fn friday_evening_in_rome_is_judged_in_rome() {
        let rule = compile(
            r#"now.getDayOfWeek("Europe/Rome") == 5 && now.getHours("Europe/Rome") >= 17 && now.getHours("Europe/Rome") < 19"#,
            &schema(),
        )
        .expect("compiles");
        for (now, expected) in [
            ("2026-11-27T16:30:00Z", true),       // Friday 17:30 in Rome (UTC+1)
            ("2026-11-27T17:59:59Z", true),       // Friday 18:59:59
            ("2026-11-27T18:00:00Z", false),      // Friday 19:00
            ("2026-11-27T15:30:00Z", false),      // Friday 16:30
            ("2026-11-26T16:30:00Z", false),      // Thursday 17:30
            ("2026-07-03T15:30:00Z", true),       // Friday 17:30 in summer (UTC+2)
            ("2026-11-27T23:30:00-08:00", false), // Saturday 08:30 in Rome
        ] {
            let mut ctx = cel::Context::with_env(ENV.clone());
            ctx.add_variable_from_value("now", at(now));
            assert_eq!(
                rule.program.execute(&ctx),
                Ok(cel::Value::Bool(expected)),
                "{now}"
            );
        }
    }

    #[test]
    fn segment_rules_see_only_the_customer() {
        let s = Schema::new(&BTreeMap::new(), Scope::Segment);
        assert!(compile("customer.orders_90d > 2", &s).is_ok());
        let err = compile("order.total > 1", &s).unwrap_err();
        assert!(err.message.contains("unknown variable 'order'"), "{err}");
    }
}
