#!/usr/bin/env bash
# Checks the monitoring deliverables (deploy/prometheus, deploy/grafana); CI runs it from
# scripts/test.sh. Idempotent; exits non-zero on the first failure.
#   1. promtool check config deploy/prometheus/prometheus.yml   (scrape config + the rules it loads)
#   2. promtool check rules  deploy/prometheus/alerts.yml
#   3. promtool test rules   deploy/prometheus/alerts.test.yml  (every alert fires / stays quiet)
#   4. deploy/grafana/chatmesh.json parses, and every metric name used in alerts.yml and in the
#      dashboard is documented in docs/metrics.md (its table lines starting "| `chatmesh_" or
#      "| `process_"; histogram series _bucket/_sum/_count count as their histogram).
#   5. every dashboard query is valid PromQL (promtool check rules on them as recording rules,
#      Grafana's $variables replaced by sample values).
# promtool comes from Debian's `prometheus` package, installed by scripts/setup.sh --test.
# Settings (environment):
#   CHECK_MONITORING_METRICS_DOC   the documented metric list to check against (default docs/metrics.md)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "check-monitoring: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }
need() { command -v "$1" >/dev/null 2>&1; }

prom=deploy/prometheus
dashboard=deploy/grafana/chatmesh.json
metrics_doc="${CHECK_MONITORING_METRICS_DOC:-docs/metrics.md}"

need promtool || die "promtool is missing (scripts/setup.sh --test installs Debian's prometheus package)"
need python3 || die "python3 is missing"
need python3 || die "python3 is missing and could not be installed"

say "$(promtool --version 2>&1 | head -n 1)"
say "promtool check config $prom/prometheus.yml"
promtool check config "$prom/prometheus.yml" || die "promtool check config $prom/prometheus.yml"
say "promtool check rules $prom/alerts.yml"
promtool check rules "$prom/alerts.yml" || die "promtool check rules $prom/alerts.yml"
say "promtool test rules $prom/alerts.test.yml"
promtool test rules "$prom/alerts.test.yml" || die "promtool test rules $prom/alerts.test.yml"

say "python3 -m json.tool $dashboard"
python3 -m json.tool "$dashboard" >/dev/null || die "$dashboard is not valid JSON"

[ -f "$metrics_doc" ] || die "$metrics_doc is missing: it documents the metric names alerts and dashboard may use"
say "metric names in $prom/alerts.yml and $dashboard against $metrics_doc"
dashboard_rules="$(mktemp --suffix=.yml)"
trap 'rm -f "$dashboard_rules"' EXIT
python3 - "$metrics_doc" "$prom/alerts.yml" "$dashboard" "$dashboard_rules" <<'PY' || die "undocumented metric names (above)"
import json, re, sys

doc_path, alerts_path, dashboard_path, rules_out = sys.argv[1:5]

# The documented names: first backticked token of each table line "| `chatmesh_..." / "| `process_...".
documented = set()
with open(doc_path, encoding="utf-8") as f:
    for line in f:
        m = re.match(r"\|\s*`((?:chatmesh|process)_[A-Za-z0-9_:]*)", line)
        if m:
            documented.add(m.group(1))
if not documented:
    print(f"{doc_path}: no table line starts with | `chatmesh_ or | `process_", file=sys.stderr)
    sys.exit(1)
# Series Prometheus itself adds to every target.
builtin = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling",
           "scrape_series_added"}

def known(name):
    if name in documented or name in builtin:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in documented:
            return True
    return False

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
            "unless", "atan2", "inf", "nan", "start", "end"}

def metric_names(expr):
    """Metric names an expression selects (a tokenizer, not a full PromQL parser)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    e = re.sub(r"\{[^{}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\[\]]*\]", "", e)  # ranges and subqueries ([5m], [$__rate_interval])
    # label lists of by/without/on/ignoring/group_left/group_right, and Grafana variables
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", e)
    e = re.sub(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word in KEYWORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    # label_values(metric, label) and friends: the label argument is not a metric
    for m in re.finditer(r"\blabel_values\s*\(\s*[A-Za-z_:][A-Za-z0-9_:]*\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)", e):
        names.discard(m.group(1))
    return names

# alerts.yml: the `expr:` values (inline or block scalars), without needing a YAML library.
exprs = []
lines = open(alerts_path, encoding="utf-8").read().splitlines()
i = 0
while i < len(lines):
    m = re.match(r"^(\s*)(?:-\s+)?expr:\s*(.*)$", lines[i])
    i += 1
    if not m:
        continue
    indent, value = len(m.group(1)), m.group(2).strip()
    if value[:1] in ("|", ">"):
        block = []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            block.append(lines[i])
            i += 1
        value = "\n".join(block)
    elif value[:1] in ("'", '"'):
        value = value[1:-1]
    exprs.append((alerts_path, value))
if not exprs:
    print(f"{alerts_path}: no expr found", file=sys.stderr)
    sys.exit(1)

# The dashboard: every target expr (panels, rows' nested panels) and every query variable.
board = json.load(open(dashboard_path, encoding="utf-8"))
n_alert_exprs = len(exprs)
def walk(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                exprs.append((dashboard_path, v))
            else:
                walk(v)
    elif isinstance(node, list):
        for v in node:
            walk(v)
walk(board.get("panels", []))
for var in board.get("templating", {}).get("list", []):
    if var.get("type") != "query":
        continue  # datasource, interval, custom... variables hold no PromQL
    query = var.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    if isinstance(query, str) and query:
        exprs.append((dashboard_path, query))

bad = []
used = set()
for path, expr in exprs:
    for name in sorted(metric_names(expr)):
        used.add(name)
        if not known(name):
            bad.append(f"{path}: {name} in: {' '.join(expr.split())}")
# Any chatmesh_/process_ name anywhere in the two files (annotations, panel descriptions too).
for path in (alerts_path, dashboard_path):
    text = open(path, encoding="utf-8").read()
    for name in sorted(set(re.findall(r"(?<![\w$])((?:chatmesh|process)_[a-z0-9_]*[a-z0-9])\b", text))):
        used.add(name)
        if not known(name):
            bad.append(f"{path}: {name} (mentioned)")
# The dashboard's PromQL as recording rules, for promtool to parse.
with open(rules_out, "w", encoding="utf-8") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for n, (_, expr) in enumerate(exprs[n_alert_exprs:]):
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL (its metric was checked above)
        e = re.sub(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}", "5m", expr)
        e = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", e)
        f.write(f"      - record: dashboard:query_{n}\n        expr: {json.dumps(e)}\n")
for b in bad:
    print(f"undocumented metric: {b}", file=sys.stderr)
if bad:
    sys.exit(1)
print(f"check-monitoring: {len(exprs)} expressions, {len(used)} metric names, all documented in {doc_path}",
      file=sys.stderr)
PY
say "promtool check rules on the dashboard's queries"
promtool check rules "$dashboard_rules" >/dev/null || die "a query in $dashboard is not valid PromQL (above)"

say "OK"
