#!/usr/bin/env python3
"""Every metric the alerts and the dashboard query is one a running `secd dev` serves.

    deploy/check/metrics.py SECD_BIN RENDERED.yaml [RENDERED.yaml...] DASHBOARD.json

Starts `secd dev` (embedded storage, a temporary data directory, every port 0, and one
edge rate-limit rule on /token so that the edge layer counts decisions), drives a
little traffic through the facade so that label-ful metrics exist (a metric family with
no labelled child yet is not on /metrics at all, not even as `# TYPE`): a dynamic client
registration, a client_credentials grant, one with a wrong secret, introspection of a
JWT signed by no known key (token-svc rejects it), and a failed password login through
the login form. Then it reads /metrics on all seven admin ports and checks:

- every metric name in the PrometheusRule expressions (from the rendered overlays) and
  in the dashboard's queries is served (`up` is Prometheus's own and is allowed);
- every label a selector matches on (`name{label=...}`) is a label of that metric's
  samples (`job` and `instance` come from the scrape and are allowed).

Exit 1 with the missing names otherwise. Bounded: 60 s to start, 10 s per request.
"""

import base64
import html.parser
import http.cookiejar
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

SERVICES = ["audit", "crypto", "token", "session", "auth", "gdpr", "assess"]
PROMETHEUS_OWN = {"up"}
SCRAPE_LABELS = {"job", "instance", "le"}
# Words in PromQL that look like names but are not metrics.
PROMQL_WORDS = {
    "sum", "rate", "increase", "max", "min", "avg", "count", "by", "without", "and", "or",
    "unless", "on", "ignoring", "group_left", "group_right", "histogram_quantile", "topk",
    "bottomk", "bool", "offset", "irate", "delta", "abs", "clamp_min", "clamp_max",
    "label_values", "humanizePercentage", "vector", "scalar", "time", "absent",
}


def fail(msg):
    print(f"metrics: {msg}", file=sys.stderr)
    sys.exit(1)


# secd dev has no rate-limit rule by default, and sec_edge_ratelimit_decisions_total has
# a sample only once a rule decided something. Generous: it never refuses the traffic below.
EDGE_RULE = """
[[edge.ratelimit.rules]]
id = "deploy-check-token"
match = { route = "/token" }
key = ["ip"]
limit = { rate = 1000, per = "minute", burst = 1000 }
"""


def start_secd(secd, workdir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEC_")}
    env.update({"SEC_FACADE__HTTP_ADDR": "127.0.0.1:0", "SEC_TELEMETRY__LOG_LEVEL": "warn"})
    config = os.path.join(workdir, "secd.toml")
    with open(config, "w") as f:
        f.write(EDGE_RULE)
    env["SEC_CONFIG"] = config
    for s in SERVICES:
        env[f"SEC_SERVICES__{s.upper()}__GRPC_ADDR"] = "127.0.0.1:0"
        env[f"SEC_SERVICES__{s.upper()}__ADMIN_ADDR"] = "127.0.0.1:0"
    log = open(os.path.join(workdir, "secd.log"), "w+")
    proc = subprocess.Popen(
        [secd, "dev", "--data-dir", os.path.join(workdir, "data")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    deadline = time.time() + 60
    facade, admins = None, {}
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            fail(f"secd exited with {proc.returncode}:\n{log.read()}")
        log.seek(0)
        text = log.read()
        m = re.search(r"facade\s+(http://[0-9.:]+)", text)
        admins = dict(re.findall(r"^\s+(\w+)\s+grpc \S+\s+admin (http://[0-9.:]+)/readyz", text, re.M))
        if m and len(admins) == len(SERVICES):
            facade = m.group(1)
            try:
                urllib.request.urlopen(f"{facade}/.well-known/openid-configuration", timeout=5).read()
                return proc, facade, admins
            except (urllib.error.URLError, ConnectionError):
                pass
        time.sleep(0.3)
    stop(proc)
    log.seek(0)
    fail(f"secd did not come up within 60 s:\n{log.read()}")


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Forms(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.fields = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "input" and a.get("type") == "hidden" and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")


def request(opener, url, data=None, headers=None, expect_error=False):
    body = None
    if data is not None:
        body = data if isinstance(data, bytes) else urllib.parse.urlencode(data).encode()
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        if not expect_error:
            fail(f"{url}: HTTP {e.code}: {e.read()[:300]!r}")
        return e.code, e.read().decode()


def drive_traffic(facade, admin_token):
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    redirect = "http://127.0.0.1:9/cb"
    _, reg = request(
        opener, f"{facade}/register",
        data=json.dumps({
            "client_name": "deploy-check", "grant_types": ["client_credentials", "authorization_code"],
            "response_types": ["code"], "redirect_uris": [redirect], "scope": "openid",
            "token_endpoint_auth_method": "client_secret_basic",
        }).encode(),
        headers={"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"},
    )
    reg = json.loads(reg)
    cid, secret = reg["client_id"], reg["client_secret"]
    basic = lambda s: {"Authorization": "Basic " + base64.b64encode(f"{cid}:{s}".encode()).decode()}
    _, tok = request(opener, f"{facade}/token", {"grant_type": "client_credentials"}, basic(secret))
    if "access_token" not in json.loads(tok):
        fail(f"client_credentials grant gave no token: {tok[:300]}")
    request(opener, f"{facade}/token", {"grant_type": "client_credentials"}, basic("wrong"), expect_error=True)
    # A JWT no key of token-svc signed: token-svc rejects it (unknown_key).
    fake = "eyJhbGciOiJFUzI1NiIsImtpZCI6Im5vbmUiLCJ0eXAiOiJhdCtqd3QifQ.eyJ4IjoxfQ.AAAA"
    request(opener, f"{facade}/introspect", {"token": fake}, {"Authorization": f"Bearer {admin_token}"})
    # The login form of the authorization code flow, with a user that does not exist.
    q = urllib.parse.urlencode({
        "response_type": "code", "client_id": cid, "redirect_uri": redirect, "scope": "openid",
        "state": "deploy-check", "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        "code_challenge_method": "S256",
    })
    _, page = request(opener, f"{facade}/authorize?{q}")
    form = Forms()
    form.feed(page)
    if "csrf" not in form.fields:
        fail("the authorization request did not show the login form")
    fields = dict(form.fields, username="deploy-check-nobody", password="not the password")
    request(opener, f"{facade}/login", fields, expect_error=True)


def served(admins):
    """Metric name -> label names seen on its samples, over all admin ports."""
    names = {}
    for svc, base in admins.items():
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(maxsplit=3)
                suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                            "summary": ["_sum", "_count", ""]}.get(kind, [""])
                for s in suffixes:
                    names.setdefault(name + s, set())
            elif line and not line.startswith("#"):
                m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?", line)
                labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or ""))
                names.setdefault(m.group(1), set()).update(labels)
    return names


def used(rendered_files, dashboard):
    """(where, expr) pairs from the rules of every rendered overlay and the dashboard."""
    exprs = []
    for path in rendered_files:
        for doc in yaml.safe_load_all(open(path)):
            if doc and doc.get("kind") == "PrometheusRule":
                for g in doc["spec"]["groups"]:
                    for r in g["rules"]:
                        exprs.append((f"{os.path.basename(path)}: {r.get('alert') or r.get('record')}", r["expr"]))
    d = json.load(open(dashboard))
    for p in d.get("panels", []):
        for t in p.get("targets", []):
            exprs.append((f"dashboard: {p['title']}", t["expr"]))
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            exprs.append((f"dashboard: variable {v['name']}", q.get("query", "")))
    return exprs


def names_in(expr):
    # Drop strings (label values, legends) and durations, then take identifiers that are
    # not followed by `=`/`!=`/`=~` (label names) and are not PromQL words.
    e = re.sub(r'"[^"]*"', '""', expr)
    e = re.sub(r"label_values\(([^,()]+),[^)]*\)", r"\1", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    found = set()
    for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*(=~|!~|!=|=(?!=)))?", e):
        word, op = m.group(1), m.group(2)
        if op or word in PROMQL_WORDS or re.fullmatch(r"\d.*", word):
            continue
        if re.fullmatch(r"(e|inf|nan)", word, re.I):
            continue
        found.add(word)
    return found


def selectors_in(expr):
    e = re.sub(r"\[[^\]]*\]", "", expr)
    for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", e):
        yield m.group(1), set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))


def main():
    if len(sys.argv) < 4:
        fail(__doc__)
    secd, rendered, dashboard = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
    exprs = used(rendered, dashboard)
    with tempfile.TemporaryDirectory(prefix="deploy-check-") as work:
        proc, facade, admins = start_secd(secd, work)
        try:
            admin_token = open(os.path.join(work, "data", "admin.token")).read().strip()
            drive_traffic(facade, admin_token)
            have = served(admins)
        finally:
            stop(proc)
    missing, bad_labels, names = [], [], set()
    for where, expr in exprs:
        for n in names_in(expr):
            names.add(n)
            if n not in have and n not in PROMETHEUS_OWN:
                missing.append(f"{where}: {n}")
        for n, labels in selectors_in(expr):
            if n in have and have[n]:
                extra = labels - have[n] - SCRAPE_LABELS
                if extra:
                    bad_labels.append(f"{where}: {n} has no label {', '.join(sorted(extra))} (it has {', '.join(sorted(have[n]))})")
    if missing or bad_labels:
        for m in sorted(set(missing)):
            print(f"  not served by secd: {m}")
        for b in sorted(set(bad_labels)):
            print(f"  {b}")
        sys.exit(1)
    sec = sorted(n for n in names if n not in PROMETHEUS_OWN)
    print(f"{len(exprs)} queries (alerts + dashboard) use {len(sec)} metric names, all served by "
          f"secd dev on its 7 admin ports ({sum(1 for n in have if n.startswith('sec_'))} sec_* names served)")


if __name__ == "__main__":
    main()
