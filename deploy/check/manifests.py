#!/usr/bin/env python3
"""Checks of the rendered overlays that schemas and checkov do not make.

    deploy/check/manifests.py [--secd SECD_BIN] prod=RENDERED.yaml dev=RENDERED.yaml

- every service of the workspace (each crates/*-svc whose main is `standalone_main`, and
  each entry of secd::SERVICES) has its Deployment in prod, running its own binary; dev
  runs `secd dev`;
- every pod (Deployment, StatefulSet, Job) meets the restricted Pod Security Standard
  (the rules of https://kubernetes.io/docs/concepts/security/pod-security-standards/,
  checked here since no cluster is at hand), and the namespace enforces it;
- no service-account token is mounted; no Secret is in the output and every secret
  setting (database/Redis/NATS URLs, admin token hash, KEK) comes from a secretKeyRef;
- mutual TLS (prod): each service's certificate names the service first (its identity),
  and every identity in a `trusted_peers` or `token.issuers` list is one of them; every
  peer endpoint is a name in the peer's certificate;
- NetworkPolicies: a default deny, DNS, and one policy per service;
- migrations (prod): each service with a database runs `<bin> migrate` from its own image
  in an init container `migrate` that gets the configuration and the database URL only;
- with --secd: each rendered configuration file passes `check-config` of the service's
  own binary (next to SECD_BIN, when built) or of secd, with throwaway TLS files and KEK;
  and, with the service's own binary, its init container's `migrate` loads it and runs
  twice on SQLite (everything applied, then nothing).
"""

import os
import pathlib
import re
import subprocess
import sys
import tempfile
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
SECRET_VARS = {
    "SEC_STORAGE__DATABASE_URL", "SEC_STORAGE__REDIS_URL", "SEC_EVENTS__NATS_URL",
    "SEC_AUTH__ADMIN_TOKEN_HASH", "SEC_CRYPTO__KEK", "SEC_OAUTH__REGISTRATION_TOKEN_HASH",
}
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                   "persistentVolumeClaim", "projected", "secret"}
problems = []


def problem(msg):
    problems.append(msg)


def workspace_services():
    crates = sorted(
        p.parent.parent.name
        for p in ROOT.glob("crates/*-svc/src/main.rs")
        if "standalone_main" in p.read_text()
    )
    lib = (ROOT / "crates/secd/src/lib.rs").read_text()
    listed = re.findall(r"&(\w+)_svc::SPEC", lib)
    for n in listed:
        if f"{n}-svc" not in crates:
            problem(f"secd::SERVICES lists {n} but crates/{n}-svc has no standalone main")
    return sorted(set(crates) | {f"{n}-svc" for n in listed})


def pod_specs(docs):
    for d in docs:
        kind = d.get("kind")
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield f"{kind}/{d['metadata']['name']}", d["spec"]["template"]["spec"]
        elif kind == "CronJob":
            yield f"CronJob/{d['metadata']['name']}", d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif kind == "Pod":
            yield f"Pod/{d['metadata']['name']}", d["spec"]


def restricted(where, spec):
    """The restricted Pod Security Standard (baseline + restricted controls)."""
    psc = spec.get("securityContext", {}) or {}
    for k in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(k):
            problem(f"{where}: {k}")
    for v in spec.get("volumes", []) or []:
        kinds = set(v) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            problem(f"{where}: volume {v['name']} of type {', '.join(kinds - ALLOWED_VOLUMES)}")
    for s in psc.get("sysctls", []) or []:
        problem(f"{where}: sysctl {s.get('name')}")
    if psc.get("runAsUser") == 0:
        problem(f"{where}: pod runAsUser 0")
    containers = (spec.get("initContainers") or []) + spec.get("containers", []) + (spec.get("ephemeralContainers") or [])
    for c in containers:
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext", {}) or {}
        if sc.get("privileged"):
            problem(f"{cw}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problem(f"{cw}: allowPrivilegeEscalation must be false")
        if not (sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is not False)):
            problem(f"{cw}: runAsNonRoot must be true")
        if sc.get("runAsUser") == 0:
            problem(f"{cw}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problem(f"{cw}: seccompProfile must be RuntimeDefault or Localhost")
        caps = sc.get("capabilities", {}) or {}
        if "ALL" not in (caps.get("drop") or []):
            problem(f"{cw}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problem(f"{cw}: adds capabilities {caps.get('add')}")
        if sc.get("procMount") not in (None, "Default"):
            problem(f"{cw}: procMount")
        for p in c.get("ports", []) or []:
            if p.get("hostPort"):
                problem(f"{cw}: hostPort")
        if (sc.get("seLinuxOptions") or {}).get("type") not in (None, "", "container_t", "container_init_t", "container_kvm_t"):
            problem(f"{cw}: seLinuxOptions type")
        # Beyond the standard, what the issue asks of every container.
        if sc.get("readOnlyRootFilesystem") is not True:
            problem(f"{cw}: readOnlyRootFilesystem must be true")
        res = c.get("resources", {}) or {}
        for k in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(k) or {}):
                    problem(f"{cw}: no {k}.{r}")
        for e in c.get("env", []) or []:
            if e["name"] in SECRET_VARS and "secretKeyRef" not in (e.get("valueFrom") or {}):
                problem(f"{cw}: {e['name']} must come from a secretKeyRef")
    if spec.get("automountServiceAccountToken") is not False:
        problem(f"{where}: automountServiceAccountToken must be false")


def check_overlay(name, docs):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    ns = by_kind.get("Namespace", {})
    if not ns:
        problem(f"{name}: no Namespace")
    for n, d in ns.items():
        labels = d["metadata"].get("labels", {})
        if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
            problem(f"{name}: namespace {n} does not enforce the restricted Pod Security Standard")
    if "Secret" in by_kind:
        problem(f"{name}: Secrets in the output ({', '.join(by_kind['Secret'])}): secrets are made out of band")
    for sa, d in by_kind.get("ServiceAccount", {}).items():
        if d.get("automountServiceAccountToken") is not False:
            problem(f"{name}: ServiceAccount {sa} mounts its token")
    pods = list(pod_specs(docs))
    for where, spec in pods:
        restricted(f"{name}: {where}", spec)
    policies = by_kind.get("NetworkPolicy", {})
    deny = [p for p in policies.values()
            if p["spec"].get("podSelector") == {} and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    if not deny:
        problem(f"{name}: no default-deny NetworkPolicy")
    if "allow-dns" not in policies:
        problem(f"{name}: no DNS NetworkPolicy")
    for dep in by_kind.get("Deployment", {}):
        if dep not in policies:
            problem(f"{name}: Deployment {dep} has no NetworkPolicy of its own")
    return by_kind, len(pods)


def pod_labels(d):
    return d["spec"]["template"]["metadata"].get("labels", {})


def configs(by_kind):
    """config.toml of each ConfigMap, by the Deployment that mounts it."""
    cms = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", {}).values()}
    out = {}
    for dep, d in by_kind.get("Deployment", {}).items():
        for v in d["spec"]["template"]["spec"].get("volumes", []):
            cm = (v.get("configMap") or {}).get("name")
            if cm and "config.toml" in cms.get(cm, {}).get("data", {}):
                out[dep] = (cms[cm]["data"]["config.toml"], d)
    return out


def check_identities(by_kind, cfgs):
    certs = {d["spec"]["secretName"]: d for d in by_kind.get("Certificate", {}).values()}
    identities = {}
    for dep in by_kind.get("Deployment", {}):
        c = certs.get(f"{dep}-tls")
        if not c:
            problem(f"prod: no Certificate for Secret {dep}-tls (Deployment {dep})")
            continue
        names = c["spec"].get("dnsNames", [])
        want = dep.removesuffix("-svc")
        if c["spec"].get("uris"):
            problem(f"prod: Certificate {dep} has a URI SAN: tls.rs would take it as the identity, and crypto-svc key names cannot hold it")
        if not names or names[0] != want:
            problem(f"prod: Certificate {dep}: first DNS name must be the identity {want!r}, is {names[:1]}")
        if "client auth" not in c["spec"].get("usages", []) or "server auth" not in c["spec"].get("usages", []):
            problem(f"prod: Certificate {dep} must allow server auth and client auth")
        identities[want] = set(names)
    for dep, (text, _) in cfgs.items():
        cfg = tomllib.loads(text)
        for peer in cfg.get("auth", {}).get("trusted_peers", []):
            if peer not in identities:
                problem(f"prod: {dep}: trusted peer {peer!r} is no certificate's identity")
        for issuer in cfg.get("token", {}).get("issuers", []):
            if issuer not in identities:
                problem(f"prod: {dep}: token.issuers {issuer!r} is no certificate's identity")
        for svc, addrs in cfg.get("services", {}).items():
            ep = addrs.get("endpoint")
            if ep:
                host = re.match(r"https://([^:/]+)", ep)
                if not host:
                    problem(f"prod: {dep}: services.{svc}.endpoint {ep} is not https")
                elif host.group(1) not in identities.get(svc, set()):
                    problem(f"prod: {dep}: services.{svc}.endpoint host {host.group(1)} is not in {svc}-svc's certificate")
    return identities


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def throwaway_tls(d):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=deploy-check CA",
            "-addext", "basicConstraints=critical,CA:true", "-addext", "keyUsage=critical,keyCertSign", cwd=d)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "tls.key", "-out", "leaf.csr", "-subj", "/CN=check", cwd=d)
    (pathlib.Path(d) / "ext").write_text("subjectAltName=DNS:check\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "tls.crt", "-days", "1", "-extfile", "ext", cwd=d)


def check_configs(secd, overlay, cfgs):
    """Each configuration through check-config, as the pod would load it."""
    ok = []
    bindir = pathlib.Path(secd).parent
    with tempfile.TemporaryDirectory(prefix="deploy-check-config-") as d:
        tls = pathlib.Path(d, "tls")
        kek = pathlib.Path(d, "kek")
        tls.mkdir()
        kek.mkdir()
        throwaway_tls(tls)
        (kek / "current").write_text("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n")
        for dep, (text, d_obj) in sorted(cfgs.items()):
            path = pathlib.Path(d, f"{dep}.toml")
            path.write_text(text.replace("/etc/sec/tls/", f"{tls}/").replace("/etc/sec/kek/", f"{kek}/"))
            binary = bindir / dep
            own = binary.exists() and dep != "secd"
            cmd = [str(binary) if own else secd, "check-config"]
            env = {k: v for k, v in os.environ.items() if not k.startswith("SEC_")}
            env.update({
                "SEC_CONFIG": str(path),
                "SEC_STORAGE__DATABASE_URL": "postgres://sec:x@postgres.invalid:5432/sec",
                "SEC_STORAGE__REDIS_URL": "redis://redis.invalid:6379/",
                "SEC_EVENTS__NATS_URL": "nats://nats.invalid:4222",
                "SEC_AUTH__ADMIN_TOKEN_HASH": "sha256:" + "0" * 64,
            })
            container = d_obj["spec"]["template"]["spec"]["containers"][0]
            for e in container.get("env", []):
                if (e.get("valueFrom") or {}).get("configMapKeyRef"):
                    env[e["name"]] = "https://login.example.com"
            names = {e["name"] for e in container.get("env", [])}
            for var in ("SEC_STORAGE__DATABASE_URL", "SEC_STORAGE__REDIS_URL"):
                if var not in names:
                    env.pop(var, None)
            if not own and dep != "secd" and "kek_file" not in text:
                # secd checks every service; crypto-svc's KEK is not in this file.
                env["SEC_CRYPTO__KEK_FILE"] = str(kek / "current")
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                problem(f"{overlay}: {dep}'s config.toml fails `{pathlib.Path(cmd[0]).name} check-config`: {r.stderr.strip()[-400:]}")
            else:
                ok.append(f"{dep} ({pathlib.Path(cmd[0]).name})")
            init = {c["name"]: c for c in d_obj["spec"]["template"]["spec"].get("initContainers") or []}.get("migrate")
            if own and init and r.returncode == 0 and migrate_check(overlay, dep, binary, path, init, d):
                ok[-1] = f"{dep} ({binary.name}; and its init container's `{binary.name} migrate`, twice, on SQLite)"
    return ok


def migrate_check(overlay, dep, binary, config, init, tmp):
    """The init container's `migrate` with what it is given (the file and its variables, no
    TLS files, keys or other secrets), on SQLite in place of the database: it must load the
    configuration, apply every migration, and apply nothing the second time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEC_")}
    env["SEC_CONFIG"] = str(config)
    env["SEC_DATA_DIR"] = str(pathlib.Path(tmp, f"migrate-{dep}"))
    given = {e["name"] for e in init.get("env", [])}
    if given - {"SEC_CONFIG", "SEC_STORAGE__DATABASE_URL"}:
        problem(f"{overlay}: {dep}'s migrate init container gets more than the configuration and "
                f"the database URL: {', '.join(sorted(given))}")
    if "SEC_STORAGE__DATABASE_URL" not in given:
        problem(f"{overlay}: {dep}'s migrate init container has no SEC_STORAGE__DATABASE_URL")
    for run, want in ((1, "migrations applied now"), (2, "is up to date")):
        r = subprocess.run([str(binary), *init["args"]], env=env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0 or want not in r.stdout:
            problem(f"{overlay}: {dep} migrate (run {run}) with its init container's configuration: "
                    f"exit {r.returncode}: {(r.stdout + r.stderr).strip()[-400:]}")
            return False
    return True


def check_secctl_config(secd):
    """deploy/secctl-port-forward.toml loads, with files where it expects them."""
    with tempfile.TemporaryDirectory(prefix="deploy-check-secctl-") as d:
        tls = pathlib.Path(d, "secctl-tls")
        tls.mkdir()
        throwaway_tls(tls)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEC_")}
        env["SEC_CONFIG"] = str(ROOT / "deploy" / "secctl-port-forward.toml")
        r = subprocess.run([secd, "check-config"], cwd=d, env=env, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            problem(f"deploy/secctl-port-forward.toml fails `secd check-config`: {r.stderr.strip()[-400:]}")
            return None
        endpoints = set(re.findall(r'endpoint = "(https://localhost:\d+)"', r.stdout))
        return f"deploy/secctl-port-forward.toml loads ({len(endpoints)} https://localhost endpoints)"


def main():
    args = sys.argv[1:]
    secd = None
    if args[:1] == ["--secd"]:
        secd, args = args[1], args[2:]
    rendered = dict(a.split("=", 1) for a in args)
    services = workspace_services()
    summary = []
    migrating = []
    for overlay, path in rendered.items():
        docs = [d for d in yaml.safe_load_all(open(path)) if d]
        by_kind, npods = check_overlay(overlay, docs)
        deps = by_kind.get("Deployment", {})
        cfgs = configs(by_kind)
        if overlay == "prod":
            for s in services:
                d = deps.get(s)
                if not d:
                    problem(f"prod: service {s} has no Deployment")
                    continue
                pod = d["spec"]["template"]["spec"]
                main_c = pod["containers"][0]
                cmd = main_c.get("command", [])
                if cmd[:1] != [f"/usr/local/bin/{s}"]:
                    problem(f"prod: Deployment {s} does not run /usr/local/bin/{s}")
                labels = pod_labels(d)
                if labels.get("sec.platform/postgres") == "true":
                    init = {c["name"]: c for c in pod.get("initContainers") or []}.get("migrate")
                    if not init or init.get("command") != cmd or init.get("args") != ["migrate"] \
                            or init.get("image") != main_c.get("image"):
                        problem(f"prod: Deployment {s} has no init container `migrate` running "
                                f"`{s} migrate` from its own image")
                    else:
                        migrating.append(s)
            summary.append(f"prod: an init container runs `<bin> migrate` before each of {', '.join(migrating)}")
            ids = check_identities(by_kind, cfgs)
            summary.append(f"prod: a Deployment for each of the {len(services)} services ({', '.join(services)}); "
                           f"certificate identities {', '.join(sorted(ids))} match trusted_peers, token.issuers and endpoints")
        else:
            d = deps.get("secd")
            if not d or d["spec"]["template"]["spec"]["containers"][0].get("args") != ["dev"]:
                problem(f"{overlay}: no Deployment running `secd dev`")
            else:
                summary.append(f"{overlay}: secd runs all {len(services)} services in one Deployment")
        summary.append(f"{overlay}: {npods} pod templates meet the restricted Pod Security Standard, "
                       f"read-only root, limits, no service-account token, secrets by reference only")
        if secd:
            ok = check_configs(secd, overlay, cfgs)
            if ok:
                summary.append(f"{overlay}: check-config accepts the configuration of " + ", ".join(ok))
    if secd:
        s = check_secctl_config(secd)
        if s:
            summary.append(s)
    if problems:
        for p in problems:
            print(f"  {p}")
        sys.exit(1)
    for s in summary:
        print(f"  {s}")


if __name__ == "__main__":
    main()
