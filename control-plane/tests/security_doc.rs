//! `docs/security.md` holds two tables written from the code, checked here:
//! the route-by-route scope table (every documented route, the scopes its
//! handler requires, read from the handlers' own `caller.require(Scope::…)`
//! calls) and the scope list (every `Scope`, by name). A route added, a
//! requirement changed or a scope added without the document following
//! fails this test; `TETHER_BLESS=1 cargo test -p tether-control-plane
//! --test security_doc` rewrites the generated table in place.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tether_control_plane::auth::Scope;

const BEGIN: &str =
    "<!-- scope-by-route: begin (generated; see control-plane/tests/security_doc.rs) -->";
const END: &str = "<!-- scope-by-route: end -->";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// One documented route and what its handler requires.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Route {
    path: String,
    method: String,
    handler: String,
    scopes: Vec<String>,
}

/// The text between the `(` at `open` and its matching `)` or `{`…`}`.
fn balanced(text: &str, open: usize, left: char, right: char) -> Option<&str> {
    let mut depth = 0usize;
    for (at, c) in text[open..].char_indices() {
        if c == left {
            depth += 1;
        } else if c == right {
            depth -= 1;
            if depth == 0 {
                return Some(&text[open + 1..open + at]);
            }
        }
    }
    None
}

fn quoted_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text.find(key)? + key.len();
    let rest = text[at..].trim_start().strip_prefix('=')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    rest.find('"').map(|end| &rest[..end])
}

/// The scopes `body` requires, in order, by `require(Scope::…)`.
fn required_scopes(body: &str, function: &str) -> Vec<String> {
    let mut scopes = Vec::new();
    let mut at = 0;
    while let Some(found) = body[at..].find("require(Scope::") {
        let start = at + found + "require(Scope::".len();
        let end = start + body[start..].find(')').expect("closed require");
        let variant = &body[start..end];
        let name = Scope::ALL
            .iter()
            .find(|s| format!("{s:?}") == variant)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|| panic!("unknown scope {variant} in {function}"));
        if !scopes.contains(&name) {
            scopes.push(name);
        }
        at = end;
    }
    scopes
}

/// Every non-handler `fn` of a file with its body.
fn functions(text: &str) -> Vec<(String, &str)> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let rest = &text[from..];
        let Some(found) = [rest.find("\nfn "), rest.find("\nasync fn ")]
            .into_iter()
            .flatten()
            .min()
        else {
            break;
        };
        let fn_at = from + found + 1;
        let name_start = fn_at + text[fn_at..].find("fn ").map(|f| f + 3).unwrap_or(0);
        let Some(name_len) = text[name_start..].find(['(', '<']) else {
            break;
        };
        let name = text[name_start..name_start + name_len].trim().to_string();
        let Some(open) = text[fn_at..].find('{').map(|b| fn_at + b) else {
            break;
        };
        let body = balanced(text, open, '{', '}').unwrap_or_default();
        out.push((name, body));
        from = open + 1;
    }
    out
}

/// Every `#[utoipa::path(...)]` handler of `control-plane/src/api/`.
fn routes_in_code(documented: &BTreeSet<(String, String)>) -> Vec<Route> {
    let dir = repo().join("control-plane/src/api");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("control-plane/src/api is readable")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "rs"))
        .collect();
    files.sort();
    let mut routes = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("api source is readable");
        let mut from = 0;
        while let Some(found) = text[from..].find("#[utoipa::path(") {
            let open = from + found + "#[utoipa::path".len();
            let attribute = balanced(&text, open, '(', ')').expect("closed utoipa::path");
            let method = attribute
                .split(',')
                .next()
                .map(|m| m.trim().to_uppercase())
                .expect("a method");
            let path = quoted_after(attribute, "path").expect("a path").to_string();
            let after = open + attribute.len();
            let fn_at = after
                + text[after..]
                    .find("fn ")
                    .expect("a handler after utoipa::path");
            let name_end = fn_at + 3 + text[fn_at + 3..].find('(').expect("handler name");
            let handler = text[fn_at + 3..name_end].trim().to_string();
            let body_open = fn_at
                + text[fn_at..].find("\n{").map(|b| b + 1).unwrap_or_else(|| {
                    text[fn_at..]
                        .find(") -> ")
                        .and_then(|r| text[fn_at + r..].find('{').map(|b| r + b))
                        .expect("handler body")
                });
            let body = balanced(&text, body_open, '{', '}').expect("closed handler body");
            // The handler's own requirements, then those of the functions
            // of the same file it calls (one level: `visible_server(..)`).
            let mut scopes = required_scopes(body, &handler);
            for (name, helper_body) in functions(&text) {
                if name != handler && body.contains(&format!("{name}(")) {
                    for scope in required_scopes(helper_body, &name) {
                        if !scopes.contains(&scope) {
                            scopes.push(scope);
                        }
                    }
                }
            }
            // Routes under /api/v1 are documented with the prefix, the
            // others (/health, /metrics/fleet, /agent/download) without.
            let prefixed = format!("/api/v1{path}");
            let prefixed = if documented.iter().any(|(_, p)| *p == prefixed) {
                prefixed
            } else {
                path.clone()
            };
            routes.push(Route {
                path: prefixed,
                method,
                handler: format!(
                    "{}::{handler}",
                    file.file_stem()
                        .and_then(|s| s.to_str())
                        .unwrap_or_default()
                ),
                scopes,
            });
            from = body_open;
        }
    }
    routes.sort();
    routes
}

/// (method, path) of every operation of the OpenAPI document.
fn documented_routes() -> BTreeSet<(String, String)> {
    tether_control_plane::api::openapi()
        .paths
        .paths
        .iter()
        .flat_map(|(path, item)| {
            let methods = [
                ("GET", item.get.is_some()),
                ("POST", item.post.is_some()),
                ("PUT", item.put.is_some()),
                ("PATCH", item.patch.is_some()),
                ("DELETE", item.delete.is_some()),
            ];
            methods
                .into_iter()
                .filter(|(_, present)| *present)
                .map(|(m, _)| (m.to_string(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn table(routes: &[Route]) -> String {
    let mut out = String::from(
        "| route | handler | scopes required (`admin` holds them all) |\n|---|---|---|\n",
    );
    for route in routes {
        let scopes = if route.scopes.is_empty() {
            "no scope (see above)".to_string()
        } else {
            route
                .scopes
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", then ")
        };
        out.push_str(&format!(
            "| `{} {}` | `{}` | {} |\n",
            route.method, route.path, route.handler, scopes
        ));
    }
    out
}

#[test]
fn every_documented_route_is_in_the_scope_table_with_the_scopes_its_handler_requires() {
    let documented = documented_routes();
    let routes = routes_in_code(&documented);
    // The scan found exactly the routes the OpenAPI document serves.
    let scanned: BTreeSet<(String, String)> = routes
        .iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect();
    assert_eq!(
        scanned, documented,
        "routes read from the handlers vs the OpenAPI document"
    );

    let generated = table(&routes);
    let doc_path = repo().join("docs/security.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/security.md exists");
    let begin = doc
        .find(BEGIN)
        .expect("docs/security.md has the begin marker");
    let end = doc.find(END).expect("docs/security.md has the end marker");
    let current = doc[begin + BEGIN.len()..end].trim();
    if std::env::var_os("TETHER_BLESS").is_some() {
        let rewritten = format!(
            "{}{BEGIN}\n{}\n{}",
            &doc[..begin],
            generated.trim(),
            &doc[end..]
        );
        std::fs::write(&doc_path, rewritten).expect("docs/security.md is writable");
        return;
    }
    assert_eq!(
        current,
        generated.trim(),
        "docs/security.md's route table is stale: rerun with TETHER_BLESS=1"
    );
}

#[test]
fn the_scope_list_names_every_scope_and_nothing_else() {
    let doc = std::fs::read_to_string(repo().join("docs/security.md")).expect("docs/security.md");
    let section = doc
        .split("## Scopes")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .and_then(|rest| rest.split("\n### ").next())
        .expect("docs/security.md has a `## Scopes` section");
    let listed: BTreeSet<&str> = section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .collect();
    let in_code: BTreeSet<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(
        listed, in_code,
        "the scopes docs/security.md lists vs auth::Scope"
    );
}
