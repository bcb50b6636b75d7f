//! Keeps `ingest/openapi.json` true against a live ingest fed real batches
//! (see `api/mod.rs`): every documented operation answers (never 404 or
//! 405), with each documented parameter too, every JSON or text answer
//! validates against the schema documented for its status, errors are the
//! documented ones, and removing any documented required field from a real
//! answer makes it invalid. That the spec's (method, path) pairs are
//! exactly the router's is a unit test beside the router
//! (`http::tests::the_openapi_description_has_exactly_the_routes`).
//!
//! The validator covers the subset of JSON Schema the description uses
//! (`type`, `nullable`, `enum`, `format: date-time`, `required`,
//! `properties`, `additionalProperties`, `items`, `minimum`, `maximum`,
//! `$ref` to components) and refuses any other keyword, so the description
//! cannot promise something nothing checks.

mod api;
mod sealing;

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};
use tokio::time::timeout;

use api::{FedIngest, LIMIT};

/// Keywords the validator checks, or that only document.
const KEYWORDS: &[&str] = &[
    "type",
    "nullable",
    "enum",
    "format",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "minimum",
    "maximum",
    "$ref",
    "description",
    "example",
    "default",
];

fn spec() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    let text = std::fs::read_to_string(path).expect("ingest/openapi.json is there");
    serde_json::from_str(&text).expect("ingest/openapi.json is JSON")
}

/// Validates JSON values against schemas of one OpenAPI document.
struct Validator<'a> {
    spec: &'a Value,
}

/// What one validation found.
#[derive(Default)]
struct Outcome {
    errors: Vec<String>,
    /// JSON pointers (in the value) of every required field present.
    required: Vec<String>,
}

impl<'a> Validator<'a> {
    /// `value` follows `$ref`s (local ones only).
    fn resolve(&self, mut value: &'a Value) -> &'a Value {
        for _ in 0..16 {
            match value.get("$ref").and_then(Value::as_str) {
                Some(r) => {
                    let pointer = r.strip_prefix('#').expect("a local $ref");
                    value = self
                        .spec
                        .pointer(pointer)
                        .unwrap_or_else(|| panic!("{r} does not resolve"));
                }
                None => return value,
            }
        }
        panic!("$ref chain too long");
    }

    fn validate(&self, schema: &Value, value: &Value) -> Outcome {
        let mut outcome = Outcome::default();
        self.check(schema, value, "", &mut outcome);
        outcome
    }

    fn check(&self, schema: &'a Value, value: &Value, at: &str, out: &mut Outcome) {
        let schema = self.resolve(schema);
        let Some(keywords) = schema.as_object() else {
            out.errors.push(format!("{at}: schema is not an object"));
            return;
        };
        for keyword in keywords.keys() {
            if !KEYWORDS.contains(&keyword.as_str()) {
                out.errors.push(format!(
                    "{at}: the schema uses `{keyword}`, which this validator does not check"
                ));
            }
        }
        if value.is_null() {
            if schema.get("nullable") != Some(&Value::Bool(true)) {
                out.errors.push(format!("{at}: null, but not nullable"));
            }
            return;
        }
        let ty = schema.get("type").and_then(Value::as_str);
        let type_ok = match ty {
            None => true,
            Some("string") => value.is_string(),
            Some("integer") => value.is_i64() || value.is_u64(),
            Some("number") => value.is_number(),
            Some("boolean") => value.is_boolean(),
            Some("array") => value.is_array(),
            Some("object") => value.is_object(),
            Some(other) => {
                out.errors.push(format!("{at}: unknown type `{other}`"));
                return;
            }
        };
        if !type_ok {
            out.errors
                .push(format!("{at}: {value} is not of type {}", ty.unwrap()));
            return;
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            if !allowed.contains(value) {
                out.errors
                    .push(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        match schema.get("format").and_then(Value::as_str) {
            None => {}
            Some("date-time") => {
                let text = value.as_str().unwrap_or_default();
                if chrono::DateTime::parse_from_rfc3339(text).is_err() {
                    out.errors
                        .push(format!("{at}: `{text}` is not an RFC 3339 date-time"));
                }
            }
            Some(other) => out
                .errors
                .push(format!("{at}: format `{other}` is not checked")),
        }
        if let Some(n) = value.as_f64() {
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
                if n < min {
                    out.errors.push(format!("{at}: {n} < minimum {min}"));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                if n > max {
                    out.errors.push(format!("{at}: {n} > maximum {max}"));
                }
            }
        }
        if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
            for (i, item) in array.iter().enumerate() {
                self.check(items, item, &format!("{at}/{i}"), out);
            }
        }
        if let Some(object) = value.as_object() {
            self.check_object(schema, object, at, out);
        }
    }

    fn check_object(
        &self,
        schema: &'a Value,
        object: &Map<String, Value>,
        at: &str,
        out: &mut Outcome,
    ) {
        let empty = Map::new();
        let properties = schema
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = name.as_str().expect("required names are strings");
            if !properties.contains_key(name) {
                out.errors.push(format!(
                    "{at}: `{name}` is required but not among the properties"
                ));
            }
            if object.contains_key(name) {
                out.required.push(format!("{at}/{}", escape(name)));
            } else {
                out.errors
                    .push(format!("{at}: required field `{name}` is missing"));
            }
        }
        for (name, field) in object {
            let here = format!("{at}/{}", escape(name));
            match properties.get(name) {
                Some(property) => self.check(property, field, &here, out),
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => out
                        .errors
                        .push(format!("{at}: field `{name}` is not documented")),
                    Some(Value::Bool(true)) | None => {}
                    Some(extra) => self.check(extra, field, &here, out),
                },
            }
        }
    }
}

/// A JSON pointer token (RFC 6901).
fn escape(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

/// `value` without the field at `pointer`.
fn without(value: &Value, pointer: &str) -> Value {
    let mut value = value.clone();
    let (parent, last) = pointer.rsplit_once('/').expect("a field pointer");
    let name = last.replace("~1", "/").replace("~0", "~");
    value
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("the field's object")
        .remove(&name)
        .expect("the field is there");
    value
}

/// An answer of the live ingest, checked against the description.
struct Checked {
    path: String,
    status: u16,
    body: Value,
    schema: Value,
}

/// The documented response of `operation` for `status`, with `$ref`s
/// followed.
fn response<'a>(validator: &Validator<'a>, operation: &'a Value, status: u16) -> &'a Value {
    let responses = &operation["responses"];
    let documented = responses
        .get(status.to_string())
        .unwrap_or_else(|| panic!("status {status} is not documented in {responses}"));
    validator.resolve(documented)
}

/// Sends `request`, and checks its answer against `operation`'s documented
/// response for its status: the content type, and the body against its
/// schema (a text body as a JSON string).
async fn check_answer(
    validator: &Validator<'_>,
    operation: &Value,
    what: &str,
    request: reqwest::RequestBuilder,
) -> Checked {
    let answer = timeout(LIMIT, request.send())
        .await
        .expect("answer in time")
        .expect("an answer");
    let status = answer.status().as_u16();
    let content_type = answer
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string());
    let text = answer.text().await.unwrap();
    assert!(
        status != 404 && status != 405 || operation["responses"].get(status.to_string()).is_some(),
        "{what}: {status} `{text}`"
    );
    let documented = response(validator, operation, status);
    let Some(content) = documented.get("content").and_then(Value::as_object) else {
        assert_eq!(text, "", "{what}: {status} is documented without a body");
        return Checked {
            path: what.to_string(),
            status,
            body: Value::Null,
            schema: json!({ "nullable": true }),
        };
    };
    assert_eq!(content.len(), 1, "{what}: one content type per response");
    let (media, media_type) = content.iter().next().unwrap();
    let content_type = content_type.unwrap_or_default();
    assert!(
        content_type.starts_with(media.as_str()),
        "{what}: {status} answered `{content_type}`, documented `{media}`"
    );
    let body = if media == "application/json" {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
    } else {
        Value::String(text)
    };
    let schema = media_type["schema"].clone();
    let outcome = validator.validate(&schema, &body);
    assert!(
        outcome.errors.is_empty(),
        "{what}: {status} does not match its schema:\n{}\n{body:#}",
        outcome.errors.join("\n")
    );
    Checked {
        path: what.to_string(),
        status,
        body,
        schema,
    }
}

/// A query value as a URL carries it.
fn query_value(example: &Value) -> String {
    match example {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_api_answers_as_its_openapi_description_says() {
    timeout(LIMIT * 3, async {
        let spec = spec();
        assert!(spec["openapi"].as_str().unwrap().starts_with("3.0."));
        let validator = Validator { spec: &spec };
        let ingest = FedIngest::start().await;
        let client = &ingest.client;
        let base = &ingest.base;
        let mut checked: Vec<Checked> = Vec::new();

        for (template, item) in spec["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                assert_eq!(method, "get", "{template}: only GET is served");
                let parameters: Vec<&Value> = operation["parameters"]
                    .as_array()
                    .map(|ps| ps.iter().collect())
                    .unwrap_or_default();
                let mut path = template.clone();
                for p in parameters.iter().filter(|p| p["in"] == "path") {
                    let name = p["name"].as_str().unwrap();
                    let example = p["example"]
                        .as_str()
                        .expect("path parameters have examples");
                    path = path.replace(&format!("{{{name}}}"), example);
                }
                let url = format!("{base}{path}");

                // Plain, then with each documented query parameter.
                let plain = check_answer(&validator, operation, &path, client.get(&url)).await;
                assert_eq!(plain.status, 200, "GET {path}: {}", plain.body);
                checked.push(plain);
                for p in parameters.iter().filter(|p| p["in"] == "query") {
                    let name = p["name"].as_str().unwrap();
                    let value = query_value(&p["example"]);
                    let what = format!("{path}?{name}={value}");
                    let answer = check_answer(
                        &validator,
                        operation,
                        &what,
                        client.get(&url).query(&[(name, &value)]),
                    )
                    .await;
                    assert_eq!(answer.status, 200, "GET {what}: {}", answer.body);
                    checked.push(answer);
                }

                // A route that documents 400 names an undocumented parameter.
                if operation["responses"].get("400").is_some() {
                    let what = format!("{path}?undocumented=1");
                    let answer = check_answer(
                        &validator,
                        operation,
                        &what,
                        client.get(&url).query(&[("undocumented", "1")]),
                    )
                    .await;
                    assert_eq!(answer.status, 400, "GET {what}");
                    assert_eq!(answer.body["parameter"], "undocumented");
                    checked.push(answer);
                }
                // A route that documents 404 for its path parameter says so.
                if operation["responses"].get("404").is_some() {
                    for p in parameters.iter().filter(|p| p["in"] == "path") {
                        let name = p["name"].as_str().unwrap();
                        let what = template.replace(&format!("{{{name}}}"), "no-such-id");
                        let answer = check_answer(
                            &validator,
                            operation,
                            &what,
                            client.get(format!("{base}{what}")),
                        )
                        .await;
                        assert_eq!(answer.status, 404, "GET {what}");
                        assert_eq!(answer.body["parameter"], name);
                        checked.push(answer);
                    }
                }

                // Only the documented method is served.
                let post = timeout(LIMIT, client.post(&url).send())
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(post.status().as_u16(), 405, "POST {path}");
            }
        }

        // A body over the limit: the documented 413 of every operation. On
        // a client of its own: the server answers before reading the body
        // and closes that connection, and a pooled connection it closed
        // may fail the next request sent on it.
        let sites = &spec["paths"]["/api/v1/sites"]["get"];
        let too_large = check_answer(
            &validator,
            sites,
            "/api/v1/sites with a 65 KiB body",
            reqwest::Client::new()
                .get(format!("{base}/api/v1/sites"))
                .body(vec![b'x'; 65 * 1024]),
        )
        .await;
        assert_eq!(too_large.status, 413);
        checked.push(too_large);

        // Undocumented paths are not served.
        for path in ["/", "/api/v1", "/api/v1/sites/plant", "/api/v2/events"] {
            let answer = timeout(LIMIT, client.get(format!("{base}{path}")).send())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(answer.status().as_u16(), 404, "GET {path}");
        }

        // The description the ingest serves is the one checked in.
        let served = checked
            .iter()
            .find(|c| c.path == "/api/v1/openapi.json" && c.status == 200)
            .expect("the description was fetched");
        assert_eq!(served.body, spec);

        // Every documented answer this plant can give was seen: all but
        // the timeout, the store failure and readyz's 503.
        let seen: BTreeSet<(String, u16)> = checked
            .iter()
            .map(|c| (c.path.split('?').next().unwrap().to_string(), c.status))
            .collect();
        for (path, status) in [
            ("/healthz", 200),
            ("/readyz", 200),
            ("/metrics", 200),
            ("/api/v1/sites", 200),
            ("/api/v1/sites", 400),
            ("/api/v1/sites/plant/status", 200),
            ("/api/v1/sites/plant/status", 400),
            ("/api/v1/sites/no-such-id/status", 404),
            ("/api/v1/events", 200),
            ("/api/v1/events", 400),
            ("/api/v1/openapi.json", 200),
            ("/api/v1/sites with a 65 KiB body", 413),
        ] {
            assert!(
                seen.contains(&(path.to_string(), status)),
                "{path} {status} not checked: {seen:?}"
            );
        }

        // The answers exercised the schemas' optional and nullable parts.
        let events = checked.iter().find(|c| c.path == "/api/v1/events").unwrap();
        let all = events.body["events"].as_array().unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.iter().any(|e| e.get("samples_dropped").is_some()));
        assert!(all.iter().any(|e| e["end"].is_null()));

        // A documented required field missing from any real answer fails.
        let mut mutations = 0;
        for c in &checked {
            let outcome = validator.validate(&c.schema, &c.body);
            for pointer in outcome.required {
                let broken = without(&c.body, &pointer);
                let errors = validator.validate(&c.schema, &broken).errors;
                assert!(
                    !errors.is_empty(),
                    "{}: the answer without {pointer} still validates",
                    c.path
                );
                mutations += 1;
            }
        }
        assert!(mutations > 100, "only {mutations} required fields checked");
        ingest.stop().await;
    })
    .await
    .expect("test finished in time");
}

#[test]
fn the_validator_refuses_what_the_description_does_not_allow() {
    let spec = json!({
        "components": { "schemas": {
            "Thing": {
                "type": "object",
                "required": ["id", "at"],
                "properties": {
                    "id": { "type": "string" },
                    "at": { "type": "string", "format": "date-time", "nullable": true },
                    "kind": { "type": "string", "enum": ["a", "b"] },
                    "n": { "type": "integer", "minimum": 1, "maximum": 3 },
                    "tags": { "type": "array", "items": { "type": "string" } },
                    "map": { "type": "object", "additionalProperties": { "type": "number" } },
                },
                "additionalProperties": false,
            },
        }},
    });
    let validator = Validator { spec: &spec };
    let schema = json!({ "$ref": "#/components/schemas/Thing" });
    let errors = |value: Value| validator.validate(&schema, &value).errors;
    let good = json!({
        "id": "x", "at": "2022-12-13T14:00:00+08:00", "kind": "a", "n": 2,
        "tags": ["t"], "map": { "k": 1.5 },
    });
    assert_eq!(errors(good.clone()), Vec::<String>::new());
    assert_eq!(
        validator.validate(&schema, &good).required,
        vec!["/id", "/at"]
    );
    assert_eq!(
        errors(json!({ "id": "x", "at": null })),
        Vec::<String>::new()
    );
    assert_eq!(
        errors(without(&good, "/id")),
        vec![": required field `id` is missing"]
    );
    assert_eq!(
        errors(json!({ "id": 1, "at": "yesterday" })),
        vec![
            "/at: `yesterday` is not an RFC 3339 date-time",
            "/id: 1 is not of type string"
        ]
    );
    assert_eq!(
        errors(
            json!({ "id": "x", "at": null, "kind": "c", "n": 4, "tags": [1], "map": { "k": "v" }, "extra": 0 })
        ),
        vec![
            ": field `extra` is not documented",
            "/kind: \"c\" is not one of [String(\"a\"), String(\"b\")]",
            "/map/k: \"v\" is not of type number",
            "/n: 4 > maximum 3",
            "/tags/0: 1 is not of type string",
        ]
    );
    assert_eq!(
        errors(json!({ "id": null, "at": null })),
        vec!["/id: null, but not nullable"]
    );
    let unchecked = json!({ "type": "string", "pattern": "^a" });
    assert_eq!(
        validator.validate(&unchecked, &json!("a")).errors,
        vec![": the schema uses `pattern`, which this validator does not check"]
    );
}
