#!/usr/bin/env python3
"""Checks Terraform modules against their providers' own schemas, offline.

Owns the schema side of scripts/check-templates.sh: reads each provider's
schema from the jsii assembly (.jsii) inside its prebuilt CDK for Terraform
package (cdktf-cdktf-provider-*), or from a schema file kept in the repository
(Hetzner, which has no such package), parses every module with python-hcl2,
and reports every unknown resource/data type, unknown argument or nested
block (also inside `dynamic` blocks), missing required argument and
reference to a missing attribute (`type.name.attr`, `data.type.name.attr`)
as `file:line: message; did you mean "nearest"?`.

Also checks that each provider's schema version satisfies the module's
`required_providers` version constraint.

Usage: check_templates.py DIR [--schema-cache DIR]
Exit status: 0 clean, 1 findings, 2 usage or setup error.
"""

import argparse
import difflib
import gzip
import importlib.util
import json
import os
import re
import sys
import tarfile
from pathlib import Path

import hcl2
from hcl2.utils import SerializationOptions

HERE = Path(__file__).resolve().parent
HCLOUD_SCHEMA = HERE / "hcloud-schema.json"

# Python packages holding the provider schemas, by provider source.
PACKAGES = {
    "hashicorp/aws": "cdktf_cdktf_provider_aws",
    "hashicorp/google": "cdktf_cdktf_provider_google",
    "hashicorp/azurerm": "cdktf_cdktf_provider_azurerm",
    "digitalocean/digitalocean": "cdktf_cdktf_provider_digitalocean",
    "hashicorp/tls": "cdktf_cdktf_provider_tls",
}
SCHEMA_FILES = {"hetznercloud/hcloud": HCLOUD_SCHEMA}

# Resources built into Terraform itself (no provider).
BUILTIN_RESOURCES = {"terraform_data"}
META_RESOURCE = {"count", "for_each", "depends_on", "provider", "lifecycle", "connection", "provisioner"}
META_DATA = {"count", "for_each", "depends_on", "provider", "lifecycle"}
META_ATTRS = {"id"}

LINK = re.compile(
    r"registry\.terraform\.io/providers/([\w-]+)/([\w-]+)/([\w.+-]+)/docs/(resources|data-sources)/\S+ ([a-z0-9_]+)\}"
)
ANCHOR = re.compile(r"\{@link \S+#([a-z0-9_]+) [^}]*\}")


class SetupError(Exception):
    pass


# --- schemas -----------------------------------------------------------------


def snake(name):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def read_jsii(package):
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SetupError(f"python package {package} is not installed")
    jsii_dir = Path(spec.origin).parent / "_jsii"
    tgzs = sorted(jsii_dir.glob("*.jsii.tgz"))
    if not tgzs:
        raise SetupError(f"no jsii assembly in {jsii_dir}")
    with tarfile.open(tgzs[0]) as tar:
        data = json.load(tar.extractfile("package/.jsii"))
        if data.get("schema") == "jsii/file-redirect":
            raw = tar.extractfile("package/" + data["filename"]).read()
            if data.get("compression") == "gzip":
                raw = gzip.decompress(raw)
            data = json.loads(raw)
    return data


def struct_fqn(typ, types):
    """The fqn of the struct a property type holds (block), or None."""
    if "fqn" in typ:
        t = types.get(typ["fqn"])
        return typ["fqn"] if t and t.get("kind") == "interface" and t.get("datatype") else None
    if "collection" in typ:
        return struct_fqn(typ["collection"]["elementtype"], types)
    if "union" in typ:
        for u in typ["union"]["types"]:
            f = struct_fqn(u, types)
            if f:
                return f
    return None


def struct_body(fqn, types, depth=0):
    args = {}
    for p in types[fqn].get("properties", []):
        m = ANCHOR.search(p.get("docs", {}).get("remarks", "") + p.get("docs", {}).get("summary", ""))
        name = m.group(1) if m else snake(p["name"])
        sub = struct_fqn(p["type"], types)
        block = struct_body(sub, types, depth + 1) if sub and depth < 12 else None
        args[name] = {"required": not p.get("optional", False), "block": block}
    return {"args": args}


def schema_from_jsii(data):
    types = data["types"]
    schema = {"source": None, "version": None, "resources": {}, "data_sources": {}}
    for t in types.values():
        if t.get("kind") != "class":
            continue
        m = LINK.search(t.get("docs", {}).get("summary", ""))
        if not m or not t.get("initializer"):
            continue
        ns, prov, version, kind, tftype = m.groups()
        schema["source"], schema["version"] = f"{ns}/{prov}", version
        params = t["initializer"].get("parameters", [])
        if len(params) < 3 or "fqn" not in params[2]["type"]:
            continue
        body = struct_body(params[2]["type"]["fqn"], types)
        attrs = set(body["args"])
        for p in t.get("properties", []):
            if p.get("static") or p["name"].endswith("Input"):
                continue
            attrs.add(snake(p["name"]))
            if p["name"].endswith("Attribute"):
                attrs.add(snake(p["name"][: -len("Attribute")]))
        body["attrs"] = sorted(attrs)
        schema["resources" if kind == "resources" else "data_sources"][tftype] = body
    if not schema["source"]:
        raise SetupError("no Terraform resource found in the jsii assembly")
    return schema


def load_schema(source, cache_dir):
    if source in SCHEMA_FILES:
        with open(SCHEMA_FILES[source]) as f:
            return json.load(f)
    package = PACKAGES.get(source)
    if package is None:
        raise SetupError(f"no schema known for provider {source}")
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SetupError(f"python package {package} (schema of {source}) is not installed")
    version = _dist_version(package)
    cached = Path(cache_dir) / f"{package}-{version}.json" if cache_dir else None
    if cached and cached.exists():
        with open(cached) as f:
            return json.load(f)
    schema = schema_from_jsii(read_jsii(package))
    schema["package"] = f"{package.replace('_', '-')}=={version}"
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(schema, f)
        os.replace(tmp, cached)
    return schema


def _dist_version(package):
    from importlib.metadata import version

    return version(package.replace("_", "-"))


# --- version constraints -----------------------------------------------------


def _vtuple(v):
    return tuple(int(x) for x in re.findall(r"\d+", v.split("-")[0])[:3])


def satisfies(version, constraint):
    v = _vtuple(version)
    for part in constraint.split(","):
        m = re.match(r"\s*(~>|>=|<=|!=|=|>|<)?\s*([\d.]+)\s*$", part)
        if not m:
            raise SetupError(f"cannot read version constraint {constraint!r}")
        op, want = m.group(1) or "=", m.group(2)
        w = _vtuple(want)
        pad = lambda t: t + (0,) * (3 - len(t))  # noqa: E731
        vv, ww = pad(v), pad(w)
        if op == "~>":
            n = len(w)
            upper = list(w[: max(n - 1, 1)])
            upper[-1] += 1
            ok = vv >= ww and vv < pad(tuple(upper))
        else:
            ok = {
                "=": vv == ww,
                "!=": vv != ww,
                ">": vv > ww,
                ">=": vv >= ww,
                "<": vv < ww,
                "<=": vv <= ww,
            }[op]
        if not ok:
            return False
    return True


# --- modules -----------------------------------------------------------------


def unq(s):
    return s[1:-1] if isinstance(s, str) and len(s) >= 2 and s[0] == '"' and s[-1] == '"' else s


def is_block(v):
    return isinstance(v, list) and v and all(isinstance(x, dict) and x.get("__is_block__") for x in v)


class Lines:
    """Finds the line of a block or argument in the file's text."""

    def __init__(self, text):
        self.lines = text.splitlines()

    def find(self, pattern, start=0, nth=0):
        rx = re.compile(pattern)
        seen = 0
        for i in range(start, len(self.lines)):
            if rx.search(self.lines[i]):
                if seen == nth:
                    return i
                seen += 1
        return start

    def block_end(self, start):
        depth = 0
        for i in range(start, len(self.lines)):
            line = re.sub(r'"(\\.|[^"\\])*"', '""', self.lines[i].split("#")[0])
            depth += line.count("{") - line.count("}")
            if depth <= 0 and i > start:
                return i
        return len(self.lines) - 1


def nearest(name, candidates):
    m = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.0)
    return f'; did you mean "{m[0]}"?' if m else ""


class Checker:
    def __init__(self, cache_dir):
        self.cache_dir = cache_dir
        self.schemas = {}
        self.findings = []
        self.used = {}

    def schema(self, source):
        if source not in self.schemas:
            self.schemas[source] = load_schema(source, self.cache_dir)
        return self.schemas[source]

    def report(self, path, line, msg):
        self.findings.append(f"{path}:{line + 1}: {msg}")

    def check_module(self, module):
        files = sorted(module.glob("*.tf"))
        parsed = {}
        for f in files:
            text = f.read_text()
            try:
                parsed[f] = (
                    hcl2.loads(text, serialization_options=SerializationOptions(with_comments=False)),
                    Lines(text),
                    text,
                )
            except Exception as e:  # the parser raises lark's own errors
                self.report(f, 0, f"HCL parse error: {e}")
        providers = {}  # local name -> (source, constraint, file, line)
        for f, (doc, lines, _) in parsed.items():
            for tf in doc.get("terraform", []):
                for rp in tf.get("required_providers", []):
                    for local, spec in rp.items():
                        if local.startswith("__") or not isinstance(spec, dict):
                            continue
                        providers[local] = (
                            unq(spec.get("source", f"hashicorp/{local}")),
                            unq(spec.get("version", "")),
                            f,
                            lines.find(rf"^\s*{re.escape(local)}\s*=\s*{{"),
                        )
        for local, (source, constraint, f, line) in sorted(providers.items()):
            try:
                s = self.schema(source)
            except SetupError as e:
                self.report(f, line, str(e))
                continue
            if constraint and "documentation" not in s and not satisfies(s["version"], constraint):
                self.report(
                    f,
                    line,
                    f'provider {source} schema version {s["version"]} does not satisfy "{constraint}" '
                    "(update the pin in scripts/check_templates/requirements.txt and the module together)",
                )
            self.used[source] = s

        declared = {}  # (mode, type, name) -> body schema
        blocks = []
        for f, (doc, lines, _) in parsed.items():
            for mode, key in (("resource", "resource"), ("data", "data")):
                counts = {}
                for item in doc.get(key, []):
                    for rtype, named in item.items():
                        rtype = unq(rtype)
                        for rname, bodies in named.items():
                            rname = unq(rname)
                            for body in bodies if isinstance(bodies, list) else [bodies]:
                                pat = rf'^\s*{mode}\s+"{re.escape(rtype)}"\s+"{re.escape(rname)}"'
                                n = counts.get(pat, 0)
                                counts[pat] = n + 1
                                line = lines.find(pat, 0, n)
                                blocks.append((f, lines, mode, rtype, rname, body, line))

        for f, lines, mode, rtype, rname, body, line in blocks:
            label = f"{'data.' if mode == 'data' else ''}{rtype}.{rname}"
            if rtype in BUILTIN_RESOURCES and mode == "resource":
                declared[(mode, rtype, rname)] = None
                continue
            local = rtype.split("_")[0]
            prov = providers.get(local)
            if prov is None:
                self.report(f, line, f"{label}: provider {local} is not in required_providers")
                continue
            s = self.schemas.get(prov[0])
            if s is None:
                continue
            table = s["resources"] if mode == "resource" else s["data_sources"]
            kind = "resource" if mode == "resource" else "data source"
            if rtype not in table:
                self.report(
                    f,
                    line,
                    f'{kind} type "{rtype}" does not exist in {prov[0]} {s["version"]}' + nearest(rtype, table),
                )
                continue
            declared[(mode, rtype, rname)] = table[rtype]
            meta = META_RESOURCE if mode == "resource" else META_DATA
            self.check_body(f, lines, label, body, table[rtype], line, meta)

        for f, (doc, lines, text) in parsed.items():
            self.check_refs(f, lines, declared)

    def check_body(self, f, lines, label, body, schema, line, meta=frozenset(), dyn_present=None):
        args = schema["args"]
        end = lines.block_end(line)
        present = set(dyn_present or ())
        counts = {}

        def where(pat):
            n = counts.get(pat, 0)
            counts[pat] = n + 1
            at = lines.find(pat, line + 1, n)
            return at if at <= end else line

        for key, value in body.items():
            if key.startswith("__"):
                continue
            if key == "dynamic" and isinstance(value, list):
                for dyn in value:
                    for dname, dbodies in (dyn.items() if isinstance(dyn, dict) else ()):
                        if dname.startswith("__"):
                            continue
                        dname = unq(dname)
                        at = where(rf'^\s*dynamic\s+"{re.escape(dname)}"')
                        spec = args.get(dname)
                        if spec is None or spec["block"] is None:
                            self.unknown(f, at, label, dname, args, "block", spec)
                            continue
                        present.add(dname)
                        for db in dbodies if isinstance(dbodies, list) else [dbodies]:
                            for content in db.get("content", []):
                                self.check_body(
                                    f, lines, f"{label}.{dname}", content, spec["block"], lines.find(r"^\s*content\s*{", at)
                                )
                continue
            if key in meta:
                present.add(key)
                continue
            block = is_block(value)
            pat = rf"^\s*{re.escape(key)}\s*{{" if block else rf"^\s*{re.escape(key)}\s*="
            at = where(pat)
            spec = args.get(key)
            if spec is None:
                self.unknown(f, at, label, key, args, "block" if block else "argument", None)
                continue
            present.add(key)
            if block:
                if spec["block"] is None:
                    self.report(f, at, f'{label}: "{key}" is an argument, not a block (write {key} = ...)')
                    continue
                for i, b in enumerate(value):
                    bl = lines.find(pat, line + 1, counts[pat] - 1 + i) if i else at
                    if i:
                        counts[pat] += 1
                    self.check_body(f, lines, f"{label}.{key}", b, spec["block"], bl)
        for name, spec in sorted(args.items()):
            if spec["required"] and name not in present:
                self.report(f, line, f'{label}: missing required {"block" if spec["block"] else "argument"} "{name}"')

    def unknown(self, f, at, label, name, args, what, spec):
        if spec is not None and spec["block"] is None:
            self.report(f, at, f'{label}: "{name}" is an argument, not a block')
            return
        pool = [n for n, s in args.items() if (s["block"] is not None) == (what == "block")] or list(args)
        self.report(f, at, f'{label}: unknown {what} "{name}"' + nearest(name, pool))

    REF = re.compile(
        r"(?<![\w.])(data\.)?([a-z][a-z0-9]*_[a-z0-9_]+)\.([A-Za-z_][\w-]*)((?:\[[^\]]*\])?)\.([A-Za-z_]\w*)"
    )

    def check_refs(self, f, lines, declared):
        for i, raw in enumerate(lines.lines):
            code = raw.split("#")[0] if not raw.lstrip().startswith("#") else ""
            for m in self.REF.finditer(code):
                data, rtype, rname, _, attr = m.groups()
                mode = "data" if data else "resource"
                key = (mode, rtype, rname)
                if key not in declared or declared[key] is None:
                    continue
                schema = declared[key]
                attrs = set(schema.get("attrs", [])) | set(schema["args"]) | META_ATTRS
                if attr not in attrs:
                    label = f"{'data.' if data else ''}{rtype}.{rname}"
                    self.report(f, i, f'{label}: unknown attribute "{attr}" of {rtype}' + nearest(attr, attrs))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?", default="terraform-templates")
    ap.add_argument("--schema-cache", default=os.environ.get("TETHER_TEMPLATE_SCHEMA_CACHE"))
    ap.add_argument("--versions", action="store_true", help="print the provider schema versions used")
    opts = ap.parse_args()
    root = Path(opts.dir)
    modules = sorted({p.parent for p in root.rglob("*.tf")})
    if not modules:
        print(f"check_templates: no Terraform module under {root}", file=sys.stderr)
        return 2
    checker = Checker(opts.schema_cache)
    try:
        for m in modules:
            checker.check_module(m)
    except SetupError as e:
        print(f"check_templates: {e}", file=sys.stderr)
        return 2
    for line in checker.findings:
        print(line)
    for source, s in sorted(checker.used.items()):
        origin = s.get("package") or s.get("documentation", "schema file")
        print(f"check_templates: {source} {s['version']} ({origin})", file=sys.stderr)
    if checker.findings:
        print(f"check_templates: {len(checker.findings)} finding(s) in {root}", file=sys.stderr)
        return 1
    print(f"check_templates: {len(modules)} module(s) in {root} match their providers' schemas", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
