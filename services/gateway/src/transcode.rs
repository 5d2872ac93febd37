//! JSON ⇄ protobuf through the descriptor set: request bodies and answers are the services'
//! protobuf messages in their canonical JSON mapping (snake_case field names, enum names,
//! RFC 3339 times, 64-bit integers as numbers). One schema serves gRPC and HTTP; unknown
//! fields are refused with their path named.

use std::sync::LazyLock;

use axum::Json;
use axum::response::{IntoResponse, Response};
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};
use serde_json::Value;
use tessera_runtime::Error;

use crate::error::ApiError;

/// Every Tessera message and enum.
pub static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(tessera_proto::FILE_DESCRIPTOR_SET).expect("descriptor set decodes")
});

/// A JSON value as the protobuf message `name` (e.g. `tessera.catalog.v1.RewardInput`).
pub fn from_json<T: prost::Message + Default>(name: &str, value: Value) -> Result<T, ApiError> {
    let descriptor = POOL
        .get_message_by_name(name)
        .ok_or_else(|| Error::internal(format!("no message {name}")))?;
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(value, &mut track);
    let message =
        DynamicMessage::deserialize_with_options(descriptor, de, &DeserializeOptions::new())
            .map_err(|e| {
                let path = track.path().to_string();
                let field = if path == "." {
                    "body".to_string()
                } else {
                    path
                };
                Error::invalid_field(field, e.to_string())
            })?;
    message
        .transcode_to::<T>()
        .map_err(|e| Error::internal(format!("transcoding {name}: {e}")).into())
}

/// A protobuf message as JSON.
pub fn to_json<T: prost::Message>(name: &str, message: &T) -> Result<Value, ApiError> {
    let descriptor = POOL
        .get_message_by_name(name)
        .ok_or_else(|| Error::internal(format!("no message {name}")))?;
    let mut dynamic = DynamicMessage::new(descriptor);
    dynamic
        .transcode_from(message)
        .map_err(|e| Error::internal(format!("transcoding {name}: {e}")))?;
    let options = SerializeOptions::new()
        .stringify_64_bit_integers(false)
        .use_proto_field_name(true);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| Error::internal(format!("rendering {name}: {e}")).into())
}

/// `status` with the message `name` (fully qualified) as JSON.
pub fn reply<T: prost::Message>(
    status: http::StatusCode,
    name: &str,
    m: &T,
) -> Result<Response, ApiError> {
    Ok((status, Json(to_json(name, m)?)).into_response())
}

/// Sets `field` of a JSON object body (path and header values win over the body's).
pub fn with(mut body: Value, field: &str, value: impl Into<Value>) -> Value {
    if let Some(object) = body.as_object_mut() {
        object.insert(field.to_string(), value.into());
    }
    body
}

/// Messages of type `name` as JSON values (the `data` of a list answer).
pub fn to_json_list<T: prost::Message>(name: &str, list: &[T]) -> Result<Vec<Value>, ApiError> {
    list.iter().map(|x| to_json(name, x)).collect()
}
