//! A TOML document as a tree of values that remember where they came from,
//! so that every later check can point at a line and column.

use crate::diag::{Diagnostic, Origin};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A value with its origin.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Where the value was written.
    pub origin: Origin,
    /// The value.
    pub value: Value,
}

/// A key of a table with its origin.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// Where the key was written.
    pub key_origin: Origin,
    /// Its value.
    pub node: Node,
}

/// A TOML value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// An integer outside the `i64` range, kept as its digits (with sign) so
    /// that a message can name it.
    BigInt(String),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A date-time, kept as text.
    Datetime(String),
    /// An array.
    Array(Vec<Node>),
    /// A table, in key order.
    Table(Vec<Entry>),
}

impl Value {
    /// The TOML name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Str(_) => "string",
            Value::Int(_) | Value::BigInt(_) => "integer",
            Value::Float(_) => "float",
            Value::Bool(_) => "boolean",
            Value::Datetime(_) => "datetime",
            Value::Array(_) => "array",
            Value::Table(_) => "table",
        }
    }

    /// The value as JSON (stage configs cross the plugin boundary as JSON).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Str(s) | Value::Datetime(s) | Value::BigInt(s) => {
                serde_json::Value::String(s.clone())
            }
            Value::Int(i) => (*i).into(),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Bool(b) => (*b).into(),
            Value::Array(items) => items.iter().map(|n| n.value.to_json()).collect(),
            Value::Table(entries) => serde_json::Value::Object(
                entries
                    .iter()
                    .map(|e| (e.key.clone(), e.node.value.to_json()))
                    .collect(),
            ),
        }
    }

    /// Renders the value as TOML text (for `--set` round trips and messages).
    pub fn to_toml_text(&self) -> String {
        match self {
            Value::Str(s) => toml_string(s),
            Value::Datetime(s) | Value::BigInt(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => {
                let s = f.to_string();
                if s.contains(['.', 'e', 'n', 'i']) {
                    s
                } else {
                    format!("{s}.0")
                }
            }
            Value::Bool(b) => b.to_string(),
            Value::Array(items) => {
                let parts: Vec<String> = items.iter().map(|n| n.value.to_toml_text()).collect();
                format!("[{}]", parts.join(", "))
            }
            Value::Table(entries) => {
                let parts: Vec<String> = entries
                    .iter()
                    .map(|e| format!("{} = {}", toml_key(&e.key), e.node.value.to_toml_text()))
                    .collect();
                format!("{{ {} }}", parts.join(", "))
            }
        }
    }
}

/// Quotes a TOML basic string.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A bare key where TOML allows one, else a quoted key.
pub fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        toml_string(k)
    }
}

/// Parses a TOML document, collecting every syntax error.
pub fn parse_document(text: &str) -> Result<Node, Vec<Diagnostic>> {
    let (table, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        return Err(errors
            .iter()
            .map(|e| {
                let span = e.span().unwrap_or(0..0);
                Diagnostic::at(span, format!("TOML syntax error: {}", e.message().trim()))
            })
            .collect());
    }
    let span = table.span();
    Ok(Node {
        origin: Origin::File(span),
        value: convert_table(table.into_inner()),
    })
}

/// Parses a single TOML value (for `--set KEY=VALUE`); `None` if it is not one.
pub fn parse_value(text: &str, origin: &Origin) -> Option<Node> {
    let parsed = DeValue::parse(text).ok()?;
    let mut node = convert(parsed);
    reorigin(&mut node, origin);
    Some(node)
}

fn reorigin(node: &mut Node, origin: &Origin) {
    node.origin = origin.clone();
    match &mut node.value {
        Value::Array(items) => items.iter_mut().for_each(|n| reorigin(n, origin)),
        Value::Table(entries) => entries.iter_mut().for_each(|e| {
            e.key_origin = origin.clone();
            reorigin(&mut e.node, origin)
        }),
        _ => {}
    }
}

fn convert_table(table: DeTable<'_>) -> Value {
    Value::Table(
        table
            .into_iter()
            .map(|(k, v)| {
                let key_span = k.span();
                let mut node = convert(v);
                // A table opened by a header (`[stages.a.config.x]`) spans the
                // whole header, from its `[`: point at its own key instead, so
                // that a message about it names the right line and column.
                if let (Origin::File(span), Value::Table(_)) = (&node.origin, &node.value) {
                    if span.start < key_span.start {
                        node.origin = Origin::File(key_span.clone());
                    }
                }
                Entry {
                    key_origin: Origin::File(key_span),
                    key: k.into_inner().into_owned(),
                    node,
                }
            })
            .collect(),
    )
}

fn convert(v: Spanned<DeValue<'_>>) -> Node {
    let origin = Origin::File(v.span());
    let value = match v.into_inner() {
        DeValue::String(s) => Value::Str(s.into_owned()),
        DeValue::Integer(i) => {
            let digits = i.as_str().replace('_', "");
            match i64::from_str_radix(&digits, i.radix()) {
                Ok(n) => Value::Int(n),
                Err(_) => Value::BigInt(match i.radix() {
                    16 => format!("0x{digits}"),
                    8 => format!("0o{digits}"),
                    2 => format!("0b{digits}"),
                    _ => digits,
                }),
            }
        }
        DeValue::Float(f) => {
            let text = f.as_str().replace('_', "");
            Value::Float(match text.trim_start_matches(['+', '-']) {
                "inf" => f64::INFINITY.copysign(if text.starts_with('-') { -1.0 } else { 1.0 }),
                "nan" => f64::NAN,
                _ => text.parse().unwrap_or(f64::NAN),
            })
        }
        DeValue::Boolean(b) => Value::Bool(b),
        DeValue::Datetime(d) => Value::Datetime(d.to_string()),
        DeValue::Array(a) => Value::Array(a.into_iter().map(convert).collect()),
        DeValue::Table(t) => convert_table(t),
    };
    Node { origin, value }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_spans_of_keys_and_values() {
        let text = "[a]\nx = 1\ny = [\"s\", 2.5]\n";
        let doc = parse_document(text).unwrap();
        let Value::Table(top) = doc.value else {
            panic!()
        };
        let Value::Table(a) = &top[0].node.value else {
            panic!()
        };
        assert_eq!(a[0].key, "x");
        assert_eq!(a[0].key_origin, Origin::File(4..5));
        assert_eq!(a[0].node.value, Value::Int(1));
        assert_eq!(a[1].node.value.to_toml_text(), "[\"s\", 2.5]");
    }

    #[test]
    fn a_table_opened_by_a_header_is_located_at_its_key() {
        let text = "[a]\nb = 1\n[a.c.d]\ne = 1\n";
        let doc = parse_document(text).unwrap();
        let Value::Table(top) = doc.value else {
            panic!()
        };
        let Value::Table(a) = &top[0].node.value else {
            panic!()
        };
        let c = a.iter().find(|e| e.key == "c").unwrap();
        let Value::Table(c_entries) = &c.node.value else {
            panic!()
        };
        // `d` is written at bytes 15..16 of `[a.c.d]`, which starts at 10.
        assert_eq!(c_entries[0].node.origin, Origin::File(15..16));
        // An inline table keeps its own span.
        let doc = parse_document("x = { y = 1 }\n").unwrap();
        let Value::Table(top) = doc.value else {
            panic!()
        };
        assert_eq!(top[0].node.origin, Origin::File(4..13));
    }

    #[test]
    fn integers_beyond_i64_keep_their_digits() {
        let doc = parse_document("a = 99999999999999999999\nb = -9223372036854775808\n").unwrap();
        let Value::Table(top) = doc.value else {
            panic!()
        };
        assert_eq!(
            top[0].node.value,
            Value::BigInt("99999999999999999999".into())
        );
        assert_eq!(top[0].node.value.type_name(), "integer");
        assert_eq!(top[1].node.value, Value::Int(i64::MIN));
    }

    #[test]
    fn collects_syntax_errors() {
        let errors = parse_document("a = \nb = ]\n").unwrap_err();
        assert!(!errors.is_empty());
        assert!(errors[0].message.starts_with("TOML syntax error"));
    }
}
