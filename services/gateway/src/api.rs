//! The route table and its OpenAPI 3.1 document, built by the same calls: a route is added
//! with [`Api::add`] and an [`Op`] that says what it is (summary, the roles it serves, its
//! parameters, body and answers). So no route is served undocumented, and the roles a route
//! documents (`x-roles`) are the roles it enforces: the route carries them as [`Allowed`],
//! which the [`Principal`](crate::keys::Principal) extractor checks.
//!
//! Protobuf bodies and answers are documented from the descriptor set that transcodes them
//! ([`crate::transcode::POOL`]), one component per message and enum, so the document and
//! the wire cannot disagree; hand-written JSON is documented by utoipa's derives on the
//! types that are serialized. Every operation lists its errors in the one error shape.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Router;
use axum::handler::Handler;
use axum::routing::MethodRouter;
use prost_reflect::{Kind, MessageDescriptor};
use utoipa::openapi::path::{OperationBuilder, Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, KnownFormat, ObjectBuilder, Schema, SchemaFormat,
    SchemaType, Type,
};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::tag::TagBuilder;
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, HttpMethod, InfoBuilder, OpenApi, OpenApiBuilder, Paths,
    Ref, RefOr, Required, ResponseBuilder, Responses,
};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::keys::Role;
use crate::transcode::POOL;

/// Where the state before a write is read: (method, route) → the route that shows the
/// object, with the same parameters.
pub type Reads = std::collections::HashMap<(String, String), &'static str>;

/// The roles a route serves, carried in the request's extensions for the
/// [`Principal`](crate::keys::Principal) extractor to check.
#[derive(Debug, Clone, Copy)]
pub struct Allowed(pub &'static [Role]);

/// What a body or answer is.
pub enum Content {
    /// JSON with this schema.
    Json(Box<RefOr<Schema>>),
    /// `text/csv`.
    Csv,
    /// `text/html`.
    Html,
    /// `text/plain`.
    Text,
    /// No content.
    Empty,
}

/// One route: how it is served and how it is documented.
pub struct Op {
    /// The method, and its name in lower case.
    method: (HttpMethod, &'static str),
    path: &'static str,
    route: MethodRouter<Arc<AppState>>,
    summary: &'static str,
    description: Option<&'static str>,
    roles: Option<&'static [Role]>,
    idempotent: bool,
    before: Option<&'static str>,
    body: Option<Content>,
    body_required: bool,
    path_enums: Vec<(&'static str, &'static [&'static str])>,
    answers: Vec<(u16, &'static str, Content)>,
    params: Vec<Parameter>,
    schemas: Vec<(String, RefOr<Schema>)>,
    protos: Vec<String>,
}

macro_rules! methods {
    ($($name:ident => $method:ident, $routing:ident;)*) => {$(
        #[doc = concat!("A `", stringify!($method), "` route served by `handler`.")]
        pub fn $name<H, T>(path: &'static str, handler: H) -> Self
        where
            H: Handler<T, Arc<AppState>>,
            T: 'static,
        {
            Self::new(
                (HttpMethod::$method, stringify!($name)),
                path,
                axum::routing::$routing(handler),
            )
        }
    )*};
}

impl Op {
    methods! {
        get => Get, get;
        post => Post, post;
        put => Put, put;
        delete => Delete, delete;
    }

    fn new(
        method: (HttpMethod, &'static str),
        path: &'static str,
        route: MethodRouter<Arc<AppState>>,
    ) -> Self {
        Self {
            method,
            path,
            route,
            summary: "",
            description: None,
            roles: None,
            idempotent: false,
            before: None,
            body: None,
            body_required: true,
            path_enums: Vec::new(),
            answers: Vec::new(),
            params: Vec::new(),
            schemas: Vec::new(),
            protos: Vec::new(),
        }
    }

    /// One line: what the route does.
    pub fn summary(mut self, summary: &'static str) -> Self {
        self.summary = summary;
        self
    }

    /// More about it.
    pub fn describe(mut self, description: &'static str) -> Self {
        self.description = Some(description);
        self
    }

    /// The roles it serves (an API key is required); without this the route is public.
    pub fn roles(mut self, roles: &'static [Role]) -> Self {
        self.roles = Some(roles);
        self
    }

    /// A write that takes the `Idempotency-Key` header.
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// The route that shows the object this write changes (`/v1/rewards/{id}` for
    /// `PUT /v1/rewards/{id}/status`), read into the audit log as the state before.
    pub fn before(mut self, read: &'static str) -> Self {
        self.before = Some(read);
        self
    }

    /// Query parameters, from the type the handler parses them into.
    pub fn query<T: IntoParams>(mut self) -> Self {
        self.params
            .extend(T::into_params(|| Some(ParameterIn::Query)));
        self
    }

    /// A JSON body of type `T`.
    pub fn body<T: ToSchema>(mut self) -> Self {
        self.body = Some(Content::Json(Box::new(self.typed::<T>())));
        self
    }

    /// A JSON body of type `T` that may be left out.
    pub fn body_optional<T: ToSchema>(mut self) -> Self {
        self.body_required = false;
        self.body::<T>()
    }

    /// Path parameter `name` takes one of `values`.
    pub fn path_enum(mut self, name: &'static str, values: &'static [&'static str]) -> Self {
        self.path_enums.push((name, values));
        self
    }

    /// A JSON body: the protobuf message `name` (e.g. `tessera.catalog.v1.RewardInput`)
    /// without the fields the route sets itself from its path and headers.
    pub fn body_proto(mut self, name: &str, set_by_route: &[&str]) -> Self {
        let schema = if set_by_route.is_empty() {
            self.proto(name)
        } else {
            let descriptor = message(name);
            self.protos.extend(referenced(&descriptor));
            RefOr::T(message_schema(&descriptor, set_by_route))
        };
        self.body = Some(Content::Json(Box::new(schema)));
        self
    }

    /// A `text/csv` body.
    pub fn body_csv(mut self) -> Self {
        self.body = Some(Content::Csv);
        self
    }

    /// Answers `status` with a JSON `T`.
    pub fn answer<T: ToSchema>(mut self, status: u16, description: &'static str) -> Self {
        let schema = self.typed::<T>();
        self.answers
            .push((status, description, Content::Json(Box::new(schema))));
        self
    }

    /// Answers `status` with the protobuf message `name` as JSON.
    pub fn answer_proto(mut self, status: u16, description: &'static str, name: &str) -> Self {
        let schema = self.proto(name);
        self.answers
            .push((status, description, Content::Json(Box::new(schema))));
        self
    }

    /// Answers `status` with the protobuf message `name` and one more property, `extra`: a
    /// list of the protobuf message `item`.
    pub fn answer_proto_with(
        mut self,
        status: u16,
        description: &'static str,
        name: &str,
        extra: &str,
        item: &str,
    ) -> Self {
        let descriptor = message(name);
        self.protos.extend(referenced(&descriptor));
        let mut schema = message_schema(&descriptor, &[]);
        let item = self.proto(item);
        if let Schema::Object(object) = &mut schema {
            object.properties.insert(
                extra.to_string(),
                RefOr::T(Schema::Array(ArrayBuilder::new().items(item).build())),
            );
        }
        self.answers.push((
            status,
            description,
            Content::Json(Box::new(RefOr::T(schema))),
        ));
        self
    }

    /// Answers 200 with a page of protobuf messages `name`.
    pub fn answer_page(mut self, name: &str) -> Self {
        let item = self.proto(name);
        self.answers.push((
            200,
            "A page, in order.",
            Content::Json(Box::new(page_of(item))),
        ));
        self
    }

    /// Answers `status` with any other content.
    pub fn answer_with(mut self, status: u16, description: &'static str, content: Content) -> Self {
        self.answers.push((status, description, content));
        self
    }

    /// A reference to the component of protobuf message or enum `name`.
    pub fn proto(&mut self, name: &str) -> RefOr<Schema> {
        self.protos.push(name.to_string());
        proto_ref(name)
    }

    /// `T`'s schema, inline, with the components it refers to kept for the document.
    fn typed<T: ToSchema>(&mut self) -> RefOr<Schema> {
        T::schemas(&mut self.schemas);
        T::schema()
    }

    /// The operation, with the components it needs added to `schemas` and `protos`.
    fn operation(
        self,
        tag: &str,
        schemas: &mut BTreeMap<String, RefOr<Schema>>,
        protos: &mut BTreeSet<String>,
    ) -> utoipa::openapi::path::Operation {
        let mut parameters: Vec<Parameter> = path_params(self.path, &self.path_enums);
        parameters.extend(self.params);
        if self.idempotent {
            parameters.push(
                ParameterBuilder::new()
                    .name("Idempotency-Key")
                    .parameter_in(ParameterIn::Header)
                    .required(Required::True)
                    .description(Some(
                        "Makes the write safe to retry: the same key and body replay the \
                         first answer; the same key with another body is refused (422); \
                         while the first is in flight, 409.",
                    ))
                    .schema(Some(
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .min_length(Some(1))
                            .max_length(Some(255))
                            .pattern(Some("^[!-~]+$")),
                    ))
                    .build(),
            );
        }
        let mut responses = Responses::new();
        for (status, description, content) in self.answers {
            responses
                .responses
                .insert(status.to_string(), RefOr::T(response(description, content)));
        }
        for (status, description) in errors(
            self.roles.is_some(),
            self.body.is_some(),
            self.idempotent,
            self.path.contains('{'),
        ) {
            responses
                .responses
                .entry(status.to_string())
                .or_insert_with(|| {
                    RefOr::T(response(description, Content::Json(Box::new(error_ref()))))
                });
        }
        responses.responses.insert(
            "default".into(),
            RefOr::T(response(
                "Any other error, in the same shape.",
                Content::Json(Box::new(error_ref())),
            )),
        );
        let mut operation = OperationBuilder::new()
            .tag(tag)
            .summary(Some(self.summary))
            .operation_id(Some(operation_id(self.method.1, self.path)))
            .parameters(Some(parameters))
            .responses(responses);
        let mut description = self.description.unwrap_or_default().to_string();
        match self.roles {
            Some(roles) => {
                let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
                if !description.is_empty() {
                    description.push_str("\n\n");
                }
                description.push_str(&format!("Roles: {}.", names.join(", ")));
                operation = operation
                    .security(SecurityRequirement::new("api_key", Vec::<String>::new()))
                    .extensions(Some(
                        utoipa::openapi::extensions::ExtensionsBuilder::new()
                            .add("x-roles", serde_json::json!(names))
                            .build(),
                    ));
            }
            None => {
                operation = operation.securities(Some(Vec::new()));
            }
        }
        if !description.is_empty() {
            operation = operation.description(Some(description));
        }
        if let Some((media, schema)) = self.body.and_then(media) {
            let required = if self.body_required {
                Required::True
            } else {
                Required::False
            };
            let request = RequestBodyBuilder::new()
                .required(Some(required))
                .content(media, ContentBuilder::new().schema(schema).build());
            operation = operation.request_body(Some(request.build()));
        }
        schemas.extend(self.schemas);
        protos.extend(self.protos);
        operation.build()
    }
}

/// The routes and their document, built together.
pub struct Api {
    router: Router<Arc<AppState>>,
    reads: Reads,
    paths: Paths,
    schemas: BTreeMap<String, RefOr<Schema>>,
    protos: BTreeSet<String>,
    tags: Vec<(&'static str, &'static str)>,
}

impl Default for Api {
    fn default() -> Self {
        Self {
            router: Router::new(),
            reads: Reads::new(),
            paths: Paths::new(),
            schemas: BTreeMap::new(),
            protos: BTreeSet::new(),
            tags: Vec::new(),
        }
    }
}

impl Api {
    /// Starts a group of routes (an OpenAPI tag); the routes added next belong to it.
    pub fn tag(&mut self, name: &'static str, description: &'static str) -> &mut Self {
        self.tags.push((name, description));
        self
    }

    /// Serves `op` and documents it.
    pub fn add(&mut self, mut op: Op) -> &mut Self {
        let tag = self.tags.last().map_or("other", |t| t.0);
        let (path, method) = (op.path, op.method.0.clone());
        if let Some(read) = op.before {
            self.reads
                .insert((op.method.1.to_ascii_uppercase(), path.to_string()), read);
        }
        let route = std::mem::take(&mut op.route);
        let route = match op.roles {
            Some(roles) => route.layer(axum::Extension(Allowed(roles))),
            None => route,
        };
        let router = std::mem::take(&mut self.router);
        self.router = router.route(path, route);
        let operation = op.operation(tag, &mut self.schemas, &mut self.protos);
        self.paths.add_path_operation(path, vec![method], operation);
        self
    }

    /// The router, the OpenAPI document of every route added, and where the audit log reads
    /// the state before each write that declared it.
    pub fn finish(self) -> (Router<Arc<AppState>>, OpenApi, Reads) {
        let mut components = ComponentsBuilder::new()
            .schema("Error", error_schema())
            .security_scheme(
                "api_key",
                SecurityScheme::Http(
                    Http::builder()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "An API key (`tsk_…`) of the tenant, with a role; also accepted as \
                             `X-Api-Key`.",
                        ))
                        .build(),
                ),
            );
        for (name, schema) in self.schemas {
            components = components.schema(name, schema);
        }
        for (name, schema) in proto_components(self.protos) {
            components = components.schema(name, schema);
        }
        let document = OpenApiBuilder::new()
            .info(
                InfoBuilder::new()
                    .title("Tessera")
                    .version(env!("CARGO_PKG_VERSION"))
                    .description(Some(
                        "Loyalty and cashback API for touchpoints and consoles. Bodies and \
                         answers are JSON; errors are `{\"error\": {code, message, \
                         field_violations, reason, request_id}}`; lists page with `limit` and \
                         `starting_after`; writes take an `Idempotency-Key`.",
                    ))
                    .build(),
            )
            .paths(self.paths)
            .components(Some(components.build()))
            .tags(Some(self.tags.into_iter().map(|(name, description)| {
                TagBuilder::new()
                    .name(name)
                    .description(Some(description))
                    .build()
            })))
            .build();
        (self.router, document, self.reads)
    }
}

/// `get_v1_rewards_id` for `GET /v1/rewards/{id}`.
fn operation_id(method: &str, path: &str) -> String {
    let path: String = path
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let mut id = format!("{method}{path}");
    while id.contains("__") {
        id = id.replace("__", "_");
    }
    id.trim_end_matches('_').to_string()
}

/// The `{name}` segments of `path`, as required string parameters (one of `enums`' values
/// where it names them).
fn path_params(path: &str, enums: &[(&str, &[&str])]) -> Vec<Parameter> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| {
            let schema = match enums.iter().find(|(n, _)| *n == name) {
                Some((_, values)) => string().enum_values(Some(values.iter().copied())),
                None => string().min_length(Some(1)),
            };
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(Some(schema))
                .build()
        })
        .collect()
}

/// The errors an operation can answer, by what it takes.
fn errors(
    authenticated: bool,
    body: bool,
    write: bool,
    addressed: bool,
) -> Vec<(u16, &'static str)> {
    let mut out = vec![(
        400,
        "A parameter, header or body field is invalid; `field_violations` names it.",
    )];
    if authenticated {
        out.extend([
            (401, "No API key, or an invalid or revoked one."),
            (403, "The key's role may not do this."),
            (429, "Rate limited: retry after `Retry-After` seconds."),
        ]);
    }
    if addressed || authenticated {
        out.push((404, "No such object in the caller's tenant."));
    }
    if write {
        out.extend([
            (409, "A request with the same `Idempotency-Key` is still in flight, or the object changed."),
            (422, "Refused by a business rule (`reason` says which), or the `Idempotency-Key` was used with another body."),
        ]);
    }
    if body {
        out.push((413, "The body is larger than the gateway accepts."));
    }
    out.extend([
        (503, "A service the route needs is unavailable."),
        (504, "The request took too long."),
    ]);
    out
}

fn response(description: &str, content: Content) -> utoipa::openapi::Response {
    let response = ResponseBuilder::new().description(description);
    match media(content) {
        Some((media, schema)) => {
            response.content(media, ContentBuilder::new().schema(schema).build())
        }
        None => response,
    }
    .build()
}

fn media(content: Content) -> Option<(&'static str, Option<RefOr<Schema>>)> {
    let text = || {
        Some(RefOr::T(Schema::Object(
            ObjectBuilder::new().schema_type(Type::String).build(),
        )))
    };
    Some(match content {
        Content::Json(schema) => ("application/json", Some(*schema)),
        Content::Csv => ("text/csv", text()),
        Content::Html => ("text/html", text()),
        Content::Text => ("text/plain", text()),
        Content::Empty => return None,
    })
}

/// Any JSON object.
pub fn object() -> RefOr<Schema> {
    RefOr::T(Schema::Object(
        ObjectBuilder::new().schema_type(Type::Object).build(),
    ))
}

fn error_ref() -> RefOr<Schema> {
    RefOr::Ref(Ref::from_schema_name("Error"))
}

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn nullable(types: Type) -> SchemaType {
    SchemaType::from_iter([types, Type::Null])
}

/// The one error shape.
fn error_schema() -> Schema {
    let violation = ObjectBuilder::new()
        .property(
            "field",
            string().description(Some("Dot-separated path of the field.")),
        )
        .property(
            "description",
            string().description(Some("What is wrong with it.")),
        )
        .required("field")
        .required("description");
    let error = ObjectBuilder::new()
        .property(
            "code",
            string().description(Some("The gRPC-aligned code, lower case: `invalid_argument`, `not_found`, `failed_precondition`, …")),
        )
        .property("message", string())
        .property("field_violations", ArrayBuilder::new().items(violation))
        .property(
            "reason",
            ObjectBuilder::new()
                .schema_type(nullable(Type::String))
                .description(Some("Machine-readable reason, e.g. `CAMPAIGN_NOT_ACTIVE`.")),
        )
        .property("request_id", string())
        .required("code")
        .required("message")
        .required("field_violations")
        .required("request_id");
    Schema::Object(
        ObjectBuilder::new()
            .property("error", error)
            .required("error")
            .build(),
    )
}

/// `{data: [item], has_more, next_cursor}`.
pub fn page_of(item: RefOr<Schema>) -> RefOr<Schema> {
    RefOr::T(Schema::Object(
        ObjectBuilder::new()
            .property("data", ArrayBuilder::new().items(item))
            .property("has_more", ObjectBuilder::new().schema_type(Type::Boolean))
            .property(
                "next_cursor",
                ObjectBuilder::new()
                    .schema_type(nullable(Type::String))
                    .description(Some(
                        "Pass as `starting_after` for the next page; null on the last.",
                    )),
            )
            .required("data")
            .required("has_more")
            .build(),
    ))
}

fn message(name: &str) -> MessageDescriptor {
    POOL.get_message_by_name(name)
        .unwrap_or_else(|| panic!("the descriptor set has no message {name}"))
}

/// The well-known types, in their JSON mapping; `None` for any other message.
fn well_known(name: &str) -> Option<Schema> {
    let any = || Schema::Object(ObjectBuilder::new().build());
    Some(match name {
        "google.protobuf.Timestamp" => Schema::Object(
            string()
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
                .build(),
        ),
        "google.protobuf.Duration" => {
            Schema::Object(string().pattern(Some("^-?[0-9]+(\\.[0-9]+)?s$")).build())
        }
        "google.protobuf.Struct" | "google.protobuf.Empty" | "google.protobuf.Any" => {
            Schema::Object(ObjectBuilder::new().schema_type(Type::Object).build())
        }
        "google.protobuf.ListValue" => {
            Schema::Array(ArrayBuilder::new().items(RefOr::T(any())).build())
        }
        "google.protobuf.Value" => any(),
        "google.protobuf.FieldMask"
        | "google.protobuf.StringValue"
        | "google.protobuf.BytesValue" => Schema::Object(
            ObjectBuilder::new()
                .schema_type(nullable(Type::String))
                .build(),
        ),
        "google.protobuf.BoolValue" => Schema::Object(
            ObjectBuilder::new()
                .schema_type(nullable(Type::Boolean))
                .build(),
        ),
        "google.protobuf.DoubleValue" | "google.protobuf.FloatValue" => Schema::Object(
            ObjectBuilder::new()
                .schema_type(nullable(Type::Number))
                .build(),
        ),
        "google.protobuf.Int32Value"
        | "google.protobuf.Int64Value"
        | "google.protobuf.UInt32Value"
        | "google.protobuf.UInt64Value" => Schema::Object(
            ObjectBuilder::new()
                .schema_type(nullable(Type::Integer))
                .build(),
        ),
        _ => return None,
    })
}

/// A reference to the component of message or enum `name` (inline for well-known types).
fn proto_ref(name: &str) -> RefOr<Schema> {
    well_known(name).map_or_else(|| RefOr::Ref(Ref::from_schema_name(name)), RefOr::T)
}

fn kind_schema(kind: &Kind) -> RefOr<Schema> {
    let integer = |format: KnownFormat, min: Option<i64>| {
        RefOr::T(Schema::Object(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(format)))
                .minimum(min)
                .build(),
        ))
    };
    match kind {
        Kind::Double | Kind::Float => RefOr::T(Schema::Object(
            ObjectBuilder::new().schema_type(Type::Number).build(),
        )),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => integer(KnownFormat::Int32, None),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => integer(KnownFormat::Int64, None),
        Kind::Uint32 | Kind::Fixed32 => integer(KnownFormat::Int32, Some(0)),
        Kind::Uint64 | Kind::Fixed64 => integer(KnownFormat::Int64, Some(0)),
        Kind::Bool => RefOr::T(Schema::Object(
            ObjectBuilder::new().schema_type(Type::Boolean).build(),
        )),
        Kind::String => RefOr::T(Schema::Object(string().build())),
        Kind::Bytes => RefOr::T(Schema::Object(string().content_encoding("base64").build())),
        Kind::Message(m) => proto_ref(m.full_name()),
        Kind::Enum(e) => proto_ref(e.full_name()),
    }
}

/// The messages and enums `m`'s fields refer to.
fn referenced(m: &MessageDescriptor) -> Vec<String> {
    m.fields()
        .filter_map(|f| match f.kind() {
            Kind::Message(inner) if inner.is_map_entry() => {
                match inner.map_entry_value_field().kind() {
                    Kind::Message(v) => Some(v.full_name().to_string()),
                    Kind::Enum(e) => Some(e.full_name().to_string()),
                    _ => None,
                }
            }
            Kind::Message(inner) => Some(inner.full_name().to_string()),
            Kind::Enum(e) => Some(e.full_name().to_string()),
            _ => None,
        })
        .collect()
}

/// Message `m` as a JSON object: its fields by their proto names, none required (defaults
/// are left out), no others allowed.
fn message_schema(m: &MessageDescriptor, without: &[&str]) -> Schema {
    let mut object = ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::FreeForm(false)));
    for field in m.fields().filter(|f| !without.contains(&f.name())) {
        let schema = match field.kind() {
            Kind::Message(entry) if entry.is_map_entry() => RefOr::T(Schema::Object(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .additional_properties(Some(kind_schema(&entry.map_entry_value_field().kind())))
                    .build(),
            )),
            kind if field.is_list() => RefOr::T(Schema::Array(
                ArrayBuilder::new().items(kind_schema(&kind)).build(),
            )),
            kind => kind_schema(&kind),
        };
        object = object.property(field.name(), schema);
    }
    Schema::Object(object.build())
}

/// The components of `roots` and of every message and enum they reach.
fn proto_components(roots: BTreeSet<String>) -> BTreeMap<String, RefOr<Schema>> {
    let mut out = BTreeMap::new();
    let mut todo: Vec<String> = roots.into_iter().collect();
    while let Some(name) = todo.pop() {
        if out.contains_key(&name) || well_known(&name).is_some() {
            continue;
        }
        let schema = if let Some(e) = POOL.get_enum_by_name(&name) {
            Schema::Object(
                string()
                    .enum_values(Some(e.values().map(|v| v.name().to_string())))
                    .build(),
            )
        } else {
            let m = message(&name);
            todo.extend(referenced(&m));
            message_schema(&m, &[])
        };
        out.insert(name, RefOr::T(schema));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_ids_read_as_method_and_path() {
        assert_eq!(operation_id("get", "/v1/rewards/{id}"), "get_v1_rewards_id");
        assert_eq!(
            operation_id("post", "/v1/campaigns/{id}/codes.csv"),
            "post_v1_campaigns_id_codes_csv"
        );
    }

    #[test]
    fn messages_document_every_field_and_what_they_reach() {
        let components =
            proto_components(BTreeSet::from(["tessera.catalog.v1.Reward".to_string()]));
        let reward = serde_json::to_value(&components["tessera.catalog.v1.Reward"]).unwrap();
        let fields = message("tessera.catalog.v1.Reward").fields().count();
        assert_eq!(reward["properties"].as_object().unwrap().len(), fields);
        assert_eq!(reward["additionalProperties"], false);
        // Everything referred to is there, transitively.
        let text = serde_json::to_string(&components).unwrap();
        for name in text.split("#/components/schemas/").skip(1) {
            let name = name.split('"').next().unwrap();
            assert!(
                components.contains_key(name),
                "{name} is referred to but missing"
            );
        }
    }
}
