//! Code patterns: `#` a digit, `?` a letter, `*` any character of the charset, anything
//! else literal; or prefix + N random characters + suffix. The named charsets leave out the
//! characters people confuse (0 O 1 I L).

use rand::Rng;
use tessera_proto::catalog::v1 as pb;
use tessera_runtime::error::Violations;

const DIGITS: &str = "23456789";
const LETTERS: &str = "ABCDEFGHJKMNPQRSTUVWXYZ";

/// Largest code length.
pub const MAX_CODE_LEN: usize = 64;

/// A checked pattern, ready to draw codes from.
#[derive(Debug, Clone)]
pub struct Pattern {
    slots: Vec<Vec<u8>>,
}

/// Whether `code` is a valid code: 1 to 64 of A-Z, 0-9, `-` and `_`.
pub fn is_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= MAX_CODE_LEN
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Codes are case-insensitive: stored and looked up in upper case.
pub fn normalize(code: &str) -> String {
    code.trim().to_ascii_uppercase()
}

fn literal(c: char) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-' || c == '_'
}

impl Pattern {
    /// Checks `p` (under `field`).
    pub fn parse(v: &mut Violations, field: &str, p: Option<&pb::CodePattern>) -> Option<Self> {
        let Some(p) = p else {
            v.add(field, "is required");
            return None;
        };
        let before = v.count();
        let charset: Vec<u8> = match p.charset.as_str() {
            "" | "alphanumeric" => format!("{DIGITS}{LETTERS}").into_bytes(),
            "alphabetic" => LETTERS.as_bytes().to_vec(),
            "numeric" => DIGITS.as_bytes().to_vec(),
            custom => {
                let mut chars: Vec<u8> = normalize(custom).into_bytes();
                chars.sort_unstable();
                chars.dedup();
                if chars.len() < 2 || !chars.iter().all(|&b| literal(char::from(b))) {
                    v.add(
                        format!("{field}.charset"),
                        "must be alphanumeric, alphabetic, numeric, or at least 2 of A-Z, 0-9, - and _",
                    );
                }
                chars
            }
        };
        let subset = |keep: fn(&u8) -> bool, default: &str| {
            let s: Vec<u8> = charset.iter().copied().filter(keep).collect();
            if s.is_empty() {
                default.as_bytes().to_vec()
            } else {
                s
            }
        };
        let digits = subset(u8::is_ascii_digit, DIGITS);
        let letters = subset(u8::is_ascii_uppercase, LETTERS);
        let fixed = |v: &mut Violations, name: &str, text: &str| -> Vec<Vec<u8>> {
            let text = normalize(text);
            if !text.chars().all(literal) {
                v.add(format!("{field}.{name}"), "may hold only A-Z, 0-9, - and _");
            }
            text.bytes().map(|b| vec![b]).collect()
        };
        let mut slots = Vec::new();
        if p.pattern.is_empty() {
            slots.extend(fixed(v, "prefix", &p.prefix));
            // (A length out of range builds nothing: 2^31 slots would exhaust memory.)
            if (4..=32).contains(&p.length) {
                slots.extend((0..p.length).map(|_| charset.clone()));
            } else {
                v.add(
                    format!("{field}.length"),
                    "must be 4 to 32 when there is no pattern",
                );
            }
            slots.extend(fixed(v, "suffix", &p.suffix));
        } else {
            if p.length != 0 || !p.prefix.is_empty() || !p.suffix.is_empty() {
                v.add(
                    format!("{field}.pattern"),
                    "cannot be combined with length, prefix or suffix",
                );
            }
            for c in p.pattern.chars() {
                match c {
                    '#' => slots.push(digits.clone()),
                    '?' => slots.push(letters.clone()),
                    '*' => slots.push(charset.clone()),
                    c if literal(c.to_ascii_uppercase()) => {
                        slots.push(vec![c.to_ascii_uppercase() as u8]);
                    }
                    _ => {
                        v.add(
                            format!("{field}.pattern"),
                            format!("`{c}` is neither #, ?, * nor A-Z, 0-9, - or _"),
                        );
                        break;
                    }
                }
            }
            if v.count() == before && !slots.iter().any(|s| s.len() > 1) {
                v.add(format!("{field}.pattern"), "needs at least one #, ? or *");
            }
        }
        if slots.len() > MAX_CODE_LEN {
            v.add(
                field,
                format!("yields codes longer than {MAX_CODE_LEN} characters"),
            );
        }
        (v.count() == before).then_some(Self { slots })
    }

    /// How many distinct codes the pattern can yield (saturating).
    pub fn capacity(&self) -> u128 {
        self.slots
            .iter()
            .fold(1u128, |n, s| n.saturating_mul(s.len() as u128))
    }

    /// A random code.
    pub fn draw(&self, rng: &mut impl Rng) -> String {
        self.slots
            .iter()
            .map(|s| char::from(s[rng.random_range(0..s.len())]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(p: pb::CodePattern) -> Result<Pattern, Vec<String>> {
        let mut v = Violations::new();
        let parsed = Pattern::parse(&mut v, "pattern", Some(&p));
        v.finish()
            .map(|()| parsed.expect("no violations"))
            .map_err(|e| e.field_violations.into_iter().map(|f| f.field).collect())
    }

    #[test]
    fn patterns_draw_matching_codes_without_ambiguous_characters() {
        let p = parse(pb::CodePattern {
            pattern: "XMAS-####-????".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.capacity(), 8u128.pow(4) * 23u128.pow(4));
        let mut rng = rand::rng();
        for _ in 0..200 {
            let code = p.draw(&mut rng);
            assert_eq!(code.len(), 14);
            assert!(code.starts_with("XMAS-"));
            assert!(code[5..9].bytes().all(|b| DIGITS.as_bytes().contains(&b)));
            assert!(code[10..].bytes().all(|b| LETTERS.as_bytes().contains(&b)));
            assert!(is_code(&code));
        }
        let p = parse(pb::CodePattern {
            length: 8,
            prefix: "sum-".into(),
            charset: "numeric".into(),
            ..Default::default()
        })
        .unwrap();
        let code = p.draw(&mut rng);
        assert!(code.starts_with("SUM-") && code.len() == 12, "{code}");
        assert!(!code.contains(['0', '1', 'O', 'I', 'L']));
    }

    #[test]
    fn bad_patterns_name_the_field() {
        let bad = |p: pb::CodePattern| parse(p).unwrap_err();
        assert_eq!(
            bad(pb::CodePattern {
                length: 2,
                ..Default::default()
            }),
            ["pattern.length"]
        );
        // Refused before anything of that size is built.
        assert_eq!(
            bad(pb::CodePattern {
                length: u32::MAX,
                ..Default::default()
            }),
            ["pattern.length"]
        );
        assert_eq!(
            bad(pb::CodePattern {
                pattern: "AB%#".into(),
                ..Default::default()
            }),
            ["pattern.pattern"]
        );
        assert_eq!(
            bad(pb::CodePattern {
                pattern: "FIXED".into(),
                ..Default::default()
            }),
            ["pattern.pattern"]
        );
        assert_eq!(
            bad(pb::CodePattern {
                length: 6,
                charset: "a".into(),
                ..Default::default()
            }),
            ["pattern.charset"]
        );
    }
}
