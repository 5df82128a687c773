"""Every command the docs show names a real subcommand, script and option.

README.md, jobs/README.md and docs/results.md are read as a user reads them: the shell blocks and the inline
`code` spans. Each `pni-ray ...` is walked through the click command tree; each
`python benchmarks/X.py ...` / `python -m pkg.mod ...` of this repository is checked against the
option strings its source declares. A renamed option or command fails here, not on a user's
machine. Placeholders (`...`) and comments are skipped.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from pni_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "jobs/README.md", "docs/results.md")


def shown_commands(text: str) -> list[str]:
    """Shell commands of the fenced blocks (backslash and indented continuations joined, comments cut)
    and of the inline spans, split at `&&`, `;` and pipes (not at `a|b` choices or inside [...])."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        lines: list[str] = []
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].rstrip()
            if lines and line[:1].isspace() and line.strip():  # a synopsis continued on the next line
                lines[-1] += " " + line.strip()
            elif line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
        found += lines
    found += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [p for c in found for p in _split_shell(c) if p]


def _split_shell(command: str) -> list[str]:
    parts, depth, current = [], 0, ""
    i = 0
    while i < len(command):
        ch = command[i]
        depth += {"[": 1, "]": -1}.get(ch, 0)
        for sep in ("&&", ";", " | "):
            if depth == 0 and command.startswith(sep, i):
                parts.append(current.strip())
                current, i = "", i + len(sep)
                break
        else:
            current += ch
            i += 1
    return parts + [current.strip()]


def _tokens(command: str) -> list[str]:
    """Arguments after the program, optional ones shown as `[--opt X]` unbracketed, placeholders
    (`INPUT...`, `...`) dropped."""
    return [t.strip("[]") for t in shlex.split(command)[1:] if t.strip("[]") and "..." not in t]


def _is_option(token: str) -> bool:
    return token.startswith("-") and token != "-" and not re.match(r"-\d", token)


def cli_problems(command: str) -> list[str]:
    """Unknown subcommands or options of one `pni-ray ...` line."""
    tokens = _tokens(command)
    cmd: click.Command = main
    while isinstance(cmd, click.Group) and tokens and not tokens[0].startswith("-"):
        sub = cmd.get_command(click.Context(cmd), tokens[0])
        if sub is None:
            return [f"no command {tokens[0]!r}"]
        cmd, tokens = sub, tokens[1:]
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
    return [f"no option {t.split('=')[0]!r} on `{cmd.name}`" for t in tokens
            if _is_option(t) and t.split("=")[0] not in known]


def script_problems(command: str) -> list[str]:
    """Unknown options of one `python benchmarks/X.py ...` or `python -m pkg.mod ...` of this repository."""
    tokens = _tokens(command)
    if tokens[0] == "-m":
        path, args = ROOT / (tokens[1].replace(".", "/") + ".py"), tokens[2:]
    else:
        path, args = ROOT / tokens[0], tokens[1:]
    if not path.is_file():
        return [] if tokens[0] == "-m" else [f"no script {tokens[0]}"]  # -m of another package (pytest, venv)
    declared = set(re.findall(r"[\"'](--?[A-Za-z][\w-]*)[\"']", path.read_text())) | {"-h", "--help"}
    return [f"no option {t.split('=')[0]!r} in {path.relative_to(ROOT)}" for t in args
            if _is_option(t) and t.split("=")[0] not in declared]


def doc_commands() -> list[tuple[str, str]]:
    pairs = []
    for doc in DOCS:
        for command in shown_commands((ROOT / doc).read_text()):
            m = re.search(r"(?:^|\s)((?:pni-ray|python3?) .*)$", command)
            if m and m.group(1).split()[1] == "...":  # "pni-ray ... --address": any command
                continue
            if m and (m.group(1).startswith("pni-ray ") or re.match(r"python3? (-m \S+|benchmarks/)", m.group(1))):
                pairs.append((doc, m.group(1)))
    return pairs


def test_docs_show_commands_to_check():
    commands = doc_commands()
    assert sum(c.startswith("pni-ray ") for _, c in commands) >= 20
    assert sum("benchmarks/" in c for _, c in commands) >= 10
    assert any(c.startswith("pni-ray nightly --config") for _, c in commands)


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_in_the_docs_exists_with_its_options(doc):
    problems = [f"{c}: {p}" for d, c in doc_commands() if d == doc
                for p in (cli_problems(c) if c.startswith("pni-ray ") else script_problems(c))]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_renamed_option_and_command():
    assert cli_problems("pni-ray train DATA -c bottle --out B --threads 2") == []
    assert cli_problems("pni-ray train DATA --tread 2") == ["no option '--tread' on `train`"]
    assert cli_problems("pni-ray trian DATA") == ["no command 'trian'"]
    assert cli_problems("pni-ray score EX IN --out O [--engnie local]") == ["no option '--engnie' on `score`"]
    block = "```\npni-ray train DATA -c C [--config F | --preset paper]\n      [--tile --tile-sise PX]\n```\n"
    assert shown_commands(block) == ["pni-ray train DATA -c C [--config F | --preset paper] [--tile --tile-sise PX]"]
    assert cli_problems(shown_commands(block)[0]) == ["no option '--tile-sise' on `train`"]  # continuation checked
    assert shown_commands("`pni-ray score MODEL INPUT... --out O && pni-ray report O | tee x`") == [
        "pni-ray score MODEL INPUT... --out O", "pni-ray report O", "tee x"]
    assert script_problems("python benchmarks/bench_scale.py --sizes 1000") == []
    assert script_problems("python benchmarks/bench_scale.py --size 1000") == [
        "no option '--size' in benchmarks/bench_scale.py"]
    assert script_problems("python benchmarks/bench_nothing.py") == ["no script benchmarks/bench_nothing.py"]


def test_the_kuberay_manifest_is_a_rayjob_that_authenticates():
    """jobs/README.md's RayJob, read as `kubectl apply` would: valid YAML, the nightly entrypoint, token
    authentication (which KubeRay refuses below Ray 2.52), the head kept free of actors, and every volume
    a container mounts declared beside it."""
    import yaml

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "jobs/README.md").read_text(), re.S)
    jobs = [d for b in blocks for d in yaml.safe_load_all(b) if isinstance(d, dict) and d.get("kind") == "RayJob"]
    assert len(jobs) == 1, "jobs/README.md should show one RayJob"
    spec = jobs[0]["spec"]
    assert spec["entrypoint"].startswith("pni-ray nightly --config ")
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert tuple(int(v) for v in cluster["rayVersion"].split(".")[:2]) >= (2, 52)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        declared = {v["name"] for v in pod.get("volumes", [])}
        mounted = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert mounted <= declared, f"mounted but not declared: {sorted(mounted - declared)}"
