//! Bounds on client input beyond sizes: the shape of metadata. (How many sessions a tenant may
//! hold is the store's to enforce, atomically: `ConversationStore::create_session_within`.)

use serde_json::Value;

use crate::domain::Metadata;
use crate::error::{AppError, Result};

/// How deep a value nests: a scalar is 0, an object or array one more than its deepest member.
/// Stops counting past `limit`, so a hostile value costs no more than the limit.
fn depth(value: &Value, limit: usize) -> usize {
    let deepest =
        |items: &mut dyn Iterator<Item = &Value>| items.map(|v| depth(v, limit - 1)).max().unwrap_or(0);
    match value {
        Value::Object(_) | Value::Array(_) if limit == 0 => 1,
        Value::Object(map) => 1 + deepest(&mut map.values()),
        Value::Array(items) => 1 + deepest(&mut items.iter()),
        _ => 0,
    }
}

/// 422 if metadata has more top-level keys or nests deeper than allowed (the object itself is
/// depth 1).
pub fn check_metadata_shape(metadata: &Metadata, max_depth: usize, max_keys: usize) -> Result<()> {
    if metadata.len() > max_keys {
        return Err(AppError::Validation(format!(
            "metadata has {} keys; the limit is {max_keys} (PARLEY_MAX_METADATA_KEYS)",
            metadata.len()
        )));
    }
    let nested = 1 + metadata.values().map(|v| depth(v, max_depth)).max().unwrap_or(0);
    if nested > max_depth {
        return Err(AppError::Validation(format!(
            "metadata nests deeper than {max_depth} levels (PARLEY_MAX_METADATA_DEPTH)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(value: Value) -> Metadata {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn depth_counts_objects_and_arrays() {
        assert_eq!(depth(&json!(1), 8), 0);
        assert_eq!(depth(&json!({"a": [1, {"b": 2}]}), 8), 3);
        assert_eq!(depth(&json!([[[[[[]]]]]]), 2), 3, "counting stops past the limit");
    }

    #[test]
    fn metadata_shape_is_bounded() {
        assert!(check_metadata_shape(&meta(json!({})), 1, 1).is_ok());
        assert!(check_metadata_shape(&meta(json!({"a": 1})), 1, 1).is_ok());
        assert!(check_metadata_shape(&meta(json!({"a": {"b": 1}})), 1, 8).is_err());
        assert!(check_metadata_shape(&meta(json!({"a": {"b": [1]}})), 3, 8).is_ok());
        assert!(check_metadata_shape(&meta(json!({"a": {"b": [[1]]}})), 3, 8).is_err());
        let err = check_metadata_shape(&meta(json!({"a": 1, "b": 2})), 8, 1).unwrap_err();
        assert!(err.to_string().contains("PARLEY_MAX_METADATA_KEYS"));
    }
}
