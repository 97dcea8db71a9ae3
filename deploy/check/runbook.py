#!/usr/bin/env python3
"""Every platform command line in deploy/README.md parses with the real binaries.

    deploy/check/runbook.py README.md secd=PATH secctl=PATH [auth-svc=PATH ...]

Takes each shell block of the runbook (and each inline `secctl …`/`secd …` span of its
prose), joins continued lines, splits pipelines and
`$( ... )`, and keeps each command whose program is `secd`, `secctl` or a service binary
(`<name>-svc`, also as `/usr/local/bin/<name>` after `kubectl exec ... --`). Each is run
with `--help` appended: clap parses the subcommands, flags and enumerated values before
it prints help, so a renamed subcommand, an unknown flag or a bad value fails (exit 2),
and nothing is executed. A program whose binary was not given is a failure, unless it is
named in ALLOW_MISSING (space-separated): then it is reported as `*** SKIPPED`.
"""

import os
import re
import shlex
import subprocess
import sys

PROGRAMS = re.compile(r"^(?:/usr/local/bin/)?(secd|secctl|[a-z]+-svc)$")


def blocks(text):
    """Fenced shell blocks, then inline code spans that start with a platform program."""
    for m in re.finditer(r"```(?:sh|bash|shell|console)?\n(.*?)```", text, re.S):
        yield m.group(1)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for m in re.finditer(r"`([^`\n]+)`", prose):
        span = m.group(1).strip()
        if re.match(r"^(secd|secctl|[a-z]+-svc) ", span) or re.match(r"^kubectl .* -- /usr/local/bin/", span):
            yield span + "\n"


def commands(block):
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"\s#\s.*$", "", line)
        # $( ... ) inner commands, then the line without them.
        inner = re.findall(r"\$\(([^()]*)\)", line)
        outer = re.sub(r"\$\([^()]*\)", "X", line)
        for part in inner + [outer]:
            for seg in re.split(r"\|\||&&|\||;", part):
                yield line, seg.strip()


def argv(seg):
    try:
        words = shlex.split(seg, comments=False)
    except ValueError:
        return None
    # kubectl exec ... -- /usr/local/bin/x args
    if words[:1] == ["kubectl"] and "--" in words:
        words = words[words.index("--") + 1:]
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    if not words or not PROGRAMS.match(words[0]):
        return None
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
            continue
        if w in (">", "<", ">>", "2>", "2>&1"):
            skip = w != "2>&1"
            continue
        if re.match(r"^\d?[<>]", w):
            continue
        out.append(w)
    return out


def main():
    readme = open(sys.argv[1]).read()
    bins = dict(a.split("=", 1) for a in sys.argv[2:])
    checked, missing, failed = {}, {}, []
    for block in blocks(readme):
        for line, seg in commands(block):
            words = argv(seg)
            if not words:
                continue
            prog = PROGRAMS.match(words[0]).group(1)
            path = bins.get(prog)
            if not path:
                missing.setdefault(prog, []).append(line)
                continue
            cmd = [path, *words[1:], "--help"]
            env = {k: v for k, v in os.environ.items() if not k.startswith("SEC_")}
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10, env=env,
                               stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                failed.append(f"{' '.join(words)}\n      {r.stderr.strip().splitlines()[0] if r.stderr.strip() else r.returncode}")
            else:
                checked.setdefault(prog, set()).add(" ".join(words))
    for f in failed:
        print(f"  does not parse: {f}")
    allowed = set(os.environ.get("ALLOW_MISSING", "").split())
    for prog, lines in sorted(missing.items()):
        tag = "*** SKIPPED" if prog in allowed else "NOT CHECKED"
        print(f"  {tag}: {len(set(lines))} line(s) with {prog}: no {prog} binary")
    total = sum(len(v) for v in checked.values())
    print(f"  {total} distinct command lines parse: "
          + ", ".join(f"{p} {len(v)}" for p, v in sorted(checked.items())))
    if failed or set(missing) - allowed:
        sys.exit(1)


if __name__ == "__main__":
    main()
