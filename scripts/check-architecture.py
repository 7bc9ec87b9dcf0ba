#!/usr/bin/env python3
"""Layering guard (issue 19): reads the import graph from the code's own paths
and fails, naming file and import, when a rule below is broken.

Edges are file -> file, from `use` paths (`crate::`, `self::`, `super::`, a
submodule's name, the crate's own name from a binary) and from `crate::a::b`,
`self::a` and `super::a` paths written in code. A path goes to the file of the
longest module prefix that has one (`crate::store::Alert` -> store/mod.rs).
`mod x;` lines place files in the module tree but are no edges. Comments and
string literals are ignored.

Rules:
  (a) the agent (agent/src) has no import cycle between files;
  (b) the control plane's (control-plane/src) largest import cycle has at most
      MAX_CONTROL_PLANE_CYCLE files;
  (c) no file of control-plane/src outside api/ imports `crate::api`, except
      the files in API_IMPORT_ALLOWED (the crate roots and the wiring);
  (d) `anyhow` appears in no .rs under a workspace crate's src/ but main.rs
      and src/bin/*.rs (ANYHOW_ALLOWED lists any other exception);
  (e) crate boundaries, read from `cargo metadata` (normal dependencies):
      FORBIDDEN_DEPS.

  scripts/check-architecture.py [--report] [REPO_ROOT]
      --report prints the figures and violations but always exits 0.
Only the Python standard library is used.
"""

import json
import os
import re
import subprocess
import sys

# --- The rules' parameters (the lead adjusts these) ---------------------------

AGENT_SRC = "agent/src"
CONTROL_PLANE_SRC = "control-plane/src"
MAX_CONTROL_PLANE_CYCLE = 8

# Files of control-plane/src, outside api/, that may import `crate::api`: the
# crate roots and the top-level wiring that builds the router.
API_IMPORT_ALLOWED = {
    "lib.rs",
    "main.rs",
    "app.rs",
}

# .rs files (repository-relative) allowed to use anyhow besides main.rs and
# src/bin/*.rs. The end-to-end test harness (crate tether-tests) is a
# library only tests call, never shipped: its helpers return anyhow errors
# the way a test's body would.
ANYHOW_ALLOWED = {"tests/src/lib.rs"}

# package name -> normal dependencies it must not have.
FORBIDDEN_DEPS = {
    # (protocol's tokio-util, for its frame codec, is allowed today: add
    # "tokio-util" here once the codec has moved out)
    "tether-protocol": {"tokio", "quinn", "quinn-proto", "quinn-udp", "socket2", "mio"},
    "tether-certs": {"sqlx"},
    "tether-agent": {"sqlx", "axum"},
    "tether-control-plane": {"sysinfo", "bollard"},
}

# --- Reading Rust source -------------------------------------------------------

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_code(text):
    """Blanks out comments, string and char literals (keeping offsets and
    newlines), so that only code is searched."""
    out = list(text)
    i, n = 0, len(text)

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif c in "rb" and re.match(r'(?:br|r)#*"', text[i:i + 20]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'(?:br|r)(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + m.end())
            end = n if end < 0 else end + 1 + len(m.group(1))
            blank(i, end)
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            blank(i, j + 1)
            i = j + 1
        elif c == "'":
            # a char literal ('a', '\n', '\u{1F600}'), not a lifetime ('a)
            m = re.match(r"'(?:\\(?:u\{[0-9A-Fa-f]+\}|x[0-9A-Fa-f]{2}|.)|[^\\'\n])'", text[i:])
            if m:
                blank(i, i + m.end())
                i += m.end()
            else:
                i += 1
        else:
            i += 1
    return "".join(out)


def inline_modules(code):
    """(start, end, name) spans of inline `mod name { ... }` blocks."""
    spans = []
    for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*\{", code):
        depth, j = 1, m.end()
        while j < len(code) and depth:
            if code[j] == "{":
                depth += 1
            elif code[j] == "}":
                depth -= 1
            j += 1
        spans.append((m.start(), j, m.group(1)))
    return spans


def inline_path_at(spans, pos):
    return [name for (a, b, name) in sorted(spans) if a <= pos < b]


def expand_use_tree(tree):
    """`a::{b, c::{d, e as f}, self}` -> [([a, b], b), ([a, c, d], d),
    ([a, c, e], f), ([a], a)]: each path with the name it binds."""
    tree = re.sub(r"\s+", "", tree)

    def split_top(s):
        parts, depth, cur = [], 0, ""
        for ch in s:
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
                continue
            depth += ch == "{"
            depth -= ch == "}"
            cur += ch
        if cur:
            parts.append(cur)
        return parts

    def walk(s, prefix):
        brace = s.find("{")
        if brace < 0:
            s, _, alias = s.partition("@")
            segs = [x for x in s.split("::") if x]
            if segs and segs[-1] == "self":
                segs = segs[:-1]
            if segs and segs[-1] == "*":
                return [(prefix + segs[:-1], "*")]
            segs = prefix + segs
            return [(segs, alias or (segs[-1] if segs else ""))]
        head = [x for x in s[:brace].split("::") if x]
        inner = s[brace + 1:s.rfind("}")]
        result = []
        for part in split_top(inner):
            result.extend(walk(part, prefix + head))
        return result

    return walk(tree, [])


def fix_as(tree):
    # `a::b as c` -> `a::b@c` (before whitespace is dropped): the leaf keeps
    # its alias, the binding name
    return re.sub(r"\s+as\s+(" + IDENT + ")", r"@\1", tree)


class Crate:
    """One crate's files (its src/ tree), as a module tree."""

    def __init__(self, root, src_dir, lib_name):
        self.root = root
        self.src_dir = src_dir  # repository-relative
        self.lib_name = lib_name
        self.modules = {}  # module path tuple -> file (repository-relative)
        self.files = []
        abs_src = os.path.join(root, src_dir)
        for dirpath, _dirs, names in os.walk(abs_src):
            for name in names:
                if not name.endswith(".rs"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), abs_src)
                self.files.append(os.path.join(src_dir, rel))
                parts = rel[:-3].split(os.sep)
                if parts in (["lib"], ["main"]):
                    mod = ()
                elif parts[0] == "bin":
                    continue  # binaries are roots of their own
                elif parts[-1] == "mod":
                    mod = tuple(parts[:-1])
                else:
                    mod = tuple(parts)
                if mod == () and parts == ["main"] and () in self.modules:
                    continue  # lib.rs is the root for module paths
                self.modules[mod] = os.path.join(src_dir, rel)
        self.files.sort()
        self.file_module = {f: m for m, f in self.modules.items()}

    def module_of(self, path):
        rel = os.path.relpath(path, self.src_dir)
        parts = rel[:-3].split(os.sep)
        if parts in (["lib"], ["main"]) or parts[0] == "bin":
            return ()
        return tuple(parts[:-1]) if parts[-1] == "mod" else tuple(parts)

    def resolve(self, segs, current, in_use, binary=False):
        """Absolute module path of `segs` written in module `current`, or None
        for a path outside the crate."""
        if not segs:
            return None
        head = segs[0]
        if head == "crate" or (binary and self.lib_name and head == self.lib_name):
            return list(segs[1:])
        if head == "self":
            return list(current) + list(segs[1:])
        if head == "super":
            cur = list(current)
            rest = list(segs)
            while rest and rest[0] == "super":
                if not cur:
                    return None
                cur.pop()
                rest.pop(0)
            return cur + rest
        if in_use and tuple(current) + (head,) in self.modules:
            return list(current) + list(segs)
        return None

    def target_file(self, absolute):
        for k in range(len(absolute), -1, -1):
            f = self.modules.get(tuple(absolute[:k]))
            if f is not None:
                return f, tuple(absolute[:k])
        return None, None

    def _scan(self, f):
        text = open(os.path.join(self.root, f), encoding="utf-8", errors="replace").read()
        code = strip_code(text)
        spans = inline_modules(code)
        file_mod = self.module_of(f)
        binary = f.endswith("main.rs") or "/bin/" in f
        found = []  # (segments, in_use, re-export, position, text)
        bindings = {}  # name -> absolute path, for the file's own top level
        use_spans = []
        for m in re.finditer(r"(?<![A-Za-z0-9_$:])(pub(?:\s*\([^)]*\))?\s+)?use\s+([^;]+);", code):
            use_spans.append((m.start(), m.end()))
            inline = inline_path_at(spans, m.start())
            current = tuple(file_mod) + tuple(inline)
            for segs, name in expand_use_tree(fix_as(m.group(2))):
                if segs and segs[0] == "":
                    segs = segs[1:]
                found.append((segs, True, bool(m.group(1)), m.start(), "use " + "::".join(segs)))
                if not inline and name != "*":
                    absolute = self.resolve(segs, current, True, binary)
                    if absolute is not None:
                        bindings[name] = absolute
        for m in re.finditer(r"(?<![A-Za-z0-9_$:])((?:crate|self|super)(?:::(?:super|" + IDENT + r"))+)", code):
            if not any(a <= m.start() < b for a, b in use_spans):
                found.append((m.group(1).split("::"), False, False, m.start(), m.group(1)))
        # `name::item` in code, where `name` is a module the file imported or
        # a submodule of the current module
        for m in re.finditer(r"(?<![A-Za-z0-9_$:])(" + IDENT + r"(?:::" + IDENT + r")+)", code):
            segs = m.group(1).split("::")
            if any(a <= m.start() < b for a, b in use_spans):
                continue
            if segs[0] in ("crate", "self", "super", "Self") or (self.lib_name and segs[0] == self.lib_name):
                continue
            current = tuple(file_mod) + tuple(inline_path_at(spans, m.start()))
            if segs[0] in bindings:
                found.append((list(bindings[segs[0]]) + segs[1:], "abs", False, m.start(), m.group(1)))
            elif current + (segs[0],) in self.modules:
                found.append((["self"] + segs, False, False, m.start(), m.group(1)))
        if self.lib_name and binary:
            pat = r"(?<![A-Za-z0-9_$:])(" + re.escape(self.lib_name) + r"(?:::" + IDENT + r")+)"
            for m in re.finditer(pat, code):
                found.append((m.group(1).split("::"), False, False, m.start(), m.group(1)))
        return text, spans, file_mod, binary, found, bindings

    def edges(self):
        """{file: {target_file: [import text, ...]}}. A name is followed
        through re-exports to the file that defines it; a `pub use` itself
        (a re-export) is no edge."""
        scans = {f: self._scan(f) for f in self.files}
        graph = {f: {} for f in self.files}
        for f in self.files:
            text, spans, file_mod, binary, found, _ = scans[f]
            for segs, in_use, reexport, pos, shown in found:
                if reexport:
                    continue
                current = tuple(file_mod) + tuple(inline_path_at(spans, pos))
                absolute = list(segs) if in_use == "abs" else self.resolve(segs, current, in_use, binary)
                if absolute is None:
                    continue
                # the file the path names, and each file a re-export leads to
                targets = []
                for _ in range(16):
                    target, prefix = self.target_file(absolute)
                    if target is None:
                        break
                    targets.append(target)
                    rest = absolute[len(prefix):]
                    via = scans[target][5].get(rest[0]) if rest else None
                    if via is None or list(via) == list(absolute):
                        break
                    absolute = list(via) + list(rest[1:])
                line = text.count("\n", 0, pos) + 1
                for target in targets:
                    if target != f:
                        graph[f].setdefault(target, []).append("%s:%d: %s" % (f, line, shown))
        return graph


def strongly_connected(graph):
    """Tarjan's algorithm, iterative. Returns components of 2+ files."""
    index, low, on, stack, comps = {}, {}, set(), [], []
    counter = [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    comps.sort(key=len, reverse=True)
    return comps


def describe_cycle(graph, comp):
    """The edges inside one component, each with its first import."""
    members = set(comp)
    lines = []
    for f in comp:
        for t in sorted(graph[f]):
            if t in members:
                lines.append("    %s -> %s   (%s)" % (f, t, graph[f][t][0]))
    return lines


# --- The checks ----------------------------------------------------------------


def cargo_metadata(root):
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=root, capture_output=True, text=True,
    )
    if out.returncode != 0:
        sys.exit("check-architecture: cargo metadata failed:\n" + out.stderr)
    return json.loads(out.stdout)


def lib_name_of(package):
    for t in package["targets"]:
        if "lib" in t["kind"]:
            return t["name"].replace("-", "_")
    return None


def main(argv):
    report = "--report" in argv
    args = [a for a in argv if a != "--report"]
    if any(a.startswith("-") for a in args) or len(args) > 1:
        sys.exit(__doc__)
    root = os.path.abspath(args[0] if args else os.path.join(os.path.dirname(__file__), ".."))
    meta = cargo_metadata(root)
    members = set(meta["workspace_members"])
    packages = [p for p in meta["packages"] if p["id"] in members]
    by_dir = {os.path.relpath(os.path.dirname(p["manifest_path"]), root): p for p in packages}

    violations = []
    figures = []

    def crate_for(src):
        package = by_dir.get(os.path.dirname(src))
        return Crate(root, src, lib_name_of(package) if package else None)

    # (a) agent: no cycle
    agent = crate_for(AGENT_SRC)
    agent_graph = agent.edges()
    agent_cycles = strongly_connected(agent_graph)
    figures.append("agent: %d files, %d imports between files, %d cycle(s)%s" % (
        len(agent.files), sum(len(v) for v in agent_graph.values()), len(agent_cycles),
        (", largest %d files" % len(agent_cycles[0])) if agent_cycles else ""))
    for comp in agent_cycles:
        violations.append(
            "(a) the agent has an import cycle of %d files (none allowed): %s\n%s"
            % (len(comp), ", ".join(comp), "\n".join(describe_cycle(agent_graph, comp))))

    # (b) control plane: largest cycle <= MAX_CONTROL_PLANE_CYCLE
    cp = crate_for(CONTROL_PLANE_SRC)
    cp_graph = cp.edges()
    cp_cycles = strongly_connected(cp_graph)
    figures.append("control plane: %d files, %d imports between files, %d cycle(s)%s (limit %d)" % (
        len(cp.files), sum(len(v) for v in cp_graph.values()), len(cp_cycles),
        (", largest %d files" % len(cp_cycles[0])) if cp_cycles else "", MAX_CONTROL_PLANE_CYCLE))
    for comp in cp_cycles:
        if len(comp) > MAX_CONTROL_PLANE_CYCLE:
            violations.append(
                "(b) the control plane has an import cycle of %d files (at most %d allowed): %s\n%s"
                % (len(comp), MAX_CONTROL_PLANE_CYCLE, ", ".join(comp), "\n".join(describe_cycle(cp_graph, comp))))

    # (c) nothing outside api/ imports crate::api
    api_dir = os.path.join(CONTROL_PLANE_SRC, "api") + os.sep
    count_c = 0
    for f in cp.files:
        rel = os.path.relpath(f, CONTROL_PLANE_SRC)
        if f.startswith(api_dir) or rel in API_IMPORT_ALLOWED:
            continue
        seen = []
        for target, imports in sorted(cp_graph[f].items()):
            if target.startswith(api_dir):
                seen.extend(i for i in imports if i not in seen)
        for imp in sorted(seen, key=lambda i: int(i.split(":")[1])):
            count_c += 1
            violations.append("(c) %s imports crate::api from outside api/ (%s)" % (f, imp))
    figures.append("control plane: %d import(s) of crate::api from outside api/ (allowed: %s)" % (
        count_c, ", ".join(sorted(API_IMPORT_ALLOWED))))

    # (d) anyhow only in main.rs and src/bin/*.rs
    count_d = 0
    for rel_dir, package in sorted(by_dir.items()):
        src = os.path.join(root, rel_dir, "src")
        for dirpath, _dirs, names in os.walk(src):
            for name in sorted(names):
                if not name.endswith(".rs"):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                inside = os.path.relpath(path, src)
                if inside == "main.rs" or (inside.startswith("bin" + os.sep) and inside.count(os.sep) == 1):
                    continue
                if rel in ANYHOW_ALLOWED:
                    continue
                text = open(path, encoding="utf-8", errors="replace").read()
                code = strip_code(text)
                for m in re.finditer(r"(?<![A-Za-z0-9_])anyhow(?![A-Za-z0-9_])", code):
                    line = text.count("\n", 0, m.start()) + 1
                    count_d += 1
                    violations.append("(d) %s:%d uses anyhow outside main.rs: %s" % (
                        rel, line, text.splitlines()[line - 1].strip()))
    figures.append("anyhow outside main.rs / src/bin: %d use(s)" % count_d)

    # (e) crate boundaries
    count_e = 0
    names = {p["name"]: p for p in packages}
    for name, banned in sorted(FORBIDDEN_DEPS.items()):
        package = names.get(name)
        if package is None:
            violations.append("(e) package %s not found in the workspace (update FORBIDDEN_DEPS)" % name)
            count_e += 1
            continue
        for dep in package["dependencies"]:
            if dep.get("kind") is None and dep["name"] in banned:
                count_e += 1
                violations.append("(e) %s depends on %s (%s must not): %s" % (
                    name, dep["name"], name, os.path.relpath(package["manifest_path"], root)))
    figures.append("crate boundaries: %d forbidden dependenc(ies)" % count_e)

    print("check-architecture: %s" % root)
    for line in figures:
        print("  " + line)
    if violations:
        print("\n%d violation(s):" % len(violations))
        for v in violations:
            print("- " + v)
    else:
        print("no violations")
    if violations and not report:
        print("\ncheck-architecture: FAIL (%d violation(s), listed above)" % len(violations), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
