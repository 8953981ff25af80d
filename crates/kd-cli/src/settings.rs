//! What differs between the settings a run was started with and the ones given now, so that
//! `distill --resume` and `rationales --resume` can refuse to mix the two and say why.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Every setting (dotted key for nested tables, e.g. `data.test_size`) whose value differs
/// between `before` and `now`, as `key: OLD in the PLACE, NEW now`; a key only one side has
/// reads `unset` on the other.
pub(crate) fn differences(before: &Value, now: &Value, place: &str) -> Vec<String> {
    let (old, new) = (flatten(before), flatten(now));
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let unset = "unset".to_owned();
    keys.into_iter()
        .filter_map(|key| {
            let a = old.get(key).unwrap_or(&unset);
            let b = new.get(key).unwrap_or(&unset);
            (a != b).then(|| format!("{key}: {a} in the {place}, {b} now"))
        })
        .collect()
}

/// The leaves of `value` by dotted key, each written as JSON.
fn flatten(value: &Value) -> BTreeMap<String, String> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    let key = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&key, value, out);
                }
            }
            leaf => {
                out.insert(prefix.to_owned(), leaf.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", value, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_changed_added_and_removed_keys_are_named() {
        let before = serde_json::json!({"data": {"seed": 1, "size": 5}, "name": "a", "gone": 2});
        let now = serde_json::json!({"data": {"seed": 1, "size": 6}, "name": "b", "new": [1]});
        assert_eq!(
            differences(&before, &now, "file"),
            [
                "data.size: 5 in the file, 6 now",
                "gone: 2 in the file, unset now",
                "name: \"a\" in the file, \"b\" now",
                "new: unset in the file, [1] now",
            ]
        );
        assert!(differences(&before, &before, "file").is_empty());
    }
}
